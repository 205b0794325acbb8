"""The SRPO reward (the paper's Sec. 3.2.2, Eq. 4-8) and the plain-GRPO baseline reward.

An SRPO response answers, reflects on its answer, then answers again:

    <think>first reasoning</think> <answer>a1</answer>                      first solution
    <reflection>critique of the first attempt</reflection>                  reflection
    <think>second reasoning</think> <answer>a2</answer>                     second solution

c1 = a1 is right, c2 = the final answer is right; the case is r2r, w2r, r2w, w2w ("w2r": wrong,
then right), "single" (no reflection between two answers) or "none" (no answer). Two presets:

preset "paper" (the default): Eq. 4-8 as published.
    R = R_format + R_accuracy + I_eff + I_ref + length_weight * f_len
    R_format   0.5 if the first solution is well formed (see FORMAT RULES)
    R_accuracy 0.5 if the first answer a1 is right
    I_eff      (Eq. 8) r2r +0.25, w2r +0.5, w2w 0, r2w -0.25; 0 without a reflection
    I_ref      0.25 if exactly one non-empty reflection lies between a1 and a second solution
               that ends the response in an <answer> block
    f_len      (Eq. 7, below), paid only with a reflection and a second answer
    With a proper reflection: r2r 1.5, w2r 1.25, r2w 1.0, w2w 0.75 (+ 0.1 f_len). No reflection
    (one answer, or two without a reflection between them): R_format + R_accuracy of a1, at most
    1.0. No answer: 0. For the same final outcome a right first answer is always worth more than
    a wrong one (r2r > w2r, r2w > w2w) whatever f_len is; across outcomes r2w 1.0 < w2r 1.25.
    Ablations of the paper: length_weight=0 ("w/o f_len"), effectiveness=False ("w/o I_eff").

preset "code": the reward function the authors released with their code, which produced the paper's numbers.
    R = format + accuracy + length_weight * f_len
    format     0.5 only for the exact two-pass sequence above (both <think> blocks), else 0
    accuracy   w2r 1.0, r2r 0.75, r2w 0.25, w2w 0; one answer only: 0.5 if its LAST answer is
               right (the official code pays 0 there, a bug); no I_ref. Here w2r pays more than
               r2r: a policy gains by answering wrong first and correcting itself.

f_len (Eq. 7), both presets: S = tokens(first think) + tokens(a1) (the official code's reading of
the paper's "original response"), T_target = 2 S, T_max = 2.5 S,
L = tokens(whole response), f_len = exp(-((L - T_target) / (T_max - T_target))^2); so
f_len(T_target) = 1 and f_len(T_max) = e^-1. S = 0 (no first attempt to compare with) pays 0.

FORMAT RULES (paper preset). A block is an opening tag directly followed by its closing tag
(<think>...</think>, <answer>...</answer>, <reflection>...</reflection>, tags exactly so spelled);
it is empty if its content is whitespace only. Between blocks only whitespace may stand; stray,
nested or unbalanced tags count as text. Trailing <|im_end|> / <|endoftext|> tokens are ignored.
  * well-formed first solution: the response begins (after whitespace) with a non-empty <think>
    block, then a non-empty <answer> block. What follows a1 does not change R_format: it is the
    reflection's part, judged by I_ref. So a single-pass response can earn the full R_format.
  * proper reflection (I_ref): after a1 come exactly: one non-empty <reflection> block, an
    optional non-empty <think> block, one non-empty <answer> block, then the end of the response.
    The second <think> is optional because the paper's SFT target has none:
    <think>cot</think> <answer>a1</answer> <reflection>...</reflection> <answer>gt</answer>.
    I_ref does not look before a1: a response without a first <think> loses R_format, not I_ref.
  * the case, I_eff and f_len need less: a non-empty <reflection> block anywhere between a1 and
    a later non-empty answer; the response's last answer is then the final one (c2). So a
    malformed reflection (two of them, text in between) still pays I_eff, but not I_ref.

grpo mode (the plain-GRPO baseline, both presets): format_reward (0.5) if the response is exactly
<think>...</think><answer>...</answer> (non-empty, whitespace between) + grpo_correct (1.0) if the
LAST answer is right. No reflection or length terms.

Answers are judged by answers.py (letters, numbers, LaTeX by equivalence). Token counts come from
count_tokens: pass len(tokenizer.encode(s)) of the policy tokenizer; without it,
default_count_tokens counts words and punctuation characters (fine for tests, not for training).
"""
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from support import answers
from support.answers import MatchConfig


