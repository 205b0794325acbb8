"""reward.py against hand-written expected values (SRPO.md reward section, issue 4)."""
import math
import os
import random
import re
import threading
import time

import pytest

import reward as R
from reward import BadGroundTruth, RewardConfig

OPTS = ["10", "12", "14"]
COLORS = {"A": "red", "B": "blue", "C": "green"}

# (prediction, ground truth, options, expected match)
MATCH_CASES = [
    # multiple-choice letters in their usual spellings
    ("B", "B", None, True),
    ("(B)", "B", None, True),
    ("B.", "B", None, True),
    ("B)", "B", None, True),
    ("B:", "B", None, True),
    ("b", "B", None, True),
    ("The answer is B", "B", None, True),          # official implementation: 0
    ("the answer is (B).", "B", None, True),
    ("So the correct option is C", "C", None, True),
    ("Answer: B", "B", None, True),
    ("\\boxed{B}", "B", None, True),
    ("$\\boxed{(B)}$", "B", None, True),
    ("**B**", "B", None, True),
    ("(B) 12 cm", "B", None, True),
    ("B. 12", "B", None, True),
    ("B", "(B)", None, True),
    ("B", "B.", None, True),
    ("Option B", "B", None, True),
    ("Choice: (D)", "D", None, True),
    ("\\text{B}", "B", None, True),
    ("C", "B", None, False),
    ("(C)", "B", None, False),
    ("The answer is C", "B", None, False),
    ("A", "B", None, False),
    ("AB", "B", None, False),
    ("", "B", None, False),
    ("12", "B", None, False),                      # text without options cannot name a letter
    # choice text vs letter, options given
    ("12", "B", OPTS, True),
    ("14", "B", OPTS, False),
    ("B", "12", OPTS, True),                       # gt is the option's text
    ("(B)", "12", OPTS, True),
    ("C", "12", OPTS, False),
    ("12", "12", OPTS, True),
    ("D", "B", OPTS, False),                       # out of range letter
    ("blue", "B", COLORS, True),
    ("Blue.", "B", COLORS, True),
    ("green", "B", COLORS, False),
    ("B", "blue", COLORS, True),
    # integers, decimals, fractions, percentages, units
    ("3", "3", None, True),
    ("3.0", "3", None, True),
    ("-2", "-2", None, True),
    ("2", "-2", None, False),
    ("4", "5", None, False),
    ("The answer is 4.", "4", None, True),
    ("\\boxed{3} first, then \\boxed{4}", "4", None, True),   # the last box counts
    ("\u22123", "-3", None, True),                                # unicode minus
    ("The answer is 4 apples", "4", None, True),
    ("0.5", "1/2", None, True),
    ("\\frac{1}{2}", "0.5", None, True),
    ("1/2", "\\frac{1}{2}", None, True),
    ("\\dfrac{3}{4}", "0.75", None, True),
    ("\\frac{3}{5}", "0.75", None, False),
    ("0.333333", "1/3", None, True),               # within rel_tol 1e-6
    ("0.33", "1/3", None, False),
    ("3.14", "3.14159", None, False),
    ("75%", "75", None, True),
    ("75\\%", "0.75", None, True),
    ("0.75", "75%", None, True),
    ("7.5", "75%", None, False),
    ("1,000", "1000", None, True),
    ("1000", "1,000", None, True),
    ("12 cm", "12", None, True),
    ("12", "12 cm", None, True),
    ("12 cm^2", "12", None, True),
    ("13 cm", "12", None, False),
    ("45°", "45", None, True),
    ("45^\\circ", "45", None, True),
    ("$12\\text{ cm}$", "12", None, True),
    ("\\$5", "5", None, True),
    ("x = 4", "4", None, True),                    # math-verify: equation against value
    # LaTeX by equivalence (math-verify)
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", None, True),
    ("\\sqrt{8}", "2\\sqrt{2}", None, True),
    ("\\boxed{\\frac{1}{2}}", "0.5", None, True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", None, True),
    ("\\sqrt{2}", "\\sqrt{3}", None, False),
    ("2\\pi", "2\\pi", None, True),
    ("\\pi", "2\\pi", None, False),
    # words
    ("Red", "red", None, True),
    ("red.", "red", None, True),
    ("The answer is yes", "Yes", None, True),
    ("blue", "red", None, False),
    ("No", "yes", None, False),
    # unparsable predictions are simply wrong
    ("???", "3", None, False),
    ("\\frac{", "1/2", None, False),
    ("garbage text", "\\sqrt{2}", None, False),
    ("\x00\xff\x01", "3", None, False),
]


@pytest.mark.parametrize("pred,gt,options,expected", MATCH_CASES)
def test_answers_match(pred, gt, options, expected):
    assert R.answers_match(pred, gt, options) is expected


def test_enough_cases():
    assert len(MATCH_CASES) + len(REWARD_CASES) >= 60


@pytest.mark.parametrize("gt", ["", "   ", "???", "\\frac{", "$$", None, "\x00\x01\x02", [3]])
def test_bad_ground_truth_raises(gt):
    with pytest.raises(BadGroundTruth):
        R.answers_match("3", gt)
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
    r = R.srpo_reward(resp, gt) if mode == "srpo" else R.grpo_reward(resp, gt)
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
    r = R.srpo_reward(resp, "4", count_tokens=words)
    assert r.length == pytest.approx(expected, rel=1e-12)
    assert r.total == pytest.approx(0.5 + 1.0 + 0.1 * expected, rel=1e-12)


def test_length_reward_function_and_config():
    assert R.length_reward(10, 20) == 1.0
    assert R.length_reward(10, 25) == pytest.approx(math.exp(-1.0))   # at T_max
    assert R.length_reward(10, 15) == pytest.approx(math.exp(-1.0))   # symmetric
    assert R.length_reward(0, 7) == 0.0                                 # S = 0 pays nothing
    cfg = RewardConfig(target_ratio=3.0, max_ratio=4.0, length_weight=0.2, w2r=2.0, format_reward=1.0)
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


def test_fast_numeric_path_agrees_with_math_verify():
    # the pure-Python number path must give math-verify's verdict on plain numbers
    from math_verify import parse, verify
    rng = random.Random(1)

    def spell(v):
        return rng.choice([str(v), f"{v}.0", f"{v * 2}/2", f"\\frac{{{v * 3}}}{{3}}", f"{v:,}"])

    for _ in range(60):
        a = rng.randint(-3000, 3000)
        b = a if rng.random() < 0.5 else rng.randint(-3000, 3000)
        p, g = spell(a), spell(b)
        assert R.answers_match(p, g) == verify(parse("$" + g + "$"), parse("$" + p + "$")), (p, g)


def _match_sqrt(_):
    return R.answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")


def test_works_in_daemonic_process():
    # Pool / DataLoader workers may not start helper processes: in-process fallback
    import multiprocessing as mp
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(_match_sqrt, [0, 1]) == [True, True]


def test_pool_survives_timeouts_in_a_batch():
    good = "<answer>\\frac{\\sqrt{2}}{2}</answer>"
    bad = "<answer>$" + TOWER + "$</answer>"
    cfg = RewardConfig(timeout_s=1.0, verify_workers=2)
    t0 = time.time()
    out = R.score_batch([good, bad, good, bad, good], ["\\frac{1}{\\sqrt{2}}"] * 5, cfg=cfg)
    assert [o.final_correct for o in out] == [True, False, True, False, True]
    assert time.time() - t0 < 2 * cfg.timeout_s + 3.0
    assert R.answers_match(good[8:-9], "\\frac{1}{\\sqrt{2}}", cfg=cfg)   # workers restarted


def test_verifier_workers_exit_when_the_parent_is_killed(tmp_path):
    """kill -9 of a training run must not leave math-verify helper processes behind."""
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, time, reward\n"
            "assert reward.answers_match(r'\\frac{1}{2}', r'\\sqrt{\\frac{1}{4}}')\n"
            "print(' '.join(str(p.pid) for p, _, _ in reward._MV.workers.values()), flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert pids, "the LaTeX comparison should have gone through a helper process"
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [q for q in pids if os.path.exists(f"/proc/{q}") and "Z" not in open(f"/proc/{q}/stat").read().split()[2]]
    assert not alive, f"helper processes {alive} outlived their killed parent"
