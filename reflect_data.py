"""
Stage 1 data: reflection SFT samples from the policy's own attempts (METHOD.md, sections 1 and 3.1).

For each training question:

1. the policy answers it (sampler.generate_texts, system prompt SYSTEM_PROMPT_SINGLE), once or
   --attempts k times;
2. reward.py judges each attempt against record["answer"]: it must be in the single-pass format
   <think>..</think><answer>..</answer> (an item with no such attempt is rejected: there is
   nothing to reflect on), and it is either correct or wrong. With k > 1 the attempt used is one
   of the kind the mix needs (below);
3. a teacher that sees the question, the image, the attempt, its answer and the ground truth
   writes a reflection (and, for --target two-pass, a second reasoning and answer):
       rule    a rule-based teacher passed in by name (the built-in task's by default):
               --rule_teacher MODULE:FUNCTION, FUNCTION(record, attempt_think, attempt_answer) -> the
               reflection; --rule_think MODULE:FUNCTION, FUNCTION(record) -> the second reasoning
               (two-pass only); the final answer is the ground truth. This file never imports
               the task: task.teacher_reflection and task.count_text arrive by name.
       openai  any OpenAI-compatible /chat/completions endpoint, images inline as base64 data
               URLs, threads for concurrency, --timeout_s bounding each whole request (a server
               that trickles its reply cannot hold a thread longer), HTTP 429 Retry-After honoured
               up to --max_wait_s, retries with exponential backoff; the key comes from an
               environment variable and is never logged or written
       local   a checkpoint of ours through sampler.generate_texts (same prompt as openai);
4. the SFT sample (--target):
       two-pass (default)  <think>attempt think</think>\\n<answer>attempt answer</answer>\\n
                           <reflection>..</reflection>\\n<think>second think</think>\\n<answer>final answer</answer>
                           under SYSTEM_PROMPT_REFLECT
       paper               <think>attempt think</think>\\n<answer>attempt answer</answer>\\n
                           <reflection>..</reflection>\\n<answer>ground truth</answer>
                           under SYSTEM_PROMPT_REFLECT_PAPER (the paper's Eq. 1 / Appendix B.4:
                           no second <think>; the teacher writes only the reflection)
   two-pass is the default because stage 2 trains and rewards the two-pass format (METHOD.md,
   sections 2 and 4; the reward's I_ref and the code preset's format term need a second
   solution that ends in an answer): SFT then teaches the format RL pays for. The paper's target
   stays available so the two can be measured against each other.
   A sample is kept only if the reflection is non-empty, does not copy the attempt, contains no
   control-token string (<|im_end|>, ...), the text has exactly the target's tag sequence and
   its final answer is correct (so the case is w2r for a wrong attempt, r2r for a correct one);
5. the mix: a fraction correct_frac (paper: ~0.3) of the samples come from correct attempts
   (the reflection confirms / refines), the rest from wrong ones (it corrects). Lines cannot be
   un-written, so the mix is enforced while streaming: a sample of kind c is written only if
   afterwards count(c) <= ceil(share(c) * total). Every prefix of the output file keeps the mix,
   and at the end the fraction is within 1/total of correct_frac. Items over quota are checked
   before the teacher is asked (no wasted calls) and again at write time.

Resumable: samples are appended one line at a time (data.append_jsonl: one write, fsync), ids of
rejected items go to a sidecar OUT_STEM.rejected.jsonl (OUT without .jsonl) with the reason; a
rerun skips both and repairs a torn last line left by a kill. The settings that decide what is
written or rejected (data, policy, teacher, target, mix, sampling) are stored in
OUT_STEM.settings.json by the first run; a rerun with other settings is refused, naming the
setting, so a file never mixes samples (or rejections) of two configurations. Teacher failures
(timeouts, HTTP errors, malformed replies after all retries) and unreadable images are written
nowhere, so the next run tries them again. At the end a summary (per-case counts, rejections by
reason, teacher failures, skipped images) is printed and written as JSON (--summary, default
<dir of OUT>/summary.json).

    python reflect_data.py      # built-in task: runs/demo/base answers runs/demo/task/train.jsonl, rule teacher
    python reflect_data.py --policy runs/base --data runs/task/train.jsonl --out runs/reflect/train.jsonl \\
        --teacher rule --rule_teacher demo.task:teacher_reflection --rule_think demo.task:count_text
    TEACHER_KEY=... python reflect_data.py --policy CKPT --data train.jsonl --out reflect.jsonl \\
        --teacher openai --teacher-url http://HOST/v1 --teacher-model MODEL --teacher-key-env TEACHER_KEY
    python reflect_data.py --policy CKPT --data train.jsonl --out reflect.jsonl --teacher local --teacher-model BIG_CKPT
"""
import concurrent.futures
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from support import answers
from support import chat_client
from support import cli
from support import data
import reward
from support.config import load_function, parse_config