@dataclass
class RewardConfig(MatchConfig):
    """Every constant of the reward. The answer-matching fields (rel_tol, max_answer_chars,
    timeout_s, verify_workers) are inherited from answers.MatchConfig."""
    preset: str = "paper"           # "paper" (Eq. 4-8) | "code" (the authors' released reward function)
    format_reward: float = 0.5      # R_format (paper: first solution; code: exact two-pass sequence)
    # preset "paper"
    accuracy_reward: float = 0.5    # R_accuracy: the first answer is right
    eff_r2r: float = 0.25           # I_eff (Eq. 8): a right answer kept
    eff_w2r: float = 0.5            #                a wrong answer corrected
    eff_w2w: float = 0.0            #                a wrong answer left wrong
    eff_r2w: float = -0.25          #                a right answer broken
    effectiveness: bool = True      # False: I_eff = 0 (the paper's "w/o I_eff" ablation)
    reflection_reward: float = 0.25  # I_ref: one proper reflection and a second solution
    # preset "code": the accuracy table
    w2r: float = 1.0
    r2r: float = 0.75
    r2w: float = 0.25
    w2w: float = 0.0
    single_correct: float = 0.5     # one answer only, right
    # both presets: the length term (Eq. 7); length_weight = 0 is the paper's "w/o f_len"
    length_weight: float = 0.1
    target_ratio: float = 2.0       # T_target = target_ratio * S
    max_ratio: float = 2.5          # T_max = max_ratio * S
    # plain GRPO baseline
    grpo_correct: float = 1.0       # final answer right

    def __post_init__(self):
        if self.preset not in ("paper", "code"):
            raise ValueError(f"RewardConfig.preset must be 'paper' or 'code', got {self.preset!r}")
        if self.preset == "code" and not self.effectiveness:
            # the code preset's accuracy table mixes accuracy and effectiveness: nothing to drop
            raise ValueError("RewardConfig: effectiveness=False (w/o I_eff) needs preset='paper'")


@dataclass
class Score:
    """The reward of one response and every component of it (each logged separately)."""
    total: float
    format: float                 # R_format
    accuracy: float               # paper: R_accuracy; code: the case table value; grpo: grpo_correct or 0
    length: float                 # f_len in [0, 1] (total adds length_weight * length)
    first_correct: bool           # first answer right (code preset, grpo mode: without a reflection, the last)
    final_correct: bool           # last answer right
    case: str                     # r2r w2r r2w w2w (a reflection between two answers), single, none
    effectiveness: float = 0.0    # I_eff (paper preset)
    reflection: float = 0.0       # I_ref (paper preset)

    @property
    def filter_accuracy(self) -> float:
        """What GRPO's group filter averages: the reflection-aware accuracy term."""
        return self.accuracy + self.effectiveness


def srpo_reward(response: str, gt, count_tokens: Optional[Callable[[str], int]] = None,
                cfg: RewardConfig = RewardConfig(), options=None) -> Score:
    """SRPO reward of one response (a Score). Raises answers.BadGroundTruth only."""
    return score_batch([response], [gt], "srpo", count_tokens, cfg, [options])[0]


def grpo_reward(response: str, gt, cfg: RewardConfig = RewardConfig(), options=None) -> Score:
    """Plain GRPO baseline: format_reward for the single-pass format + grpo_correct if the last
    answer is right. Same fields as srpo_reward (length always 0; case for logging only)."""
    return score_batch([response], [gt], "grpo", None, cfg, [options])[0]


