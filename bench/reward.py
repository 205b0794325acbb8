"""Throughput of reward.score_batch on rollout-like batches (groups of 8 responses per prompt).

    python bench/reward.py [--n 2048]

Three mixes: built-in task (integer answers: the pure-Python fast path), multiple choice
(letters / option text), and LaTeX answers (every response goes through answers.py's math-verify
helper processes). The last line is the LaTeX throughput with the most workers over that with one
(the math-verify pool's speed-up). Token counts use reward.default_count_tokens (pass the policy tokenizer's
encode length in training; its cost is the tokenizer's, not the reward's).
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward as R  # noqa: E402


def response(rng, a1, a2, two_pass=True):
    think = " ".join(rng.choice(["count", "the", "red", "shapes", "there", "are", "3", "4"])
                     for _ in range(rng.randint(20, 60)))
    if not two_pass:
        return f"<think>{think}</think>\n<answer>{a2}</answer>"
    return (f"<think>{think}</think>\n<answer>{a1}</answer>\n<reflection>I should recount the "
            f"squares, I missed one.</reflection>\n<think>{think[: len(think) // 2]}</think>\n"
            f"<answer>{a2}</answer>")


def make(mix, n, rng):
    resps, gts = [], []
    for i in range(n // 8):
        if mix == "task":
            gt = str(rng.randint(0, 12))
            cands = [gt, str(rng.randint(0, 12)), f"\\boxed{{{gt}}}", f"The answer is {gt}."]
        elif mix == "choice":
            gt = rng.choice("ABCD")
            cands = [gt, f"({rng.choice('ABCD')})", f"The answer is {gt}", f"\\boxed{{{gt}}}"]
        else:
            gt = rng.choice(["\\frac{\\sqrt{2}}{2}", "2\\sqrt{3}", "\\frac{\\pi}{4}", "x^2+1"])
            cands = ["\\frac{1}{\\sqrt{2}}", "\\sqrt{12}", "\\pi/4", "1+x^2", "\\sqrt{3}"]
        for _ in range(8):
            resps.append(response(rng, rng.choice(cands), rng.choice(cands), rng.random() < 0.8))
            gts.append(gt)
    return resps, gts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    args = ap.parse_args()
    rng = random.Random(0)
    runs = [("task", 1), ("choice", 1)] + [("latex", w) for w in (1, 2, 4, 8) if w <= os.cpu_count()]
    latex = {}   # workers -> responses/s
    for mix, workers in runs:
        resps, gts = make(mix, args.n if mix != "latex" else args.n // 4, rng)
        cfg = R.RewardConfig(verify_workers=workers)
        R.score_batch(resps[:64], gts[:64], "srpo", cfg=cfg)   # fork and warm the workers
        t0 = time.perf_counter()
        out = R.score_batch(resps, gts, "srpo", cfg=cfg)
        dt = time.perf_counter() - t0
        acc = sum(o.final_correct for o in out) / len(out)
        print(f"{mix:7s} {len(resps):5d} responses  {workers} math-verify workers  "
              f"{len(resps) / dt:8.0f} responses/s  (final correct {acc:.2f})")
        if mix == "latex":
            latex[workers] = len(resps) / dt
    most = max(latex)
    print(f"latex speed-up with {most} workers over 1: {latex[most] / latex[1]:.2f}x")


if __name__ == "__main__":
    main()