# The instructions the openai / local teacher gets (system message), per --target. The user
# message is teacher_user_text(item) plus the image(s).
TEACHER_PROMPT = """\
You are an expert teacher reviewing a student's solution to a visual reasoning problem.
You are given the image, the question, the student's reasoning, the student's answer, the
correct answer, and whether the student's answer is correct.

Write two things:
1. A reflection on the student's attempt, written in the first person as if the student were
   checking their own work: go through the reasoning against the image and the question, say
   precisely which step or fact was wrong and what is true instead, or, if the attempt is
   correct, confirm the key steps and point out anything that could be tighter. Be concise and
   specific. Do not copy the student's reasoning, and do not state the correct answer as a
   given fact ("the correct answer is ...") without the reasoning that leads to it.
2. A second, improved solution that follows from the reflection: clear step-by-step reasoning
   that ends in the correct answer.

Reply in exactly this format and nothing else:
<reflection>your reflection</reflection>
<think>the improved step-by-step reasoning</think>
<answer>the final answer only (a number, a letter or an expression)</answer>
"""

TEACHER_PROMPT_PAPER = """\
You are an expert teacher reviewing a student's solution to a visual reasoning problem.
You are given the image, the question, the student's reasoning, the student's answer, the
correct answer, and whether the student's answer is correct.

Write a reflection on the student's attempt, written in the first person as if the student were
checking their own work: go through the reasoning against the image and the question, say
precisely which step or fact was wrong and what is true instead, or, if the attempt is correct,
confirm the key steps and point out anything that could be tighter. The student's final answer
(the correct one) will directly follow your reflection, so the reflection must lead to it. Be
concise and specific. Do not copy the student's reasoning, and do not state the correct answer
as a given fact ("the correct answer is ...") without the reasoning that leads to it.

Reply in exactly this format and nothing else:
<reflection>your reflection</reflection>
"""

TARGETS = ("two-pass", "paper")
# The tag sequence of an SFT sample, per target (the teacher's text must add no tags of its own).
TARGET_TAGS = {
    "two-pass": ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>",
                 "<think>", "</think>", "<answer>", "</answer>"],
    "paper": ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>",
              "<answer>", "</answer>"],
}
TAG_RE = re.compile(r"</?(?:think|answer|reflection)>")
# Built-in defaults (the demo run of pipeline.py), and the command that makes them.
DEFAULT_POLICY, DEFAULT_DATA, DEFAULT_OUT = "runs/demo/base", "runs/demo/task/train.jsonl", "runs/demo/reflect/train.jsonl"
MAKE_DEFAULTS = "python pipeline.py --only task base"


def teacher_user_text(item):
    verdict = "correct" if item.attempt_correct else "incorrect"
    return (f"Question: {item.question}\n\n"
            f"Student's reasoning:\n{item.attempt_think}\n\n"
            f"Student's answer: {item.attempt_answer}\n\n"
            f"Correct answer: {item.gt}\n"
            f"The student's answer is {verdict}.")


@dataclass
class ReflectConfig:
    policy: str = DEFAULT_POLICY  # checkpoint dir of the policy (config.json, model.safetensors, tokenizer.json)
    data: str = DEFAULT_DATA      # training JSONL (records with messages + answer; images relative to it)
    out: str = DEFAULT_OUT        # SFT JSONL written here (appended)
    summary: str = ""             # summary JSON; default: <dir of out>/summary.json
    target: str = "two-pass"      # SFT target: two-pass (the RL format) | paper (Eq. 1: reflection, then the answer)
    teacher: str = "rule"         # rule | openai | local
    rule_teacher: str = "demo.task:teacher_reflection"  # rule: MODULE:FUNCTION(record, attempt_think, attempt_answer) -> reflection
    rule_think: str = "demo.task:count_text"  # rule, two-pass: MODULE:FUNCTION(record) -> the second reasoning
    teacher_url: str = ""         # openai: base URL (.../v1) or the full .../chat/completions URL
    teacher_model: str = ""       # openai: model name; local: checkpoint dir
    teacher_key_env: str = "OPENAI_API_KEY"  # openai: NAME of the environment variable holding the key
    teacher_temperature: float = 0.7  # openai / local teacher sampling
    teacher_max_tokens: int = 1024    # openai / local teacher reply length
    timeout_s: float = 120.0      # openai: per request
    retries: int = 3              # openai: extra tries per item after a failure; local: resampling rounds
    backoff_s: float = 2.0        # openai: wait backoff_s * 2^k (+ jitter) before retry k
    max_wait_s: float = 60.0      # openai: longest wait honoured from an HTTP 429 Retry-After
    concurrency: int = 8          # openai: requests in flight
    correct_frac: float = 0.3     # share of samples from correct attempts; < 0 = keep everything
    attempts: int = 1             # policy samples per question; the one of the kind the mix needs is used
    limit: int = 0                # use only the first N training records (0 = all)
    batch_size: int = 16          # prompts per sampler call (and items per teacher round)
    max_new_tokens: int = 256     # policy attempt length
    temperature: float = 1.0      # policy sampling
    top_p: float = 1.0            # policy sampling nucleus
    seed: int = 0                 # sampling seed (policy; local teacher uses a derived one)
    device: str = ""              # default: cuda if available, else cpu
    skip_bad_records: bool = False  # drop the records that fail the check at start (counted in the summary)
                                    # instead of refusing the run with their file:line list


