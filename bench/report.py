"""
How big is the demo's report, and how fast does a browser open it?

    python bench/report.py                       # 300 test items x 5 evaluations, synthesized
    python bench/report.py --page runs/demo/report.html --screenshot docs/report.png

The demo's report (pipeline.py -> runs/demo/report.html) shows the 300 items of the built-in
task's test split under five evaluations (base and plain GRPO with the single-pass prompt, stage
1 and SRPO with the reflection prompt, the blind control). This script builds a page of that
shape without training anything: the real test split (task.py, seed 0) and, per item and
evaluation, a response made of the record's own worked solution (first pass), a reflection of
realistic length and a second pass, its case drawn at random (wrong answers are off by one).
Then it opens the page in headless Chromium (network refused) several times and prints:

    size        the file's size in MB
    render      the page's own clock when its script has drawn the first page of items
                (performance.now(), from the start of navigation)
    wall        the whole headless browser run (start, load, draw, dump, exit)
    ratio       wall of the report / wall of an empty page, measured in the same run (the
                browser's own start-up is most of both)

--page measures an existing report instead; --screenshot also writes a PNG of it (the README's).
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo import task   # noqa: E402  (the bench knows the built-in task; support/report.py does not)
from support import report   # noqa: E402

EVALS = {"single": ["base", "grpo"], "reflect": ["sft", "srpo"], "blind": ["base"]}
REFLECTION = ("Let me check the first attempt against the image. I listed {n} objects; looking again at each "
              "row from the top left, the colours and shapes are as I said, so the count for the question is "
              "{verdict}. The arithmetic step also needs checking: I add the two counts again.")


def synth_response(rec, rng, prompt):
    """A response of realistic length: the record's worked solution as the first pass, then (reflection
    prompt) a reflection and a second pass; the case drawn at random."""
    worked = rec["messages"][-1]["content"]                        # <think>...</think>\n<answer>gt</answer>
    think = re.search(r"<think>(.*?)</think>", worked, re.S).group(1)
    gt = str(rec["answer"])
    wrong = str(int(gt) + 1) if gt.lstrip("-").isdigit() else gt + "x"
    case = rng.choice(["r2r"] * 5 + ["w2r"] * 2 + ["r2w", "w2w", "w2w"])
    a1, a2 = (gt if case[0] == "r" else wrong), (gt if case[2] == "r" else wrong)
    if prompt != "reflect":
        return f"<think>{think}</think>\n<answer>{a1}</answer>"
    refl = REFLECTION.format(n=len(rec["scene"]["objects"]), verdict="right" if case[2] == "r" else "different")
    return (f"<think>{think}</think>\n<answer>{a1}</answer>\n<reflection>{refl}</reflection>\n"
            f"<think>{think} Checked again: the answer is {a2}.</think>\n<answer>{a2}</answer>")


def build(tmp, n_items=300, seed=0):
    """The synthesized eval.py folders of the demo's shape -> their paths."""
    _, test = task.make_task(os.path.join(tmp, "task"), task.TaskConfig(n_train=1, n_test=n_items, n_val=1, seed=0))
    recs = [json.loads(l) for l in open(test)]
    rng, dirs = random.Random(seed), []
    for e, models in EVALS.items():
        d = os.path.join(tmp, "eval", e)
        os.makedirs(os.path.join(d, "predictions"))
        prompt = "reflect" if e == "reflect" else "single"
        for m in models:
            with open(os.path.join(d, "predictions", f"{m}__test.jsonl"), "w") as f:
                for r in recs:
                    text = synth_response(r, rng, prompt)
                    f.write(json.dumps(dict(id=r["id"], sample=0, answer=r["answer"], response=text, reward=None,
                                            length=len(text) // 4, finish="stop",
                                            metrics={"scene_list_ok": rng.random() < 0.85})) + "\n")
        cfg = dict(data=[test], prompt=prompt, shuffle_images=e == "blind", seed=0)
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(dict(config=cfg, results=[dict(checkpoint=m, dataset="test", path="", metrics={})
                                                for m in models]), f)
        dirs.append(d)
    return dirs


def chromium():
    import shutil
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("bench/report.py: chromium is not installed (Debian: apt-get install chromium)")
    return exe


def open_page(path, profile, screenshot=None, size="1280,1600"):
    """(wall seconds, the DOM) of one headless Chromium run with the network refused."""
    args = [chromium(), "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", f"--user-data-dir={profile}",
            f"--window-size={size}", f"--screenshot={screenshot}" if screenshot else "--dump-dom",
            f"file://{os.path.abspath(path)}"]
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        sys.exit(f"bench/report.py: chromium failed on {path}: {p.stderr[-1000:]}")
    return time.perf_counter() - t0, p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--page", help="an existing report to measure (default: synthesize the demo's shape)")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--screenshot", help="also write a PNG of the page here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page = a.page
        if page is None:
            t0 = time.perf_counter()
            page = os.path.join(tmp, "report.html")
            report.write_eval_report(page, build(tmp, a.items), provenance={"note": "synthesized by bench/report.py"})
            print(f"built {page} in {time.perf_counter() - t0:.1f} s")
        empty = os.path.join(tmp, "empty.html")
        with open(empty, "w") as f:
            f.write("<!doctype html><title>empty</title><body>empty</body>")
        walls, base, renders = [], [], []
        for k in range(a.repeats):     # interleaved: both see the same machine load
            base.append(open_page(empty, os.path.join(tmp, f"p{k}e"))[0])
            wall, dom = open_page(page, os.path.join(tmp, f"p{k}"))
            walls.append(wall)
            renders.append(float(re.search(r'data-render-ms="([0-9.]+)"', dom).group(1)))
            errors = re.search(r'data-errors="([^"]*)"', dom)
            if errors is None or errors.group(1) != "[]":
                sys.exit(f"bench/report.py: the page reported errors: {errors.group(1) if errors else 'none recorded'}")
        size = os.path.getsize(page) / 1e6
        print(f"size {size:.2f} MB; render {statistics.median(renders):.0f} ms (median of {a.repeats}: "
              f"{', '.join(f'{r:.0f}' for r in renders)}); wall {statistics.median(walls):.2f} s vs empty page "
              f"{statistics.median(base):.2f} s: ratio {statistics.median(walls) / statistics.median(base):.2f}")
        if a.screenshot:
            open_page(page, os.path.join(tmp, "shot"), screenshot=os.path.abspath(a.screenshot))
            print(f"screenshot {a.screenshot}: {os.path.getsize(a.screenshot) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
