"""reward.py against hand-computed values: both presets' case tables, format and reflection rules,
the length term, the ablation switches, and bounded cost on hostile inputs."""
import math
import random
import re
import threading
import time

import pytest

from support import answers
import reward as R
from support.answers import BadGroundTruth
from reward import RewardConfig
from test_answers import MATCH_CASES

CODE = RewardConfig(preset="code")   # the official code's values (the tests written before the paper preset)

OPTS = ["10", "12", "14"]


def test_enough_cases():
    assert len(MATCH_CASES) + len(REWARD_CASES) >= 60


@pytest.mark.parametrize("gt", ["", "   ", "???", "\\frac{", "$$", None, "\x00\x01\x02", [3]])
def test_bad_ground_truth_raises(gt):
    with pytest.raises(BadGroundTruth):     # never a free reward, never a silent 0
        R.srpo_reward("<think>a</think><answer>3</answer>", gt)


def two_pass(t1, a1, refl, t2, a2, sep="\n"):
    return sep.join([f"<think>{t1}</think>", f"<answer>{a1}</answer>",
                     f"<reflection>{refl}</reflection>", f"<think>{t2}</think>", f"<answer>{a2}</answer>"])


T1 = "I count the red shapes: there are three."
# (response, gt, mode, expected format, accuracy, case, first_correct, final_correct)
REWARD_CASES = [
    (two_pass(T1, "3", "I missed one.", "Four.", "4"), "4", "srpo", 0.5, 1.0, "w2r", False, True),
    (two_pass(T1, "4", "Check: fine.", "Still four.", "4"), "4", "srpo", 0.5, 0.75, "r2r", True, True),
    (two_pass(T1, "4", "Maybe five.", "Five.", "5"), "4", "srpo", 0.5, 0.25, "r2w", True, False),
    (two_pass(T1, "3", "Maybe five.", "Five.", "5"), "4", "srpo", 0.5, 0.0, "w2w", False, False),
    ("<think>Four shapes.</think><answer>4</answer>", "4", "srpo", 0.0, 0.5, "single", True, True),
    ("<think>Five shapes.</think><answer>5</answer>", "4", "srpo", 0.0, 0.0, "single", False, False),
    ("<answer>4</answer>", "4", "srpo", 0.0, 0.5, "single", True, True),
    ("<think>hmm</think>", "4", "srpo", 0.0, 0.0, "none", False, False),
    ("", "4", "srpo", 0.0, 0.0, "none", False, False),
    ("The answer is 4", "4", "srpo", 0.0, 0.0, "none", False, False),
    ("<think>x</think><answer> </answer>", "4", "srpo", 0.0, 0.0, "none", False, False),
    (two_pass(T1, "3", "Missed one.", "Four.", "4") + " extra", "4", "srpo", 0.0, 1.0, "w2r", False, True),
    (two_pass(T1, "3", " ", "Four.", "4"), "4", "srpo", 0.0, 0.5, "single", True, True),
    (two_pass(T1, "3", "Missed one.", " ", "4"), "4", "srpo", 0.0, 1.0, "w2r", False, True),
    ("<think>a</think><answer>3</answer><think>b</think><answer>4</answer>", "4", "srpo",
     0.0, 0.5, "single", True, True),                          # two answers, no reflection
    (two_pass(T1, "3", "Missed one.", "Four.", "The answer is \\boxed{4}."), "4", "srpo",
     0.5, 1.0, "w2r", False, True),
    (two_pass(T1, "3", "Missed one.", "Four.", "4", sep=""), "4", "srpo", 0.5, 1.0, "w2r", False, True),
    (two_pass(T1, "3", "Missed one.", "Four.", "4", sep="\n\n  ") + "\n<|im_end|>", "4", "srpo",
     0.5, 1.0, "w2r", False, True),
    ("<answer>3</answer><reflection>r</reflection><think>t</think><answer>4</answer>", "4", "srpo",
     0.0, 1.0, "w2r", False, True),                            # first think missing
    (two_pass("<think>" + T1, "3", "r", "t", "4"), "4", "srpo", 0.0, 1.0, "w2r", False, True),
    (two_pass(T1, "3", "r", "t", "4").upper(), "4", "srpo", 0.0, 0.0, "none", False, False),
    (two_pass(T1, "A", "r", "t", "The answer is B"), "B", "srpo", 0.5, 1.0, "w2r", False, True),
    (two_pass(T1, "3", "r", "t", "4") + "<reflection>r</reflection><answer>5</answer>", "4", "srpo",
     0.0, 0.0, "w2w", False, False),                           # first and LAST answers count
    # plain GRPO baseline
    ("<think>Four.</think><answer>4</answer>", "4", "grpo", 0.5, 1.0, "single", True, True),
    ("<think>Five.</think><answer>5</answer>", "4", "grpo", 0.5, 0.0, "single", False, False),
    ("<think>Four.</think> <answer>4</answer> tail", "4", "grpo", 0.0, 1.0, "single", True, True),
    (two_pass(T1, "3", "r", "t", "4"), "4", "grpo", 0.0, 1.0, "w2r", False, True),
    ("", "4", "grpo", 0.0, 0.0, "none", False, False),
]