def score_batch(responses: list, gts: list, mode: str = "srpo",
                count_tokens: Optional[Callable[[str], int]] = None,
                cfg: RewardConfig = RewardConfig(), options: Optional[list] = None) -> list[Score]:
    """Rewards of a rollout batch (one gt, and optionally one options list, per response).
    All answers of the batch are judged at once (answers.match_batch: LaTeX goes to
    cfg.verify_workers math-verify processes, bounded by cfg.timeout_s per response).
    Raises answers.BadGroundTruth naming the index of the first unreadable ground truth."""
    if mode not in ("srpo", "grpo"):
        raise ValueError(f"score_batch: mode must be 'srpo' or 'grpo', got {mode!r}")
    if len(responses) != len(gts) or (options is not None and len(options) != len(gts)):
        raise ValueError(f"score_batch: {len(responses)} responses, {len(gts)} ground truths"
                         + ("" if options is None else f", {len(options)} option lists"))
    responses = [r if isinstance(r, str) else "" for r in responses]
    parsed = [parse_response(r) for r in responses]
    judged = [_answers_to_judge(p, mode, cfg) for p in parsed]
    verdicts = answers.match_batch(judged, gts, options, cfg, where="score_batch: ground truth #{i}: ")
    count = count_tokens or default_count_tokens
    return [_score(r, p, v, mode, count, cfg) for r, p, v in zip(responses, parsed, verdicts)]


def _answers_to_judge(p, mode, cfg):
    """[first, final] answer to judge ([a] when they are the same block, [] when none)."""
    if mode == "srpo" and cfg.preset == "paper":
        return p.answers[:1] + p.answers[1:][-1:]      # R_accuracy needs a1 even without a reflection
    return [p.answers[0], p.answers[-1]] if p.is_two_pass else p.answers[-1:]


def _score(response, p, verdicts, mode, count, cfg):
    """Score of a parsed response whose first / final answers have been judged."""
    first_ok, final_ok = (verdicts[0], verdicts[-1]) if verdicts else (False, False)
    if not p.answers:
        case = "none"
    elif not p.is_two_pass:
        case = "single"
    else:
        case = ("r" if first_ok else "w") + "2" + ("r" if final_ok else "w")
    fmt = acc = eff = ref = f_len = 0.0
    if mode == "grpo":
        fmt = cfg.format_reward if p.is_single_pass_format else 0.0
        acc = cfg.grpo_correct if final_ok else 0.0
    elif cfg.preset == "paper":
        fmt = cfg.format_reward if p.first_solution_ok else 0.0
        acc = cfg.accuracy_reward if first_ok else 0.0
        if cfg.effectiveness and p.is_two_pass:
            eff = {"r2r": cfg.eff_r2r, "w2r": cfg.eff_w2r, "w2w": cfg.eff_w2w, "r2w": cfg.eff_r2w}[case]
        ref = cfg.reflection_reward if p.reflection_ok else 0.0
    else:
        fmt = cfg.format_reward if p.is_two_pass_format else 0.0
        acc = {"w2r": cfg.w2r, "r2r": cfg.r2r, "r2w": cfg.r2w, "w2w": cfg.w2w, "none": 0.0,
               "single": cfg.single_correct if final_ok else 0.0}[case]
    if mode == "srpo" and p.is_two_pass:
        f_len = length_reward(count(p.first_think) + count(p.answers[0]), count(response), cfg)
    return Score(total=fmt + acc + eff + ref + cfg.length_weight * f_len, format=fmt, accuracy=acc,
                 length=f_len, first_correct=first_ok, final_correct=final_ok, case=case,
                 effectiveness=eff, reflection=ref)


def length_reward(s_tokens: int, l_tokens: int, cfg: RewardConfig = RewardConfig()) -> float:
    """f_len (Eq. 7): exp(-((L - T) / (Tmax - T))^2), T = target_ratio*S, Tmax = max_ratio*S;
    1 at L = T, e^-1 at L = Tmax (and at L = 2T - Tmax); 0 when S = 0."""
    target, tmax = cfg.target_ratio * s_tokens, cfg.max_ratio * s_tokens
    if s_tokens <= 0 or tmax <= target:
        return 0.0
    return math.exp(-(((l_tokens - target) / (tmax - target)) ** 2))