@dataclass
class Item:
    """One training question on its way through the pipeline."""
    id: str
    record: dict
    where: str                    # "train.jsonl:12" for error messages
    question: str
    images: list                  # absolute image paths of the prompt
    gt: str
    attempt: str = ""             # the policy's raw response
    attempt_think: str = ""
    attempt_answer: str = ""
    attempt_correct: bool = False


@dataclass
class TeacherReply:
    reflection: str = ""
    think: str = ""               # two-pass only
    answer: str = ""              # two-pass only
    error: str = ""               # non-empty: the teacher failed (retried next run)


# ----------------------------------------------------------------------------- records

def record_question(rec, where):
    """The question text: record['question'], else the text parts of the last user turn."""
    if isinstance(rec.get("question"), str) and rec["question"].strip():
        return rec["question"]
    user = [m for m in rec.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise ValueError(f"{where}: no field 'question' and no user turn in 'messages'")
    c = user[-1].get("content")
    return c if isinstance(c, str) else " ".join(p["text"] for p in c if isinstance(p, dict) and "text" in p)


def prompt_images(messages, image_root):
    """Absolute paths of the images of a conversation, in order."""
    out = []
    for m in messages:
        for p in m["content"] if isinstance(m.get("content"), list) else []:
            if isinstance(p, dict) and (p.get("type") == "image" or "image" in p):
                if not isinstance(p.get("image"), str):
                    raise ValueError(f"image must be a path string, got {type(p.get('image')).__name__}")
                out.append(os.path.normpath(os.path.join(image_root, p["image"])))
    return out


def load_items(path, limit, tokenizer=None, skip_bad=False):
    """Items of the training file (first `limit` records if > 0), every record checked before any
    work by data.validate_records (id, answer, the policy's prompt: control tokens, length and,
    with a tokenizer, token caps, images checked to decode); a bad record is refused, naming
    file:line and field, or dropped with skip_bad. -> (items, bad [(where, reason)])"""
    root = os.path.dirname(os.path.abspath(path))
    errors = []
    records = data.read_jsonl_numbered(path, errors=errors)
    if limit and len(records) > limit:   # bad lines after the last record used do not count
        last = data.line_of(records[limit - 1][0])
        records, errors = records[:limit], [e for e in errors if data.line_of(e[0]) < last]
    if not records and not errors:
        raise ValueError(f"{path}: no records")
    seen = {}

    def id_and_answer(rec, where):
        for field in ("id", "answer"):
            if not isinstance(rec.get(field), (str, int, float)) or str(rec[field]).strip() == "":
                raise ValueError(f"{where}: field '{field}' missing or empty")
        rid = str(rec["id"])
        if rid in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = where
    good, bad = data.validate_records(records, path, tokenizer, require=("id", "answer"), check=id_and_answer,
                                      messages=lambda r, w: data.prompt_messages(r, data.SYSTEM_PROMPT_SINGLE, w),
                                      image_root=root, add_generation_prompt=True, skip_bad=skip_bad, bad=errors,
                                      prog="reflect_data.py")
    items = []
    for where, rec in good:
        msgs = data.prompt_messages(rec, data.SYSTEM_PROMPT_SINGLE, where)
        items.append(Item(id=str(rec["id"]), record=rec, where=where, question=record_question(rec, where),
                          images=prompt_images(msgs, root), gt=str(rec["answer"])))
    return items, bad


def image_problem(it):
    """Why an item's images cannot be used ('' if they can): unreadable, or a shape the image
    preprocessing refuses (e.g. 1x300). Such an item is skipped and reported, not fatal."""
    for path in it.images:
        try:
            img = data.load_image(path, it.where)
            data.smart_resize(img.height, img.width)
        except (ValueError, FileNotFoundError) as e:
            return f"{it.where}: image {path}: {e}"
    return ""


# ----------------------------------------------------------------------------- resume state

def repair_torn_tail(path):
    """A kill during append can leave an unterminated last line: cut it off (that item is redone)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        raw = f.read()
        if not raw or raw.endswith(b"\n"):
            return False
        f.truncate(raw.rfind(b"\n") + 1)
    return True


def load_done(out, rejected_path):
    """(written records, rejected records) of earlier runs, after repairing torn tails."""
    for p in (out, rejected_path):
        if repair_torn_tail(p):
            print(f"reflect_data.py: {p}: removed an incomplete last line (interrupted write)", file=sys.stderr)
    written = data.read_jsonl(out) if os.path.exists(out) else []
    rejected = data.read_jsonl(rejected_path) if os.path.exists(rejected_path) else []
    return written, rejected


def run_settings(cfg):
    """The settings that decide what is written or rejected (not batch sizes, retries, limits)."""
    s = dict(data=os.path.abspath(cfg.data), policy=os.path.abspath(cfg.policy), target=cfg.target,
             teacher=cfg.teacher, correct_frac=cfg.correct_frac, attempts=cfg.attempts,
             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    if cfg.teacher == "rule":
        s.update(rule_teacher=cfg.rule_teacher, rule_think=cfg.rule_think if cfg.target == "two-pass" else "")
    else:
        s.update(teacher_model=cfg.teacher_model, teacher_temperature=cfg.teacher_temperature,
                 teacher_max_tokens=cfg.teacher_max_tokens)
    return s


def check_settings(cfg, settings_path, earlier_output):
    """First run: store the settings. Rerun: refuse other settings, naming the first that differs."""
    now = run_settings(cfg)
    if not os.path.exists(settings_path):
        if earlier_output:
            raise SystemExit(f"reflect_data.py: {cfg.out} (or its .rejected.jsonl) exists but {settings_path} does "
                             f"not, so what made it is unknown: delete them or choose another --out")
        data.write_json_atomic(settings_path, now)
        return
    with open(settings_path, encoding="utf-8") as f:
        then = json.load(f)
    for key in list(now) + [k for k in then if k not in now]:  # the most telling settings first
        if now.get(key) != then.get(key):
            raise SystemExit(f"reflect_data.py: {cfg.out} was made with --{key} {then.get(key)!r}, this run has "
                             f"--{key} {now.get(key)!r} ({settings_path}); rerun with the same settings, "
                             f"or write to another --out")


# ----------------------------------------------------------------------------- the mix

def within_quota(counts, kind, frac):
    """May one more sample of kind ('correct' | 'wrong') be written, given counts so far?
    Yes iff afterwards count(kind) <= ceil(share * total). frac < 0: no mix enforced."""
    if frac < 0:
        return True
    share = frac if kind == "correct" else 1.0 - frac
    total = counts["correct"] + counts["wrong"] + 1
    return counts[kind] + 1 <= math.ceil(share * total - 1e-9)


# ----------------------------------------------------------------------------- policy attempts

def load_checkpoint(path, device, flag="--policy"):
    import torch
    import model as model_lib
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with cli.reading("reflect_data.py", flag, path):   # a broken file is named in one line
        return model_lib.from_pretrained(path, device=device, dtype=dtype).eval(), data.Tokenizer.from_dir(path)


def generate(net, tok, conversations, wheres, scfg, batch_size):
    """scfg.n responses per conversation (messages with absolute image paths), conversation-major,
    through sampler.generate_texts (texts without their final eos)."""
    import sampler
    prompts = [data.encode_messages(m, tok, "/", add_generation_prompt=True, where=w)
               for m, w in zip(conversations, wheres)]
    return sampler.generate_texts(net, tok, prompts, scfg, batch_size=batch_size).texts


def with_abs_images(messages, image_paths):
    """The conversation with its image references replaced by the given absolute paths, in order."""
    paths = iter(image_paths)
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [{**p, "image": next(paths)} if isinstance(p, dict) and (p.get("type") == "image" or "image" in p)
                 else p for p in c]
        out.append({**m, "content": c})
    return out


class SamplerPolicy:
    """First attempts of a checkpoint through sampler.generate_texts."""

    def __init__(self, cfg: ReflectConfig):
        import sampler
        self.net, self.tok = load_checkpoint(cfg.policy, cfg.device)
        self.batch_size = cfg.batch_size
        self.scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=cfg.seed, n=cfg.attempts)

    def attempts(self, items):
        """-> per item, a list of cfg.attempts responses."""
        self.scfg.seed += 1  # a fresh draw per batch, reproducible from cfg.seed
        convs = [with_abs_images(data.prompt_messages(it.record, data.SYSTEM_PROMPT_SINGLE, it.where), it.images)
                 for it in items]
        texts = generate(self.net, self.tok, convs, [it.where for it in items], self.scfg, self.batch_size)
        k = self.scfg.n
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]


def judge_attempts(items, attempts):
    """attempts: per item a response or a list of them. -> per item a list of usable candidates
    (text, think, answer, correct) -- single-pass format, judged by reward.py, no control-token
    strings -- and {item id: rejection reason} for items without one."""
    bad, cands, flat = {}, [[] for _ in items], []
    for i, (it, texts) in enumerate(zip(items, attempts)):
        texts = [texts] if isinstance(texts, str) else list(texts)
        it.attempt = texts[0] if texts else ""
        try:
            answers.check_ground_truth(it.gt, it.record.get("options"), where=it.where)
        except ValueError as e:
            bad[it.id] = f"bad_ground_truth: {e}"
            continue
        control = ""  # a control token in an attempt that is otherwise in the format
        for text in texts:
            p = reward.parse_response(text)
            if p.is_single_pass_format and data.find_control_token(text):
                control = control or data.find_control_token(text)
            elif p.is_single_pass_format:
                flat.append((i, text, p.thinks[0].strip(), p.answers[0].strip()))
        if not any(f[0] == i for f in flat):
            bad[it.id] = f"attempt_control_token: {control!r} in the policy's attempt" if control else "attempt_format"
    scores = reward.score_batch([f[1] for f in flat], [items[f[0]].gt for f in flat], mode="grpo",
                                options=[items[f[0]].record.get("options") for f in flat])
    for (i, text, think, answer), sc in zip(flat, scores):
        cands[i].append((text, think, answer, bool(sc.final_correct)))
    return cands, bad


def choose_attempts(items, cands, why, counts, frac):
    """Pick each item's attempt and decide who goes to the teacher: the candidate of the kind the
    mix needs most (correct while its share is below frac, else wrong), if that kind is within
    quota, counting the items already chosen from this chunk. Over-quota items get a reason."""
    pending, ask = Counter(), []
    for it, cs in zip(items, cands):
        if it.id in why:
            continue
        c = counts + pending
        need_correct = frac >= 0 and c["correct"] < frac * (c["correct"] + c["wrong"] + 1)
        text, think, answer, ok = next((x for x in cs if x[3] == need_correct), cs[0])
        it.attempt, it.attempt_think, it.attempt_answer, it.attempt_correct = text, think, answer, ok
        kind = "correct" if ok else "wrong"
        if within_quota(c, kind, frac):
            pending[kind] += 1
            ask.append(it)
        else:
            why[it.id] = f"over_quota_{kind}"
    return ask


# ----------------------------------------------------------------------------- teachers

def parse_teacher(text, target="two-pass"):
    """TeacherReply from '<reflection>..</reflection><think>..</think><answer>..</answer>' (paper:
    the reflection only): the first reflection, then the first think after it, then the first
    answer after that (so a reasoning model's own leading <think> block is skipped)."""
    tags = ("reflection",) if target == "paper" else ("reflection", "think", "answer")
    text, got, pos = text or "", {}, 0
    for tag in tags:
        m = re.compile(rf"<{tag}>(.*?)</{tag}>", re.S).search(text, pos)
        if m is None or not m.group(1).strip():
            return TeacherReply(error=f"unparsable reply (no non-empty <{tag}> block in order "
                                      f"{', '.join(f'<{t}>' for t in tags)})")
        got[tag], pos = m.group(1).strip(), m.end()
    return TeacherReply(got["reflection"], got.get("think", ""), got.get("answer", ""))


class RuleTeacher:
    """A rule-based teacher passed in by name: the reflection is REFLECT(record, attempt_think,
    attempt_answer) (--rule_teacher), the second reasoning THINK(record) (--rule_think, two-pass
    only), the final answer the ground truth. The built-in task's are task.teacher_reflection
    (knows the true scene; checks the question item by item) and task.count_text (the counts
    that check found)."""
    name = "rule"

    def __init__(self, cfg: ReflectConfig):
        self.reflect_spec, self.think_spec = cfg.rule_teacher, cfg.rule_think
        self.reflection = load_function(cfg.rule_teacher, "--rule_teacher")
        self.think = load_function(cfg.rule_think, "--rule_think") if cfg.target == "two-pass" else None

    def reflect(self, items):
        out = []
        for it in items:
            try:
                reflection = self.reflection(it.record, it.attempt_think, it.attempt_answer)
                think = self.think(it.record) if self.think else ""
            except Exception as e:  # the function does not fit this data: name the record and the function
                raise ValueError(f"{it.where}: --rule_teacher {self.reflect_spec} / --rule_think {self.think_spec} "
                                 f"failed on this record ({type(e).__name__}: {e}); use --teacher openai or "
                                 f"local for other data") from None
            out.append(TeacherReply(str(reflection), str(think), it.gt if self.think else ""))
        return out


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint (support/chat_client.py), `concurrency` requests in flight."""

    def __init__(self, cfg: ReflectConfig):
        if not cfg.teacher_url or not cfg.teacher_model:
            raise SystemExit("reflect_data.py: --teacher openai needs --teacher-url and --teacher-model")
        key = os.environ.get(cfg.teacher_key_env, "")
        if not key:
            raise SystemExit(f"reflect_data.py: --teacher openai: environment variable {cfg.teacher_key_env} "
                             f"(--teacher-key-env) is not set")
        try:
            self.client = chat_client.ChatClient(cfg.teacher_url, key, cfg.timeout_s, cfg.retries, cfg.backoff_s,
                                                 cfg.max_wait_s)
        except ValueError as e:
            raise SystemExit(f"reflect_data.py: --teacher-url {cfg.teacher_url!r}: {e}") from None
        self.cfg = cfg
        self.prompt = TEACHER_PROMPT_PAPER if cfg.target == "paper" else TEACHER_PROMPT
        self.name = f"openai:{cfg.teacher_model}"

    def request_body(self, it):
        content = [{"type": "image_url", "image_url": {"url": chat_client.image_data_url(p, data.load_image)}}
                   for p in it.images]
        content.append({"type": "text", "text": teacher_user_text(it)})
        return {"model": self.cfg.teacher_model, "temperature": self.cfg.teacher_temperature,
                "max_tokens": self.cfg.teacher_max_tokens,
                "messages": [{"role": "system", "content": self.prompt}, {"role": "user", "content": content}]}

    def reflect_one(self, it):
        try:
            body = self.request_body(it)
        except (ValueError, FileNotFoundError) as e:  # an unreadable image: this item only
            return TeacherReply(error=f"bad image: {e}")
        # a reply without the target's tags is retried like a server error
        reply, error = self.client.complete(body, lambda text: parse_teacher(text, self.cfg.target), seed=it.id)
        return reply if reply is not None else TeacherReply(error=error)

    def reflect(self, items):
        with concurrent.futures.ThreadPoolExecutor(max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(self.reflect_one, items))


class LocalTeacher:
    """A checkpoint of ours as the teacher: the teacher prompt + image + teacher_user_text, sampled;
    items with an unparsable reply are resampled (new seed) up to `retries` times."""

    def __init__(self, cfg: ReflectConfig):
        import sampler
        if not cfg.teacher_model:
            raise SystemExit("reflect_data.py: --teacher local needs --teacher-model CHECKPOINT_DIR")
        self.net, self.tok = load_checkpoint(cfg.teacher_model, cfg.device, "--teacher-model")
        self.scfg = sampler.SampleConfig(max_new_tokens=cfg.teacher_max_tokens, temperature=cfg.teacher_temperature,
                                         seed=cfg.seed + 1_000_003)
        self.retries, self.target, self.batch_size = cfg.retries, cfg.target, cfg.batch_size
        self.prompt = TEACHER_PROMPT_PAPER if cfg.target == "paper" else TEACHER_PROMPT
        self.name = f"local:{cfg.teacher_model}"

    def reflect(self, items):
        replies = [TeacherReply(error="not asked") for _ in items]
        for _ in range(self.retries + 1):
            todo = [i for i, r in enumerate(replies) if r.error]
            if not todo:
                break
            convs = [[{"role": "system", "content": self.prompt},
                      {"role": "user", "content": [{"type": "image", "image": p} for p in items[i].images]
                       + [{"type": "text", "text": teacher_user_text(items[i])}]}] for i in todo]
            self.scfg.seed += 1
            texts = generate(self.net, self.tok, convs, [items[i].where for i in todo], self.scfg, self.batch_size)
            for i, text in zip(todo, texts):
                replies[i] = parse_teacher(text, self.target)
        return replies


def make_teacher(cfg):
    if cfg.teacher == "rule":
        return RuleTeacher(cfg)
    if cfg.teacher == "openai":
        return OpenAITeacher(cfg)
    if cfg.teacher == "local":
        return LocalTeacher(cfg)
    raise SystemExit(f"reflect_data.py: --teacher must be rule, openai or local, got {cfg.teacher!r}")


# ----------------------------------------------------------------------------- samples

def norm(s):
    return " ".join(s.lower().split())


def copies_attempt(reflection, think):
    """The reflection repeats the attempt instead of critiquing it: equal to its reasoning, or one
    contains the other (each at least 20 characters) after case / whitespace normalisation."""
    r, t = norm(reflection), norm(think)
    return r == t or (len(t) >= 20 and t in r) or (len(r) >= 20 and r in t)


def sample_text(it, reply, target="two-pass"):
    """The assistant turn the SFT trains on (see the module docstring for the two targets)."""
    first = (f"<think>{it.attempt_think}</think>\n<answer>{it.attempt_answer}</answer>\n"
             f"<reflection>{reply.reflection.strip()}</reflection>\n")
    if target == "paper":  # the paper's Eq. 1: the final answer is the ground truth, no second think
        return first + f"<answer>{it.gt}</answer>"
    return first + f"<think>{reply.think.strip()}</think>\n<answer>{reply.answer.strip()}</answer>"


def check_samples(items, replies, target="two-pass"):
    """(response text, rejection reason or '') per item with a teacher reply (reply.error == '')."""
    texts = [sample_text(it, r, target) for it, r in zip(items, replies)]
    scores = reward.score_batch(texts, [it.gt for it in items], mode="srpo",  # format + final answer
                                options=[it.record.get("options") for it in items])
    out = []
    for it, r, text, s in zip(items, replies, texts, scores):
        control = data.find_control_token(" ".join((r.reflection, r.think, r.answer)))
        if not r.reflection.strip():
            why = "empty_reflection"
        elif control:
            why = f"teacher_control_token: {control!r} in the teacher's reply"
        elif copies_attempt(r.reflection, it.attempt_think):
            why = "reflection_copies_attempt"
        elif TAG_RE.findall(text) != TARGET_TAGS[target] or (target == "two-pass" and not reward.parse_response(text).is_two_pass_format):
            why = "bad_format"   # e.g. the teacher put tags inside its text
        elif not s.final_correct:
            why = "second_answer_wrong"
        else:
            why = ""
        out.append((text, why))
    return out


def sample_record(it, text, out_dir, teacher_name, target="two-pass"):
    """The SFT record: the training record's fields, the target's system prompt and assistant turn,
    images relative to out_dir."""
    rel = [os.path.relpath(p, out_dir) for p in it.images]
    turns = with_abs_images([m for m in data.prompt_messages(it.record, None, it.where) if m.get("role") != "system"], rel)
    rec = {k: v for k, v in it.record.items() if k != "messages"}
    if isinstance(rec.get("image"), str) and len(rel) == 1:
        rec["image"] = rel[0]
    source = "correct" if it.attempt_correct else "wrong"
    system = data.SYSTEM_PROMPT_REFLECT_PAPER if target == "paper" else data.SYSTEM_PROMPT_REFLECT
    rec.update(messages=[{"role": "system", "content": system}, *turns, {"role": "assistant", "content": text}],
               source=source, case="r2r" if it.attempt_correct else "w2r", teacher=teacher_name, target=target,
               attempt=it.attempt)
    return rec


# ----------------------------------------------------------------------------- the run

def paths(cfg):
    """(rejected sidecar, settings sidecar, summary) paths of cfg.out."""
    stem = cfg.out[:-len(".jsonl")] if cfg.out.endswith(".jsonl") else cfg.out
    summary = cfg.summary or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "summary.json")
    return stem + ".rejected.jsonl", stem + ".settings.json", summary


def check_config(cfg):
    """One-line errors naming the flag; missing built-in inputs name the command that makes them."""
    if cfg.target not in TARGETS:
        raise SystemExit(f"reflect_data.py: --target must be one of {', '.join(TARGETS)}, got {cfg.target!r}")
    if not cfg.out or not cfg.data:
        raise SystemExit("reflect_data.py: --data and --out must not be empty")
    if cfg.correct_frac > 1:
        raise SystemExit(f"reflect_data.py: --correct-frac must be <= 1 (< 0 = no mix), got {cfg.correct_frac}")
    if not cfg.timeout_s > 0:
        raise SystemExit(f"reflect_data.py: --timeout_s must be > 0, got {cfg.timeout_s}")
    rejected, settings, summary = paths(cfg)
    try:   # outputs never touch inputs (symlinks resolved): not the data, not inside a checkpoint directory
        cli.check_paths("reflect_data.py", {"--out": cfg.out, "--out (rejected)": rejected, "--out (settings)": settings,
                                            "--summary": summary},
                        {"--data": cfg.data, "--policy": cfg.policy,
                         "--teacher-model": cfg.teacher_model if cfg.teacher == "local" else ""}, out_dirs=())
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not os.path.isfile(cfg.data):
        hint = f"; make it with: {MAKE_DEFAULTS}" if cfg.data == DEFAULT_DATA else ""
        raise SystemExit(f"reflect_data.py: --data {cfg.data}: no such file{hint}")


def check_policy(cfg):
    if not os.path.isfile(os.path.join(cfg.policy, "config.json")):
        hint = f"; make it with: {MAKE_DEFAULTS}" if cfg.policy == DEFAULT_POLICY else ""
        raise SystemExit(f"reflect_data.py: --policy {cfg.policy}: not a checkpoint directory (no config.json){hint}")


def policy_tokenizer(cfg: ReflectConfig):
    """The --policy checkpoint's tokenizer (it counts the prompts' tokens when the records are
    checked), or None when the policy directory has none; a broken file is named in one line."""
    if not os.path.isfile(os.path.join(cfg.policy, "tokenizer.json")):
        return None
    with cli.reading("reflect_data.py", "--policy", cfg.policy):
        return data.Tokenizer.from_dir(cfg.policy)


def run(cfg: ReflectConfig, policy=None, teacher=None):
    """Build (or continue) cfg.out. policy: object with attempts(items) -> list[str] (default:
    SamplerPolicy(cfg)); teacher: object with reflect(items) -> list[TeacherReply] and a name
    (default: from cfg.teacher). Returns the summary dict."""
    check_config(cfg)
    cfg.device = cfg.device or ("cuda" if _cuda() else "cpu")
    rejected_path, settings_path, summary_path = paths(cfg)
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    os.makedirs(out_dir, exist_ok=True)

    items, bad_records = load_items(cfg.data, cfg.limit, policy_tokenizer(cfg), cfg.skip_bad_records)
    written, rejected = load_done(cfg.out, rejected_path)
    check_settings(cfg, settings_path, earlier_output=bool(written or rejected))
    open(cfg.out, "a").close()  # the output exists (maybe empty) even if nothing passes
    skip = {str(r.get("id")) for r in written} | {str(r.get("id")) for r in rejected}
    todo = [it for it in items if it.id not in skip]
    counts = Counter(r.get("source") for r in written)  # samples per kind ('correct' | 'wrong') so far
    teacher = teacher or make_teacher(cfg)
    if policy is None and todo:
        check_policy(cfg)
        policy = SamplerPolicy(cfg)
    print(f"reflect_data.py: {len(items)} records, {len(items) - len(todo)} done in earlier runs "
          f"({sum(counts.values())} written, {len(rejected)} rejected), {len(todo)} to do; teacher {teacher.name}, "
          f"target {cfg.target}", file=sys.stderr)

    run_written, run_rejected, failures, bad_images = Counter(), Counter(), {}, {}
    bar = tqdm(total=len(todo), desc="reflect", unit="q")
    for b in range(0, len(todo), cfg.batch_size):
        chunk = []
        for it in todo[b:b + cfg.batch_size]:  # an unreadable image skips its item (retried next run), not the run
            problem = image_problem(it)
            if problem:
                bad_images[it.id] = problem
                print(f"reflect_data.py: skipped: {problem}", file=sys.stderr)
            else:
                chunk.append(it)
        cands, why = judge_attempts(chunk, policy.attempts(chunk)) if chunk else ([], {})  # why: {id: reason}
        ask = choose_attempts(chunk, cands, why, counts, cfg.correct_frac)
        replies = dict(zip([it.id for it in ask], teacher.reflect(ask))) if ask else {}
        answered = [it for it in ask if not replies[it.id].error]
        checked = dict(zip([it.id for it in answered],
                           check_samples(answered, [replies[it.id] for it in answered], cfg.target)))
        # in data order: a sample, a rejection, or nothing (a teacher failure, retried next run)
        for it in chunk:
            kind = "correct" if it.attempt_correct else "wrong"
            if it.id in replies and replies[it.id].error:
                failures[it.id] = replies[it.id].error
                continue
            if it.id in checked:
                text, reason = checked[it.id]
                if not reason and not within_quota(counts, kind, cfg.correct_frac):
                    reason = f"over_quota_{kind}"  # the precheck counted an item whose teacher call failed
                if not reason:
                    data.append_jsonl(cfg.out, sample_record(it, text, out_dir, teacher.name, cfg.target))
                    counts[kind] += 1
                    run_written[kind] += 1
                    continue
                why[it.id] = reason
            reason = why[it.id].split(":")[0]
            data.append_jsonl(rejected_path, {"id": it.id, "reason": reason, "detail": why[it.id],
                                              "attempt_correct": it.attempt_correct if it.attempt_think else None})
            run_rejected[reason] += 1
        bar.update(len(todo[b:b + cfg.batch_size]))
        bar.set_postfix(correct=counts["correct"], wrong=counts["wrong"], failed=len(failures))
    bar.close()

    summary = make_summary(cfg, teacher.name, len(items), counts, Counter(r.get("reason", "?") for r in rejected),
                           len(todo), run_written, run_rejected, failures, bad_images, bad_records)
    # summary.json means "every record is decided" (pipeline.py takes it as the stage's done mark):
    # with items left over (teacher failures, unreadable images) the summary goes to *.incomplete.json
    incomplete = summary_path[:-len(".json")] + ".incomplete.json" if summary_path.endswith(".json") \
        else summary_path + ".incomplete"
    done, stale = (summary_path, incomplete) if summary["complete"] else (incomplete, summary_path)
    if os.path.exists(stale):
        os.remove(stale)
    data.write_json_atomic(done, summary)
    print(json.dumps(summary, indent=1))
    return summary


def make_summary(cfg, teacher_name, n_records, counts, old_rejected, n_todo, run_written, run_rejected, failures,
                 bad_images=None, bad_records=()):
    """Everything so far (this run and earlier ones) + what this run did + what failed. bad_records:
    the records --skip_bad_records dropped at the start [(where, reason)]."""
    total = counts["correct"] + counts["wrong"]
    bad_images = bad_images or {}
    return dict(
        out=cfg.out, complete=not failures and not bad_images,  # every record written or rejected
        teacher=teacher_name, target=cfg.target, correct_frac=cfg.correct_frac, records=n_records,
        written=dict(correct=counts["correct"], wrong=counts["wrong"], total=total,
                     r2r=counts["correct"], w2r=counts["wrong"]),
        correct_share=round(counts["correct"] / total, 4) if total else None,
        rejected=dict(sorted((old_rejected + run_rejected).items())),
        this_run=dict(todo=n_todo, written=dict(run_written), rejected=dict(sorted(run_rejected.items())),
                      teacher_failures=len(failures), bad_images=len(bad_images)),
        teacher_failures=dict(count=len(failures), reasons=dict(Counter(_failure_kind(e) for e in failures.values())),
                              ids=sorted(failures)[:100], note="not recorded as done: the next run retries them"),
        bad_images=dict(count=len(bad_images), examples=[bad_images[k] for k in sorted(bad_images)[:10]],
                        note="skipped, not recorded as done: fix the images and rerun"),
        skipped_bad_records=dict(count=len(bad_records), examples=[f"{w}: {why}" for w, why in bad_records[:data.MAX_LISTED]],
                                 note="failed the check at start (--skip_bad_records): fix them and rerun to use them"),
    )


def _failure_kind(error):
    return re.sub(r" \(after \d+ tries\)$", "", error)


def _cuda():
    import torch
    return torch.cuda.is_available()


def parse_args(argv=None) -> ReflectConfig:
    return parse_config(ReflectConfig, argv, description="SRPO stage 1: reflection SFT data from the policy's attempts",
                        choices={"teacher": ["rule", "openai", "local"], "target": list(TARGETS)},
                        minimum={"limit": 0, "batch_size": 1, "attempts": 1, "max_new_tokens": 1, "retries": 0,
                                 "concurrency": 1, "teacher_max_tokens": 1, "backoff_s": 0.0, "max_wait_s": 0.0,
                                 "temperature": 0.0, "teacher_temperature": 0.0})


def main(argv=None):
    """Exit 0 only when every record is decided and at least one sample was written; items left for
    a rerun (teacher failures, unreadable images) or an empty output end with exit 1, so a pipeline
    never goes on with a partial or empty file."""
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except (ValueError, FileNotFoundError) as e:  # a data error: one line naming file:line and field
        raise SystemExit(cli.message("reflect_data.py", e)) from None
    if not summary["complete"]:
        raise SystemExit(f"reflect_data.py: {summary['teacher_failures']['count']} teacher failure(s) and "
                         f"{summary['bad_images']['count']} unreadable image(s) left undone: rerun the same "
                         f"command to retry them")
    if summary["written"]["total"] == 0:
        raise SystemExit(f"reflect_data.py: no SFT sample was written to {cfg.out}: every record was rejected "
                         f"({summary['rejected']}); see the .rejected.jsonl file beside it")


if __name__ == "__main__":
    cli.main("reflect_data.py", main)