@pytest.mark.parametrize("resp,gt,mode,fmt,acc,case,first,final", REWARD_CASES)
def test_reward_cases(resp, gt, mode, fmt, acc, case, first, final):
    r = R.srpo_reward(resp, gt, cfg=CODE) if mode == "srpo" else R.grpo_reward(resp, gt)
    assert (r.format, r.accuracy, r.case) == (fmt, acc, case)
    assert (r.first_correct, r.final_correct) == (first, final)
    assert r.total == pytest.approx(r.format + r.accuracy + 0.1 * r.length)
    if case in ("single", "none") or mode == "grpo":
        assert r.length == 0.0
    else:
        assert 0.0 <= r.length <= 1.0


TAG = re.compile(r"</?(?:think|answer|reflection)>")


def words(s):   # test token counter: whitespace words, tags not counted
    return len(TAG.sub(" ", s).split())


# first think 4 words + first answer 1 -> S = 5, T_target = 10, T_max = 12.5, width 2.5;
# L = 5 + len(refl) + len(t2) + 1 (second answer)
@pytest.mark.parametrize("refl,t2,expected", [
    ("w w", "w w", 1.0),                        # L = 10
    ("w w w", "w w", math.exp(-0.16)),          # L = 11: (1/2.5)^2 = 0.16
    ("w", "w", math.exp(-0.64)),                # L = 8:  (2/2.5)^2 = 0.64
    ("w w w w", "w w w", math.exp(-1.44)),      # L = 13: (3/2.5)^2 = 1.44
    ("w " * 5, "w " * 4, math.exp(-4.0)),       # L = 15: (5/2.5)^2 = 4
])
def test_length_reward_hand_computed(refl, t2, expected):
    resp = two_pass("a b c d", "3", refl, t2, "4")
    r = R.srpo_reward(resp, "4", count_tokens=words, cfg=CODE)
    assert r.length == pytest.approx(expected, rel=1e-12)
    assert r.total == pytest.approx(0.5 + 1.0 + 0.1 * expected, rel=1e-12)
    r = R.srpo_reward(resp, "4", count_tokens=words)    # paper: w2r 0.5 + 0 + 0.5 + 0.25
    assert r.length == pytest.approx(expected, rel=1e-12)
    assert r.total == pytest.approx(1.25 + 0.1 * expected, rel=1e-12)


def test_length_reward_function_and_config():
    assert R.length_reward(10, 20) == 1.0
    assert R.length_reward(10, 25) == pytest.approx(math.exp(-1.0))   # at T_max
    assert R.length_reward(10, 15) == pytest.approx(math.exp(-1.0))   # symmetric
    assert R.length_reward(0, 7) == 0.0                                 # S = 0 pays nothing
    cfg = RewardConfig(preset="code", target_ratio=3.0, max_ratio=4.0, length_weight=0.2, w2r=2.0,
                       format_reward=1.0)
    assert R.length_reward(10, 40, cfg) == pytest.approx(math.exp(-1.0))
    resp = two_pass("a b c d", "3", "w w", "w w", "4")                  # S=5, L=10, T=15, width 5
    r = R.srpo_reward(resp, "4", count_tokens=words, cfg=cfg)
    assert r.length == pytest.approx(math.exp(-1.0))
    assert r.total == pytest.approx(1.0 + 2.0 + 0.2 * math.exp(-1.0))
    assert R.srpo_reward(resp, "4", count_tokens=lambda s: 0).length == 0.0