def default_count_tokens(text: str) -> int:
    """Fallback token count: words and single punctuation characters. Use the policy tokenizer."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# ----------------------------------------------------------------------------- parsing

@dataclass
class Parsed:
    thinks: list          # contents of the non-empty <think> blocks, in order
    answers: list         # contents of the non-empty <answer> blocks, in order
    reflection: Optional[str]   # first non-empty <reflection> between the first and last answer
    first_think: str      # last non-empty <think> before the first answer ("" if none)
    is_two_pass_format: bool     # exactly think, answer, reflection, think, answer (code preset)
    is_single_pass_format: bool  # exactly think, answer (grpo mode)
    is_two_pass: bool     # a reflection between the first and last answer (the case, I_eff, f_len)
    first_solution_ok: bool   # starts with a think, then an answer (paper R_format)
    reflection_ok: bool       # after a1: reflection, [think], answer, end (paper I_ref)


class _Block(NamedTuple):
    name: str        # think | answer | reflection
    text: str        # content between the tags
    start: int       # offset of the opening tag
    end: int         # offset after the closing tag
    clean: bool      # only whitespace between the previous block (or the start) and this one

    @property
    def full(self):  # a non-empty block
        return bool(self.text.strip())


_TAG_RE = re.compile(r"<(/?)(think|answer|reflection)>")
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
TWO_PASS = ["think", "answer", "reflection", "think", "answer"]
ONE_PASS = ["think", "answer"]


def parse_response(text: str) -> Parsed:
    """Split a response into its blocks and decide its format; never raises. Linear time."""
    text = _strip_end_tokens(text if isinstance(text, str) else "")
    blocks, tail_clean = _blocks(text)
    full = [b for b in blocks if b.full]
    answer_blocks = [b for b in full if b.name == "answer"]
    reflection, first_think = None, ""
    if answer_blocks:
        first_think = next((b.text for b in reversed(full) if b.name == "think"
                            and b.end <= answer_blocks[0].start), "")
        reflection = next((b.text for b in full if b.name == "reflection"
                           and answer_blocks[0].end <= b.start and b.end <= answer_blocks[-1].start), None)

    def exactly(names):   # the whole response is these blocks, all non-empty, whitespace between
        return (tail_clean and [b.name for b in blocks] == names
                and all(b.clean and b.full for b in blocks))

    return Parsed(
        thinks=[b.text for b in full if b.name == "think"], answers=[b.text for b in answer_blocks],
        reflection=reflection, first_think=first_think,
        is_two_pass_format=exactly(TWO_PASS), is_single_pass_format=exactly(ONE_PASS),
        is_two_pass=reflection is not None,
        first_solution_ok=_first_solution_ok(blocks),
        reflection_ok=bool(answer_blocks) and tail_clean and _reflection_ok(blocks, answer_blocks[0]))


def _first_solution_ok(blocks):
    """The response begins with a non-empty think, then a non-empty answer (whitespace around)."""
    return (len(blocks) >= 2 and [b.name for b in blocks[:2]] == ONE_PASS
            and all(b.clean and b.full for b in blocks[:2]))


def _reflection_ok(blocks, first_answer):
    """After the first answer: reflection, an optional think, answer, all non-empty, with only
    whitespace between them (the caller checks that nothing follows the last one)."""
    rest = blocks[blocks.index(first_answer) + 1:]
    names = [b.name for b in rest]
    return (names in (["reflection", "answer"], ["reflection", "think", "answer"])
            and all(b.clean and b.full for b in rest))


def _blocks(text):
    """(blocks, tail_clean): the blocks in order (an opening tag whose next tag is its closing tag)
    and whether only whitespace follows the last one. One pass over the tags."""
    blocks, prev_end, opening = [], 0, None
    for m in _TAG_RE.finditer(text):
        if m.group(1) and opening is not None and opening.group(2) == m.group(2):
            clean = not text[prev_end:opening.start()].strip()   # stray tags are text, so not clean
            blocks.append(_Block(m.group(2), text[opening.end():m.start()], opening.start(), m.end(), clean))
            prev_end, opening = m.end(), None
        else:   # an opening tag waits for its closing tag; any other tag is stray
            opening = None if m.group(1) else m
    return blocks, not text[prev_end:].strip()


def _strip_end_tokens(text):
    """text without trailing end-of-turn tokens and whitespace. A loop, not a regex: a pattern
    like (\\s*<\\|im_end\\|>)+\\s*$ retries every start inside a long whitespace run (quadratic:
    40k spaces took 4 s)."""
    end = len(text)
    while True:
        while end and text[end - 1].isspace():
            end -= 1
        token = next((t for t in _END_TOKENS if text.endswith(t, 0, end)), None)
        if token is None:
            return text[:end]
        end -= len(token)
