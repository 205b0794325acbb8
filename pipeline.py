"""
The whole SRPO pipeline on the built-in task, one command, on a laptop CPU:

    python pipeline.py                      # -> runs/demo/results.md

    task      task.py          procedural images + questions, train/test splits
    base      sft.py           tiny tokenizer + tiny Qwen2.5-VL trained from scratch (single pass)
    reflect   reflect_data.py  base model answers, rule-based teacher reflects -> two-pass SFT data
    sft       sft.py           stage 1: reflection SFT from the base model
    srpo      grpo.py          stage 2: reflection-aware GRPO (SRPO reward) from stage 1
    grpo      grpo.py          baseline: plain GRPO (format + accuracy) from the base model
    eval      eval.py          greedy test accuracy, first vs final answer, reflection cases, and
                               a blind control: the base model asked with another question's image

Each stage is its own script run as a subprocess (its own progress bar and log); a stage whose
output is complete is skipped, and every script resumes where it stopped, so rerunning the
command after a crash or Ctrl-C continues the pipeline. `--quick` runs a shortened version
(tiny data, few steps) that the slow test uses to check that every stage's output exists and loads.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# Stage settings: the default demo (about 40 min on 2 CPU cores) and --quick (the slow test).
FULL = dict(task=[], base=[],
            reflect=["--attempts", "4", "--limit", "1500", "--temperature", "0.7"],
            sft=["--lr", "1e-3", "--min_lr", "1e-4", "--epochs", "8"],
            grpo=["--eval_every", "0"],  # grpo.py's defaults: 200 steps, lr 3e-5, KL beta 0.04
            eval=["--batch-size", "64", "--max-new-tokens", "256"])
QUICK = dict(task=["--n-train", "96", "--n-test", "16"],
             base=["--max_steps", "60", "--batch_size", "16", "--warmup_steps", "5"],
             reflect=["--limit", "32", "--temperature", "0.3", "--correct-frac", "-1", "--attempts", "4"],
             sft=["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4"],
             grpo=["--steps", "1", "--prompts_per_step", "2", "--group_size", "2", "--eval_every", "0"],
             eval=["--limit", "4"])


def stages(run, quick):
    """-> list of (name, file that marks it done, argv)."""
    py, k = sys.executable, (QUICK if quick else FULL)
    task, train, test = f"{run}/task", f"{run}/task/train.jsonl", f"{run}/task/test.jsonl"
    return [
        ("task", f"{task}/manifest.json", [py, "task.py", "--out", task, *k["task"]]),
        ("base", f"{run}/base/model.safetensors",
         [py, "sft.py", "--data", train, "--tokenizer_corpus", f"{task}/tokenizer_corpus.jsonl", "--out", f"{run}/base",
          *k["base"]]),
        ("reflect", f"{run}/reflect/summary.json",
         [py, "reflect_data.py", "--policy", f"{run}/base", "--data", train, "--out", f"{run}/reflect/train.jsonl",
          "--teacher", "rule", *k["reflect"]]),
        ("sft", f"{run}/sft/model.safetensors",
         [py, "sft.py", "--data", f"{run}/reflect/train.jsonl", "--init", f"{run}/base", "--out", f"{run}/sft", *k["sft"]]),
        ("srpo", f"{run}/srpo/model.safetensors",
         [py, "grpo.py", "--model", f"{run}/sft", "--train", train, "--test", test, "--out", f"{run}/srpo",
          "--reward", "srpo", "--extra_metrics", "task:rollout_metrics", *k["grpo"]]),
        ("grpo", f"{run}/grpo/model.safetensors",
         [py, "grpo.py", "--model", f"{run}/base", "--train", train, "--test", test, "--out", f"{run}/grpo",
          "--reward", "grpo", "--extra_metrics", "task:rollout_metrics", *k["grpo"]]),
        ("eval-single", f"{run}/eval/single/metrics.json",
         [py, "eval.py", "--model", f"{run}/base", f"{run}/grpo", "--data", test, "--prompt", "single",
          "--out", f"{run}/eval/single", "--metric", "task:scene_list_ok", *k["eval"]]),
        ("eval-reflect", f"{run}/eval/reflect/metrics.json",
         [py, "eval.py", "--model", f"{run}/sft", f"{run}/srpo", "--data", test, "--prompt", "reflect",
          "--out", f"{run}/eval/reflect", "--metric", "task:scene_list_ok", *k["eval"]]),
        # blind control: the same questions, each with another question's image
        ("eval-blind", f"{run}/eval/blind/metrics.json",
         [py, "eval.py", "--model", f"{run}/base", "--data", test, "--prompt", "single", "--shuffle-images",
          "--out", f"{run}/eval/blind", "--metric", "task:scene_list_ok", *k["eval"]]),
    ]


def results_table(run, times):
    """Collect eval metrics into one markdown table (one row per model) -> str."""
    head = "| model | prompt | first acc | final acc | w2r | r2w | r2r | w2w | single | format | mean len | scene list |\n" \
           "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    body = ""
    for prompt in ("single", "reflect", "blind"):
        if not os.path.exists(f"{run}/eval/{prompt}/metrics.json"):
            continue
        with open(f"{run}/eval/{prompt}/metrics.json") as f:
            for r in json.load(f)["results"]:
                m = r["metrics"]
                label = "single, shuffled images" if prompt == "blind" else prompt
                body += (f"| {r['checkpoint']} | {label} | {m['first_acc']:.3f} | {m['final_acc']:.3f} | {m['w2r']} "
                         f"| {m['r2w']} | {m['r2r']} | {m['w2w']} | {m['single']} | {m['format']:.3f} | {m['mean_len']:.1f} "
                         f"| {m.get('scene_list_ok', float('nan')):.3f} |\n")
    wall = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    return head + body + f"\nwall time per stage: {wall}; total {sum(times.values()) / 60:.1f} min\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the whole SRPO pipeline on the built-in task")
    ap.add_argument("--run", default="runs/demo", help="output directory of the run")
    ap.add_argument("--quick", action="store_true", help="shortened pipeline (end-to-end test)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    a = ap.parse_args(argv)
    run = os.path.abspath(a.run)
    os.makedirs(run, exist_ok=True)
    plan = stages(run, a.quick)
    # One torch thread per process unless told otherwise: these models are tiny, and on a busy
    # 2-core machine a second spinning OpenMP thread costs far more than it gives (up to 10x).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    times_path = f"{run}/times.json"
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for i, (name, done, cmd) in enumerate(plan):
        if a.only is not None and name not in a.only:
            continue
        if os.path.exists(done):
            print(f"[pipeline] {i + 1}/{len(plan)} {name}: done ({os.path.relpath(done)}), skipping", flush=True)
            continue
        print(f"[pipeline] {i + 1}/{len(plan)} {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=HERE, env=env)
        if rc != 0:
            sys.exit(f"[pipeline] stage {name} failed (exit {rc}); fix and rerun the same command to resume")
        times[name] = times.get(name, 0.0) + time.time() - t0
        with open(times_path, "w") as f:
            json.dump(times, f, indent=1)
    if not all(os.path.exists(f"{run}/eval/{p}/metrics.json") for p in ("single", "reflect")):
        return  # --only without the eval stages: no table yet
    table = results_table(run, times)
    with open(f"{run}/results.md", "w") as f:
        f.write(table)
    logs = [p for p in (f"{run}/base/log.jsonl", f"{run}/sft/log.jsonl", f"{run}/srpo/log.jsonl", f"{run}/grpo/log.jsonl")
            if os.path.exists(p)]
    subprocess.call([sys.executable, "eval.py", "--plot", *logs, "--out", f"{run}/curves.png"], cwd=HERE)
    print(table)
    print(f"[pipeline] results in {run}/results.md, curves in {run}/curves.png")


if __name__ == "__main__":
    main()