def test_default_token_count_used_when_none_given():
    assert R.default_count_tokens("<think>a, b</think>") == 10   # < think > a , b < / think >
    resp = two_pass("a", "3", "r", "t", "4")
    r = R.srpo_reward(resp, "4")
    s = R.default_count_tokens("a") + R.default_count_tokens("3")
    assert r.length == pytest.approx(R.length_reward(s, R.default_count_tokens(resp)))


def test_parse_response_fields():
    p = R.parse_response(two_pass("t1", "a1", "refl", "t2", "a2"))
    assert (p.thinks, p.answers, p.reflection, p.first_think) == (["t1", "t2"], ["a1", "a2"], "refl", "t1")
    assert p.is_two_pass_format and p.is_two_pass and not p.is_single_pass_format
    p = R.parse_response("<think>t</think><answer>a</answer>")
    assert p.is_single_pass_format and not p.is_two_pass_format and not p.is_two_pass


def test_score_batch_matches_single_calls_and_errors():
    resps = [two_pass(T1, "3", "r", "t", "4"), "<think>x</think><answer>(B)</answer>",
             "<answer>\\frac{1}{2}</answer>", "junk"]
    gts = ["4", "B", "0.5", "4"]
    out = R.score_batch(resps, gts, "srpo", words)
    assert out == [R.srpo_reward(r, g, words) for r, g in zip(resps, gts)]
    assert [o.case for o in out] == ["w2r", "single", "single", "none"]
    assert R.score_batch(resps, gts, "grpo") == [R.grpo_reward(r, g) for r, g in zip(resps, gts)]
    assert R.score_batch(["<answer>12</answer>"], ["B"], options=[OPTS])[0].accuracy == 0.5
    with pytest.raises(BadGroundTruth, match="#2"):
        R.score_batch(resps[:3], ["4", "B", "???"])
    with pytest.raises(ValueError):
        R.score_batch(resps, gts[:2])
    with pytest.raises(ValueError):
        R.score_batch(resps, gts, mode="ppo")


CFG = RewardConfig(timeout_s=1.0)
DEEP = "\\frac{1}{" * 300 + "2" + "}" * 300
TOWER = "x^" * 60 + "2"
rng = random.Random(0)
JUNK = bytes(rng.randrange(256) for _ in range(20000)).decode("latin-1")
HOSTILE = [
    "",
    "a" * 1_000_000,
    "<think>" * 100_000,
    "<answer>" * 50_000 + "3" + "</answer>" * 50_000,
    "<answer><answer>4</answer>",
    "<think><answer>4</think></answer>",
    "</answer>4<answer>",
    JUNK,
    "<think>" + JUNK + "</think><answer>" + JUNK[:500] + "</answer>",
    "<think>x</think><answer>" + "9" * 1_000_000 + "</answer>",
    "<think>x</think><answer>$" + DEEP + "$</answer>",
    "<think>x</think><answer>$" + "{" * 5000 + "1" + "}" * 5000 + "$</answer>",
    two_pass("x", "$" + TOWER + "$", "r", "t", "$" + TOWER + "$"),
    "<think>x</think><answer>\\boxed{\\boxed{\\boxed{" + "(" * 3000 + "</answer>",
]


@pytest.mark.parametrize("i", range(len(HOSTILE)))
@pytest.mark.parametrize("gt", ["\\sqrt{2}", "4", "B"])
def test_hostile_inputs_never_raise_and_stay_bounded(i, gt):
    t0 = time.time()
    r = R.srpo_reward(HOSTILE[i], gt, cfg=CFG)
    g = R.grpo_reward(HOSTILE[i], gt, cfg=CFG)
    dt = time.time() - t0
    assert 0.0 <= r.total <= 1.6 and 0.0 <= g.total <= 1.5
    if gt != "4":   # "<answer><answer>4</answer>" does contain a well-formed answer 4
        assert not r.final_correct and not g.final_correct
    assert dt < 2 * CFG.timeout_s + 1.5, dt      # two rewards, each bounded by timeout_s


def test_non_string_response_is_scored_zero():
    for resp in (None, b"<answer>4</answer>", 4):
        assert R.srpo_reward(resp, "4").total == 0.0


def test_works_from_worker_thread():
    # math-verify's own timeout uses signal.alarm, which fails outside the main thread
    out = {}

    def run():
        out["r"] = R.score_batch(["<answer>\\frac{\\sqrt{2}}{2}</answer>",
                                  "<answer>$" + TOWER + "$</answer>"],
                                 ["\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"], cfg=CFG)

    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert [o.final_correct for o in out["r"]] == [True, False]


