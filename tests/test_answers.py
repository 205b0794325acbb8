"""answers.py against hand-written expected values: letters, numbers, words, LaTeX, bad ground truths."""
import os
import random
import time

import pytest

from support import answers as A
from support.answers import BadGroundTruth, MatchConfig

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
    assert A.answers_match(pred, gt, options) is expected




@pytest.mark.parametrize("gt", ["", "   ", "???", "\\frac{", "$$", None, "\x00\x01\x02", [3]])
def test_bad_ground_truth_raises(gt):
    with pytest.raises(BadGroundTruth):
        A.answers_match("3", gt)
    with pytest.raises(BadGroundTruth):
        A.check_ground_truth(gt)


def test_units_are_general():
    # common units and count nouns are stripped from numbers; no word of the built-in task is
    # (\"4 shapes\" is left to math-verify, which reads it as a product of symbols)
    assert A.number_of("12 cm") == (12, False)
    assert A.number_of("3 items") == (3, False)
    assert A.number_of("4 shapes") is None
    assert "shapes" not in A._UNIT_RE.pattern


@pytest.mark.parametrize("gt,options", [
    ("B", None), ("(C)", None), ("12", None), ("-0.5", None), ("3/4", None), ("75%", None),
    ("12 cm", None), ("red", None), ("yes", None), ("12", ["10", "12", "14"]), ("blue", COLORS),
    (7, None), (2.5, None),
])
def test_check_ground_truth_accepts_readable_answers_without_math_verify(gt, options, monkeypatch):
    # letters, numbers and words are decided in Python: loading a data file costs no process
    def no_math_verify(*a, **k):
        raise AssertionError("math-verify was asked")
    monkeypatch.setattr(A, "_MV", no_math_verify)
    assert A.check_ground_truth(gt, options, where="train.jsonl:3") is None


def test_check_ground_truth_latex_goes_to_math_verify_once(monkeypatch):
    calls = []
    real = A._MV

    def counting(jobs, *a, **k):
        calls.append(jobs)
        return real(jobs, *a, **k)

    monkeypatch.setattr(A, "_MV", counting)
    gt = "\\frac{\\sqrt{3}}{7}"   # a value no other test uses, so the parse cache is cold
    A.check_ground_truth(gt)
    A.check_ground_truth(gt)
    assert calls == [[(gt, [])]]   # parsed once, then remembered


@pytest.mark.parametrize("gt", ["\u221a3", "???", "", None, [1]])
def test_check_ground_truth_names_the_record(gt):
    # an unreadable ground truth must stop the run when the file is loaded, naming the record
    with pytest.raises(BadGroundTruth, match=r"^data/train\.jsonl line 7: ground truth"):
        A.check_ground_truth(gt, where="data/train.jsonl line 7")
    with pytest.raises(BadGroundTruth, match=r"^ground truth"):
        A.check_ground_truth(gt)


def test_match_batch():
    preds = [["3", "4"], ["(B)"], [], ["\\frac{2}{4}", "\\sqrt{2}"]]
    gts = ["4", "B", "4", "\\frac{1}{2}"]
    assert A.match_batch(preds, gts) == [[False, True], [True], [], [True, False]]
    assert A.match_batch([["12"]], ["B"], [["10", "12"]]) == [[True]]
    with pytest.raises(BadGroundTruth, match=r"^item 1: ground truth '\?\?\?'"):
        A.match_batch([["3"], ["3"]], ["3", "???"], where="item {i}: ")


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
        assert A.answers_match(p, g) == verify(parse("$" + g + "$"), parse("$" + p + "$")), (p, g)


def _match_sqrt(_):
    return A.answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")


def test_works_in_daemonic_process():
    # Pool / DataLoader workers may not start helper processes: in-process fallback
    import multiprocessing as mp
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(_match_sqrt, [0, 1]) == [True, True]


def test_verifier_workers_exit_when_the_parent_is_killed(tmp_path):
    """kill -9 of a training run must not leave math-verify helper processes behind."""
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, time\nfrom support import answers\n"
            "assert answers.answers_match(r'\\frac{1}{2}', r'\\sqrt{\\frac{1}{4}}')\n"
            "print(' '.join(str(p.pid) for p, _, _ in answers._MV.workers.values()), flush=True)\n"
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


def test_match_config_tolerance():
    assert not A.answers_match("0.33", "1/3")                                # rel_tol 1e-6
    assert A.answers_match("0.33", "1/3", cfg=MatchConfig(rel_tol=0.02))     # |0.33 - 1/3| = 0.0033
    assert not A.answers_match("0.3", "1/3", cfg=MatchConfig(rel_tol=0.02))  # 0.033 > 0.02