def test_pool_survives_timeouts_in_a_batch():
    good = "<answer>\\frac{\\sqrt{2}}{2}</answer>"
    bad = "<answer>$" + TOWER + "$</answer>"
    cfg = RewardConfig(timeout_s=1.0, verify_workers=2)
    t0 = time.time()
    out = R.score_batch([good, bad, good, bad, good], ["\\frac{1}{\\sqrt{2}}"] * 5, cfg=cfg)
    assert [o.final_correct for o in out] == [True, False, True, False, True]
    assert time.time() - t0 < 2 * cfg.timeout_s + 3.0
    assert answers.answers_match(good[8:-9], "\\frac{1}{\\sqrt{2}}", cfg=cfg)   # workers restarted


# ----------------------------------------------------------------------------- the two presets

def sft_shape(t1, a1, refl, a2, sep=" "):
    """The paper's SFT target: no second <think>."""
    return sep.join([f"<think>{t1}</think>", f"<answer>{a1}</answer>",
                     f"<reflection>{refl}</reflection>", f"<answer>{a2}</answer>"])


NO_LEN = lambda s: 0   # noqa: E731  S = 0, so f_len = 0 and the totals are the table's exact values

# (response, gt = "4", case, first_correct, final_correct,
#  paper (format, accuracy, I_eff, I_ref, total), code (format, accuracy, total))
CASE_TABLE = [
    (two_pass(T1, "4", "Check: fine.", "Still four.", "4"), "r2r", True, True,
     (0.5, 0.5, 0.25, 0.25, 1.5), (0.5, 0.75, 1.25)),
    (two_pass(T1, "3", "I missed one.", "Four.", "4"), "w2r", False, True,
     (0.5, 0.0, 0.5, 0.25, 1.25), (0.5, 1.0, 1.5)),
    (two_pass(T1, "4", "Maybe five.", "Five.", "5"), "r2w", True, False,
     (0.5, 0.5, -0.25, 0.25, 1.0), (0.5, 0.25, 0.75)),
    (two_pass(T1, "3", "Maybe five.", "Five.", "5"), "w2w", False, False,
     (0.5, 0.0, 0.0, 0.25, 0.75), (0.5, 0.0, 0.5)),
    # the paper's SFT shape: a proper reflection for the paper, not the code's exact format
    (sft_shape(T1, "4", "Check: fine.", "4"), "r2r", True, True, (0.5, 0.5, 0.25, 0.25, 1.5), (0.0, 0.75, 0.75)),
    (sft_shape(T1, "3", "Missed one.", "4"), "w2r", False, True, (0.5, 0.0, 0.5, 0.25, 1.25), (0.0, 1.0, 1.0)),
    (sft_shape(T1, "4", "Maybe five.", "5"), "r2w", True, False, (0.5, 0.5, -0.25, 0.25, 1.0), (0.0, 0.25, 0.25)),
    (sft_shape(T1, "3", "Maybe five.", "5"), "w2w", False, False, (0.5, 0.0, 0.0, 0.25, 0.75), (0.0, 0.0, 0.0)),
    # one answer: format + accuracy only
    ("<think>Four shapes.</think><answer>4</answer>", "single", True, True,
     (0.5, 0.5, 0.0, 0.0, 1.0), (0.0, 0.5, 0.5)),
    ("<think>Five shapes.</think><answer>5</answer>", "single", False, False,
     (0.5, 0.0, 0.0, 0.0, 0.5), (0.0, 0.0, 0.0)),
    ("<answer>4</answer>", "single", True, True, (0.0, 0.5, 0.0, 0.0, 0.5), (0.0, 0.5, 0.5)),
    # two answers, no reflection: the paper judges the first answer, the code the last
    ("<think>a</think><answer>3</answer><think>b</think><answer>4</answer>", "single", False, True,
     (0.5, 0.0, 0.0, 0.0, 0.5), (0.0, 0.5, 0.5)),
    # no answer at all: 0
    ("<think>hmm</think>", "none", False, False, (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ("", "none", False, False, (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ("The answer is 4", "none", False, False, (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("resp,case,first,final,paper,code", CASE_TABLE)
def test_case_table_both_presets(resp, case, first, final, paper, code):
    p = R.srpo_reward(resp, "4", count_tokens=NO_LEN)               # the default preset is the paper's
    assert (p.format, p.accuracy, p.effectiveness, p.reflection, p.length) == paper[:4] + (0.0,)
    assert p.total == pytest.approx(paper[4], abs=1e-12)
    assert p.filter_accuracy == pytest.approx(paper[1] + paper[2])
    c = R.srpo_reward(resp, "4", count_tokens=NO_LEN, cfg=CODE)
    assert (c.format, c.accuracy, c.effectiveness, c.reflection, c.length) == code[:2] + (0.0, 0.0, 0.0)
    assert c.total == pytest.approx(code[2], abs=1e-12)
    assert c.filter_accuracy == code[1]
    for s in (p, c):
        assert (s.case, s.final_correct) == (case, final)
    assert p.first_correct == first
    assert c.first_correct == (first if case != "single" else final)   # code: one answer = the last


@pytest.mark.parametrize("resp,paper_format,code_format", [
    ("<think>t</think><answer>4</answer>", 0.5, 0.0),
    ("\n  <think>t</think>\n\n<answer>4</answer>\n", 0.5, 0.0),     # whitespace around blocks
    ("<think>t</think><answer>4</answer>\n<|im_end|>", 0.5, 0.0),   # end-of-turn token ignored
    ("<think>t</think><answer>4</answer> and more text", 0.5, 0.0),  # after a1: I_ref's business
    ("<think>t</think><answer>4</answer><reflection>r</reflection>", 0.5, 0.0),
    (two_pass("t", "3", "r", "t2", "4"), 0.5, 0.5),
    (two_pass("t", "3", "r", "t2", "4") + "<|endoftext|>", 0.5, 0.5),
    (sft_shape("t", "3", "r", "4"), 0.5, 0.0),
    ("Sure! <think>t</think><answer>4</answer>", 0.0, 0.0),         # text before the first think
    ("<think>t</think> so <answer>4</answer>", 0.0, 0.0),           # text between think and answer
    ("<think> </think><answer>4</answer>", 0.0, 0.0),               # empty think
    ("<think>t</think><answer> </answer><answer>4</answer>", 0.0, 0.0),  # empty first answer block
    ("<answer>4</answer>", 0.0, 0.0),                               # no think
    ("<answer>4</answer><think>t</think>", 0.0, 0.0),               # wrong order
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0, 0.0),    # two thinks
    ("<think>t<think>u</think><answer>4</answer>", 0.0, 0.0),       # stray opening tag
    ("<think>t</think></think><answer>4</answer>", 0.0, 0.0),       # stray closing tag
    ("<think>t</answer><answer>4</answer>", 0.0, 0.0),              # mismatched tags
    ("<THINK>t</THINK><ANSWER>4</ANSWER>", 0.0, 0.0),               # tags are case-sensitive
    ("<think>t</think>", 0.0, 0.0),                                 # no answer
])
def test_format_rules(resp, paper_format, code_format):
    assert R.srpo_reward(resp, "4").format == paper_format
    assert R.srpo_reward(resp, "4", cfg=CODE).format == code_format


# (response, I_ref under the paper preset, case): gt = "4"
REFLECTION_RULES = [
    (two_pass(T1, "3", "Missed one.", "Four.", "4"), 0.25, "w2r"),
    (two_pass(T1, "3", "Missed one.", "Four.", "4", sep=""), 0.25, "w2r"),
    (two_pass(T1, "3", "Missed one.", "Four.", "4", sep="\n\n ") + "\n<|im_end|>", 0.25, "w2r"),
    (sft_shape(T1, "3", "Missed one.", "4"), 0.25, "w2r"),           # no second think
    ("<answer>3</answer><reflection>r</reflection><think>t</think><answer>4</answer>", 0.25, "w2r"),
    # two reflections: no I_ref (the case, I_eff and f_len still count)
    ("<think>t</think><answer>3</answer><reflection>a</reflection><reflection>b</reflection>"
     "<answer>4</answer>", 0.0, "w2r"),
    ("<think>t</think><answer>3</answer><reflection>a</reflection><think>u</think>"
     "<reflection>b</reflection><answer>4</answer>", 0.0, "w2r"),
    ("<think>t</think><answer>3</answer><reflection> </reflection><reflection>r</reflection>"
     "<answer>4</answer>", 0.0, "w2r"),
    # empty reflection
    (two_pass(T1, "3", " ", "Four.", "4"), 0.0, "single"),
    (sft_shape(T1, "3", "", "4"), 0.0, "single"),
    # reflection after the last answer
    ("<think>t</think><answer>4</answer><reflection>r</reflection>", 0.0, "single"),
    (two_pass(T1, "3", "Missed one.", "Four.", "4") + "<reflection>again</reflection>", 0.0, "w2r"),
    # no second answer
    ("<think>t</think><answer>3</answer><reflection>r</reflection><think>u</think>", 0.0, "single"),
    ("<think>t</think><answer>3</answer><reflection>r</reflection><answer> </answer>", 0.0, "single"),
    # the second solution is malformed or does not end the response
    (two_pass(T1, "3", "Missed one.", "Four.", "4") + " extra", 0.0, "w2r"),
    (two_pass(T1, "3", "Missed one.", "Four.", "4") + "<answer>4</answer>", 0.0, "w2r"),
    (two_pass(T1, "3", "Missed one.", " ", "4"), 0.0, "w2r"),          # empty second think
    ("<think>t</think><answer>3</answer><reflection>r</reflection> so <answer>4</answer>", 0.0, "w2r"),
    ("<think>t</think><answer>3</answer><reflection>r</reflection><think>u</think><think>v</think>"
     "<answer>4</answer>", 0.0, "w2r"),
    # the reflection is not between the first answer and a second one
    ("<think>t</think><reflection>r</reflection><answer>3</answer><answer>4</answer>", 0.0, "single"),
]


@pytest.mark.parametrize("resp,ref,case", REFLECTION_RULES)
def test_reflection_rules(resp, ref, case):
    s = R.srpo_reward(resp, "4", count_tokens=NO_LEN)
    assert (s.reflection, s.case) == (ref, case)
    eff = {"w2r": 0.5, "single": 0.0}[case]
    assert s.effectiveness == eff
    assert s.total == pytest.approx(s.format + s.accuracy + eff + ref)
    assert R.srpo_reward(resp, "4", cfg=CODE).reflection == 0.0      # the code has no I_ref


def test_parse_marks_paper_shapes():
    p = R.parse_response(sft_shape("t1", "a1", "refl", "a2"))
    assert (p.thinks, p.answers, p.reflection, p.first_think) == (["t1"], ["a1", "a2"], "refl", "t1")
    assert p.first_solution_ok and p.reflection_ok and p.is_two_pass and not p.is_two_pass_format
    p = R.parse_response("<think>t</think><answer>a</answer> tail")
    assert p.first_solution_ok and not p.reflection_ok and not p.is_single_pass_format


# f_len = 1: first think 3 words + first answer 1 -> S = 4, T_target = 8, T_max = 10
FLEN_1 = {"r2r": sft_shape("a b c", "4", "w w w", "4"), "w2r": sft_shape("a b c", "3", "w w w", "4"),
          "r2w": sft_shape("a b c", "4", "w w w", "5"), "w2w": sft_shape("a b c", "3", "w w w", "5")}


def test_length_term_paper_preset():
    # L = 3 + 1 + 3 + 1 = 8 = T_target: f_len = 1, the full 0.1
    expected = {"r2r": 1.6, "w2r": 1.35, "r2w": 1.1, "w2w": 0.85}
    for case, resp in FLEN_1.items():
        s = R.srpo_reward(resp, "4", count_tokens=words)
        assert (s.case, s.length) == (case, 1.0)
        assert s.total == pytest.approx(expected[case], abs=1e-12)
    # L = 3 + 1 + 3 + 2 + 1 = 10 = T_max: f_len = e^-1 (not ~0)
    s = R.srpo_reward(two_pass("a b c", "3", "w w w", "w w", "4"), "4", count_tokens=words)
    assert s.length == pytest.approx(math.exp(-1.0), rel=1e-12)
    assert s.total == pytest.approx(1.25 + 0.1 * math.exp(-1.0), rel=1e-12)
    # L = 4 + 1 + 1 = 6: (6 - 8) / 2 = -1, so e^-1 below the target too
    s = R.srpo_reward(sft_shape("a b c", "3", "w", "4", sep=""), "4", count_tokens=words)
    assert s.length == pytest.approx(math.exp(-1.0), rel=1e-12)
    # no reflection and a second answer: no length term, however the lengths compare
    s = R.srpo_reward("<think>a b c</think><answer>4</answer> w w w w", "4", count_tokens=words)
    assert (s.length, s.total) == (0.0, 1.0)


def test_ablation_switches():
    no_len = RewardConfig(length_weight=0.0)                 # the paper's "w/o f_len"
    no_eff = RewardConfig(effectiveness=False)               # the paper's "w/o I_eff"
    want_no_len = {"r2r": 1.5, "w2r": 1.25, "r2w": 1.0, "w2w": 0.75}
    want_no_eff = {"r2r": 1.35, "w2r": 0.85, "r2w": 1.35, "w2w": 0.85}   # format + acc + I_ref + 0.1
    for case, resp in FLEN_1.items():
        s = R.srpo_reward(resp, "4", count_tokens=words, cfg=no_len)
        assert s.length == 1.0                               # still computed and logged, not paid
        assert s.total == pytest.approx(want_no_len[case], abs=1e-12)
        s = R.srpo_reward(resp, "4", count_tokens=words, cfg=no_eff)
        assert s.effectiveness == 0.0 and s.filter_accuracy == s.accuracy
        assert s.total == pytest.approx(want_no_eff[case], abs=1e-12)
    with pytest.raises(ValueError, match="effectiveness"):
        RewardConfig(preset="code", effectiveness=False)   # the code's table has no separate I_eff
    with pytest.raises(ValueError, match="preset"):
        RewardConfig(preset="Paper")


def test_right_first_answer_beats_wrong_one_under_paper():
    """Every combination with a proper reflection (both shapes, reflections of 1..40 words, so
    f_len from ~0 to 1): for the same final outcome a right first answer always scores more, and
    for the same first answer a right final one does. (Across final outcomes it does not:
    r2w 1.0 < w2r 1.25, as Eq. 8 pays the correction.) The code preset breaks the first rule."""
    scores = {"paper": [], "code": []}
    for a1, a2 in [("4", "4"), ("3", "4"), ("4", "5"), ("3", "5")]:
        for n in (1, 2, 3, 4, 6, 10, 40):
            refl = " ".join(["w"] * n)
            for resp in (sft_shape("a b c", a1, refl, a2), two_pass("a b c", a1, refl, "u", a2)):
                scores["paper"].append(R.srpo_reward(resp, "4", count_tokens=words))
                scores["code"].append(R.srpo_reward(resp, "4", count_tokens=words, cfg=CODE))
    paper = scores["paper"]
    assert all(s.reflection == 0.25 for s in paper)
    assert min(s.length for s in paper) < 1e-6 and max(s.length for s in paper) == 1.0
    for a in paper:
        for b in paper:
            if a.first_correct and not b.first_correct and a.final_correct == b.final_correct:
                assert a.total > b.total, (a, b)
            if a.final_correct and not b.final_correct and a.first_correct == b.first_correct:
                assert a.total > b.total, (a, b)
    code = scores["code"]
    assert max(s.total for s in code if s.case == "w2r") > min(s.total for s in code if s.case == "r2r")


# ----------------------------------------------------------------------------- linear-time parsing

def _best_time(text, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        R.srpo_reward(text, "4", cfg=CFG)
        best = min(best, time.perf_counter() - t0)
    return best


HEAD = "<think>t</think><answer>4</answer>"
LONG_INPUTS = {   # n -> a response whose size grows with n
    "spaces": lambda n: HEAD + " " * n + "x",
    "spaces around an end token": lambda n: HEAD + " " * n + "<|im_end|>" + " " * n + "x",
    "end tokens": lambda n: HEAD + " <|im_end|>" * (n // 11),
    "think tags": lambda n: "<think>" * n,
    "nested braces": lambda n: HEAD[:-9] + "{" * n + "}" * n + "</answer>",
    "many blocks": lambda n: HEAD + "<reflection>r</reflection>" * (n // 26),
    "long reflection": lambda n: two_pass("t", "3", "w " * n, "u", "4"),
}


@pytest.mark.parametrize("name", list(LONG_INPUTS))
def test_cost_is_linear_in_the_response(name):
    """A regex with nested \\s* runs made 40k spaces take 4.5 s and 200k over 60 s.
    Compared on n and 4n (best of 3, so a busy machine cannot fake a slow run): linear work
    takes ~4x, quadratic 16x. The absolute bound is 100x what this takes on an idle core."""
    make = LONG_INPUTS[name]
    small, big = _best_time(make(50_000)), _best_time(make(200_000))
    assert big < 2.0, big
    assert big < 8 * small + 0.05, (small, big)
