"""
The whole SRPO pipeline on the built-in task, one command, on a laptop CPU:

    python pipeline.py                      # -> runs/demo/results.md, runs/demo/report.html

    task      task.py          procedural images + questions, train/test splits
    base      sft.py           tiny tokenizer + tiny Qwen2.5-VL trained from scratch (single pass)
    compile   (this file)      beside base: warms torch.compile's cache for the sampler's decode graphs
    reflect   reflect_data.py  base model answers, rule-based teacher reflects -> two-pass SFT data
    sft       sft.py           stage 1: reflection SFT from the base model
    srpo      grpo.py          stage 2: reflection-aware GRPO (SRPO reward) from stage 1
    grpo      grpo.py          baseline: plain GRPO (format + accuracy) from the base model
    eval      eval.py          greedy test accuracy, first vs final answer, reflection cases, and
                               a blind control: the base model asked with another question's image

Each stage is its own script run as a subprocess (its own progress bar and log); a stage whose
output is complete is skipped, and every script resumes where it stopped, so rerunning the
command after a crash or Ctrl-C continues the pipeline. `--quick` runs a shortened version
(tiny data, few steps, no compile stage) that the slow test uses to check that every stage's
output exists and loads. Independent stages run at once (`--jobs 2`), the cores split between
them (`--threads`); the training stages take the cores a finished stage frees.

`--ablation` adds the paper's ablations in miniature to the same run (SRPO with the official code's
reward, without f_len, without I_eff, from the base model without reflection SFT; stage 1 with the
paper's SFT target) and their rows to results.md. `--summarize RUN RUN ...` prints runs of different
seeds side by side with mean +- standard error, then each of the demo's claims (CLAIMS: plain GRPO over
base, SRPO over stage 1 ...) as a difference paired by run, and runs nothing.

Seeds: `--seed N` (default 0) is passed to every training and sampling stage (base, reflect,
sft, srpo, grpo); the task keeps its own `--task-seed` (default 0), so runs with different
`--seed` are scored on the same test questions and their numbers can be averaged into
mean +- standard error. A run directory remembers its seeds (pipeline.json) and refuses to
resume with others; `--seed N` alone writes to runs/demo-seedN.

Provenance: results.md starts with what produced it -- git commit (and whether the tree had
uncommitted changes), seeds, torch and Python versions, CPU model, threads, date, and the wall
time of every stage, their sum and the command's own wall time -- because the same code and seeds gave a base model that
lists the scene right for 83% of test images on one machine and 47% on another.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from support.report import git_commit

HERE = os.path.dirname(os.path.abspath(__file__))


# Stage settings: the default demo (docs/LOG.md "Performance": its wall time measured alone on 2 cores,
# stages run two at a time with the cores split between them) and --quick (the slow test).
# base: 1.8 epochs (1800 steps of 16). The base model learns to list the scene in one late phase
# (colours, counts and shapes together; docs/demo_diagnosis.md) that starts near step 700 and ends
# between steps ~1100 and ~1400 depending on the seed and the machine's float rounding, whatever
# the lr schedule. A 1300-step schedule stopped inside that phase on some machines (test scene list
# 0.38 on one, 0.89 on another); 1800 steps end 400-700 steps after it (docs/demo_paths.md).
# The longer base is paid for within the 20-minute demo by the RL stages' 50 steps (not 100;
# docs/rl_search.md: on val, 100 steps did not move the greedy answer either).
FULL = dict(task=[], base=["--epochs", "1.8", "--micro_batch_size", "16"],
            reflect=["--attempts", "4", "--limit", "1500", "--temperature", "0.7"],
            sft=["--lr", "1e-3", "--min_lr", "1e-4", "--epochs", "8", "--micro_batch_size", "16"],
            # grpo.py's defaults (lr 3e-5, KL beta 0.04, 16 prompts x 8 samples, 200 steps of 2
            # optimizer steps) cut for the 20-minute demo: 8 prompts per step, 4 mini-batches (one
            # per 2 prompts), 50 steps (200 optimizer steps)
            grpo=["--steps", "50", "--prompts_per_step", "8", "--n_minibatches", "4", "--eval_every", "0"],
            eval=["--batch-size", "64", "--max-new-tokens", "256"])
QUICK = dict(task=["--n-train", "96", "--n-test", "16", "--n-val", "8"],
             base=["--max_steps", "60", "--batch_size", "16", "--warmup_steps", "5"],
             reflect=["--limit", "32", "--temperature", "0.3", "--correct-frac", "-1", "--attempts", "4"],
             sft=["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4"],
             grpo=["--steps", "1", "--prompts_per_step", "2", "--group_size", "2", "--eval_every", "0"],
             eval=["--limit", "4"])


# eval.py --metric of every evaluation: the whole scene listed right, the share of its objects named
# right, and whether the answer is the one the response's own list implies (demo/task.py)
TASK_METRICS = ("demo.task:scene_list_ok", "demo.task:scene_objects", "demo.task:answer_follows_list")


def stages(run, quick, seed=0, task_seed=0):
    """-> list of (name, file that marks it done, argv). seed goes to every training / sampling
    stage, task_seed to task.py only."""
    py, k = sys.executable, (QUICK if quick else FULL)
    task, train, test = f"{run}/task", f"{run}/task/train.jsonl", f"{run}/task/test.jsonl"
    sd = ["--seed", str(seed)]
    return [
        ("task", f"{task}/manifest.json", [py, "-m", "demo.task", "--out", task, "--seed", str(task_seed), *k["task"]]),
        ("base", f"{run}/base/model.safetensors",
         [py, "sft.py", "--data", train, "--tokenizer_corpus", f"{task}/tokenizer_corpus.jsonl", "--out", f"{run}/base",
          *sd, *k["base"]]),
        *([] if quick else [("compile", f"{run}/logs/compile.json", [py, "pipeline.py", "--warm-compile", run])]),
        # the perception gate: the base model's scene list on val, checked before any RL stage starts
        *([] if quick else [("gate", f"{run}/eval/gate/metrics.json",
                             [py, "eval.py", "--model", f"{run}/base", "--data", f"{task}/val.jsonl", "--prompt", "single",
                              "--out", f"{run}/eval/gate", "--metric", *TASK_METRICS, *k["eval"]])]),
        ("reflect", f"{run}/reflect/summary.json",
         [py, "reflect_data.py", "--policy", f"{run}/base", "--data", train, "--out", f"{run}/reflect/train.jsonl",
          "--teacher", "rule", *sd, *k["reflect"]]),
        ("sft", f"{run}/sft/model.safetensors",
         [py, "sft.py", "--data", f"{run}/reflect/train.jsonl", "--init", f"{run}/base", "--out", f"{run}/sft",
          *sd, *k["sft"]]),
        ("srpo", f"{run}/srpo/model.safetensors",
         [py, "grpo.py", "--model", f"{run}/sft", "--train", train, "--test", test, "--out", f"{run}/srpo",
          "--reward", "srpo", "--extra_metrics", "demo.task:rollout_metrics", *sd, *k["grpo"]]),
        ("grpo", f"{run}/grpo/model.safetensors",
         [py, "grpo.py", "--model", f"{run}/base", "--train", train, "--test", test, "--out", f"{run}/grpo",
          "--reward", "grpo", "--extra_metrics", "demo.task:rollout_metrics", *sd, *k["grpo"]]),
        ("eval-single", f"{run}/eval/single/metrics.json",
         [py, "eval.py", "--model", f"{run}/base", f"{run}/grpo", "--data", test, "--prompt", "single",
          "--out", f"{run}/eval/single", "--metric", *TASK_METRICS, *k["eval"]]),
        ("eval-reflect", f"{run}/eval/reflect/metrics.json",
         [py, "eval.py", "--model", f"{run}/sft", f"{run}/srpo", "--data", test, "--prompt", "reflect",
          "--out", f"{run}/eval/reflect", "--metric", *TASK_METRICS, *k["eval"]]),
        # blind control: the same questions, each with another question's image
        ("eval-blind", f"{run}/eval/blind/metrics.json",
         [py, "eval.py", "--model", f"{run}/base", "--data", test, "--prompt", "single", "--shuffle-images",
          "--out", f"{run}/eval/blind", "--metric", *TASK_METRICS, *k["eval"]]),
    ]


# The paper's ablations (the paper's Table 4) in miniature, added by --ablation to the same
# run directory (they reuse its base and stage-1 models). Each row changes one thing of the SRPO
# stage, or of stage 1 for the SFT target; everything else is the default run's.
#   name           what changes                                    the paper's row (7B: SRPO 53.5)
ABLATIONS = {
    "srpo-code":   (["--reward_preset", "code"], "sft"),      # the official code's reward     (not in the paper)
    "srpo-nolen":  (["--length_weight", "0"], "sft"),         # alpha = 0                        w/o f_len 53.1
    "srpo-noeff":  (["--effectiveness", "0"], "sft"),         # I_eff = 0                        w/o I_eff 52.0
    "srpo-nosft":  ([], "base"),                              # RL from the base model           w/o SFT 51.2
}                                                             # stage 1 alone (the main run's sft) w/o RL 46.6


def ablation_stages(run, quick, seed=0):
    """-> the --ablation stages, in stages()' format: four SRPO variants, stage 1 with the paper's
    SFT target (Eq. 1: first attempt, reflection, ground-truth answer; no second reasoning), and
    one evaluation of all five with the reflection prompt."""
    py, k = sys.executable, (QUICK if quick else FULL)
    train, test, sd, ab = f"{run}/task/train.jsonl", f"{run}/task/test.jsonl", ["--seed", str(seed)], f"{run}/ablation"
    out = [(name, f"{ab}/{name}/model.safetensors",
            [py, "grpo.py", "--model", f"{run}/{init}", "--train", train, "--out", f"{ab}/{name}", "--reward", "srpo",
             "--extra_metrics", "demo.task:rollout_metrics", *sd, *k["grpo"], *flags])
           for name, (flags, init) in ABLATIONS.items()]
    out += [("reflect-paper", f"{ab}/reflect-paper/summary.json",
             [py, "reflect_data.py", "--policy", f"{run}/base", "--data", train, "--out", f"{ab}/reflect-paper/train.jsonl",
              "--teacher", "rule", "--target", "paper", *sd, *k["reflect"]]),
            ("sft-paper", f"{ab}/sft-paper/model.safetensors",
             [py, "sft.py", "--data", f"{ab}/reflect-paper/train.jsonl", "--init", f"{run}/base", "--out", f"{ab}/sft-paper",
              *sd, *k["sft"]]),
            ("eval-ablation", f"{run}/eval/ablation/metrics.json",
             [py, "eval.py", "--model", *[f"{ab}/{n}" for n in (*ABLATIONS, "sft-paper")], "--data", test,
              "--prompt", "reflect", "--out", f"{run}/eval/ablation", "--metric", *TASK_METRICS, *k["eval"]])]
    return out


# What each stage reads: a stage starts once these are done, so with --jobs 2 the compile stage runs
# beside base, and the plain-GRPO branch (grpo, eval-single, eval-blind) beside the SRPO branch
# (reflect, sft, srpo, eval-reflect). The RL branches also wait for the perception gate.
NEEDS = {"task": [], "base": ["task"], "compile": ["task"], "gate": ["base"], "reflect": ["base", "gate"], "sft": ["reflect"],
         "srpo": ["sft"], "grpo": ["base", "gate"],
         "eval-single": ["grpo"], "eval-reflect": ["srpo"], "eval-blind": ["base"],
         **{name: [init] for name, (_, init) in ABLATIONS.items()}, "reflect-paper": ["base"],
         "sft-paper": ["reflect-paper"], "eval-ablation": [*ABLATIONS, "sft-paper"]}


# The perception gate: RL on a base model that does not see the image measures nothing (its answers
# come from the question's text alone), so the pipeline checks the base model's scene list on val
# before it spends time on RL. Stages up to the gate run first; the rest only when it passes.
PERCEPTION_BAR = 0.85
BEFORE_GATE = ("task", "base", "compile", "gate")


def gate_result(run):
    """-> the base model's scene-list accuracy on val from the gate stage, or None (not run)."""
    path = f"{run}/eval/gate/metrics.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["results"][0]["metrics"].get("scene_list_ok")


def gate_message(value, bar=PERCEPTION_BAR):
    """One line for the console and results.md: the gate's verdict."""
    if value >= bar:
        return f"base model on val: scene list {value:.3f} >= {bar} (perception gate passed)"
    return (f"the base model does not perceive the scene (scene list {value:.2f} < {bar} on val): RL results "
            f"would not be meaningful; stopped before RL (--no-gate continues anyway)")


def thread_shares(names, cores) -> dict:
    """The machine's cores split between the stages running at once: {name: torch threads}."""
    n = max(1, len(names))
    return {name: max(1, cores // n + (i < cores % n)) for i, name in enumerate(names)}


def write_shares(shares, log_dir):
    """Each running stage's share to log_dir/NAME.threads (atomically): its training loop rereads it
    every step (training.follow_thread_budget), so a stage left alone takes the freed cores."""
    for name, n in shares.items():
        path = f"{log_dir}/{name}.threads"
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(path + ".tmp", path)


def run_plan(plan, jobs, env, log_dir, on_done, cores=1):
    """Run the plan's stages, at most `jobs` at once, each as soon as the stages it needs are done.
    A stage whose output exists is skipped. With jobs > 1 each stage's output goes to
    log_dir/NAME.log (interleaved progress bars are unreadable). The `cores` are split between the
    running stages (thread_shares): a stage starts with its share as OMP_NUM_THREADS, and the
    training stages follow their share as it changes. on_done(name, seconds) is called when a
    stage succeeds; the first failure stops new starts and exits after the running ones end."""
    done = {name for name, marker, _ in plan if os.path.exists(marker)}
    for name in sorted(done, key=[n for n, _, _ in plan].index):
        print(f"[pipeline] {name}: done, skipping", flush=True)
    todo = [(name, cmd) for name, marker, cmd in plan if name not in done]
    names = {name for name, _, _ in plan}
    running, failed = {}, None          # name -> (process, start time, log file)
    os.makedirs(log_dir, exist_ok=True)
    while todo or running:
        ready = [(n, c) for n, c in todo if all(d in done or d not in names for d in NEEDS[n])]
        start = ready[:max(0, jobs - len(running))] if failed is None else []
        shares = thread_shares([*running, *(n for n, _ in start)], cores)
        write_shares(shares, log_dir)
        for name, cmd in start:
            todo.remove((name, cmd))
            log = open(f"{log_dir}/{name}.log", "w") if jobs > 1 else None
            print(f"[pipeline] {name}: {' '.join(cmd[1:])}  ({shares[name]} thread{'s' * (shares[name] > 1)})"
                  + (f"  (log: {log.name})" if log else ""), flush=True)
            stage_env = dict(env, OMP_NUM_THREADS=str(shares[name]), SRPO_THREADS_FILE=f"{log_dir}/{name}.threads")
            running[name] = (subprocess.Popen(cmd, cwd=HERE, env=stage_env, stdout=log,
                                              stderr=subprocess.STDOUT if log else None), time.time(), log)
        if failed is not None and not running:
            break
        if not running:     # nothing runnable: a stage's input is missing and not in this plan
            sys.exit(f"[pipeline] cannot start {[n for n, _ in todo]}: they need {[NEEDS[n] for n, _ in todo]}")
        time.sleep(0.5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if log:
                log.close()
            if proc.returncode != 0:
                failed = failed or (name, proc.returncode, log.name if log else None)
                continue
            done.add(name)
            write_shares(thread_shares(list(running), cores), log_dir)  # the freed cores go to the others
            on_done(name, time.time() - t0)
            print(f"[pipeline] {name}: finished in {time.time() - t0:.0f} s", flush=True)
    if failed is not None:
        name, rc, log = failed
        tail = "".join(open(log).readlines()[-15:]) if log else ""
        sys.exit(f"{tail}[pipeline] stage {name} failed (exit {rc}){'; log: ' + log if log else ''}; "
                 f"fix and rerun the same command to resume")


@dataclass
class Provenance:
    """What produced a run's numbers (written at the top of results.md)."""
    commit: str                 # git HEAD of this checkout, "+ uncommitted changes" when the tree is dirty
    seed: int                   # every training / sampling stage
    task_seed: int              # task.py
    torch: str
    python: str
    cpu: str                    # CPU model name
    cpus: int                   # logical CPUs of the machine
    threads: str                # torch threads the stages ran with
    started: str                # UTC, ISO 8601
    finished: str
    stage_s: dict = field(default_factory=dict)   # stage -> wall seconds (summed over resumed runs)
    wall_s: float = 0.0         # the command's own wall time (summed over resumed runs): less than
                                # the stage sum, since independent stages run at once

    @property
    def total_s(self):
        return sum(self.stage_s.values())


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The first 'model name' of /proc/cpuinfo (Linux), else platform.processor(), else 'unknown'."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect_provenance(seed, task_seed, threads, started, stage_s, wall_s=0.0):
    import torch  # here, not at the top: the pipeline itself needs no torch until it reports
    return Provenance(commit=git_commit(), seed=seed, task_seed=task_seed, torch=torch.__version__,
                      python=platform.python_version(), cpu=cpu_model(), cpus=os.cpu_count() or 0,
                      threads=threads, started=started, finished=now_utc(), stage_s=dict(stage_s),
                      wall_s=wall_s)


def provenance_md(p: Provenance):
    """The provenance as a markdown list."""
    stages_txt = ", ".join(f"{k} {v:.0f} s" for k, v in p.stage_s.items()) or "none run"
    return (f"- commit: {p.commit}\n"
            f"- seeds: --seed {p.seed} (every training / sampling stage), --task-seed {p.task_seed} (task.py)\n"
            f"- torch {p.torch}, Python {p.python}\n"
            f"- CPU: {p.cpu} ({p.cpus} logical CPUs), torch threads: {p.threads}\n"
            f"- date (UTC): started {p.started}, finished {p.finished}\n"
            f"- wall time: {stages_txt}; stage sum {p.total_s:.0f} s; pipeline {p.wall_s:.0f} s "
            f"({p.wall_s / 60:.1f} min)\n")


def results_table(run):
    """Collect eval metrics into one markdown table (one row per model) -> str."""
    head = ("| model | prompt | first acc | final acc | w2r | r2w | r2r | w2w | single | format | mean len | scene list "
            "| objects | follows list |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for prompt in ("single", "reflect", "blind", "ablation"):
        if not os.path.exists(f"{run}/eval/{prompt}/metrics.json"):
            continue
        with open(f"{run}/eval/{prompt}/metrics.json") as f:
            for r in json.load(f)["results"]:
                m = r["metrics"]
                label = {"blind": "single, shuffled images", "ablation": "reflect"}.get(prompt, prompt)
                body += (f"| {r['checkpoint']} | {label} | {m['first_acc']:.3f} | {m['final_acc']:.3f} | {m['w2r']} "
                         f"| {m['r2w']} | {m['r2r']} | {m['w2w']} | {m['single']} | {m['format']:.3f} | {m['mean_len']:.1f} "
                         f"| {m.get('scene_list_ok', float('nan')):.3f} | {m.get('scene_objects', float('nan')):.3f} "
                         f"| {m.get('answer_follows_list', float('nan')):.3f} |\n")
    return head + body


def eval_rows(run):
    """-> {(model, prompt label): metrics} from every finished evaluation of a run."""
    rows = {}
    for prompt, label in (("single", "single"), ("reflect", "reflect"), ("ablation", "reflect"),
                          ("blind", "single, shuffled images")):
        if os.path.exists(f"{run}/eval/{prompt}/metrics.json"):
            with open(f"{run}/eval/{prompt}/metrics.json") as f:
                rows.update({(r["checkpoint"], label): r["metrics"] for r in json.load(f)["results"]})
    return rows


def mean_se(values):
    """-> (mean, standard error of the mean); the SE is nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, (var / n) ** 0.5


def summary_table(runs):
    """Runs of different seeds side by side: for each (model, prompt) evaluated in all of them, the
    final answer's accuracy per run, then mean +- standard error over the runs of the first answer's
    accuracy, the final answer's, the second pass's net corrections (w2r - r2w) and the scene list."""
    per_run = [eval_rows(r) for r in runs]
    keys = [k for k in per_run[0] if all(k in rows for rows in per_run)]
    head = (f"| model | prompt | final acc per run ({', '.join(os.path.basename(r.rstrip('/')) for r in runs)}) "
            f"| first acc | final acc | w2r - r2w | scene list | objects |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for k in keys:
        ms = [rows[k] for rows in per_run]
        cell = lambda vals, fmt: "{:{f}} ± {:{f}}".format(*mean_se(vals), f=fmt)
        body += (f"| {k[0]} | {k[1]} | {', '.join(format(m['final_acc'], '.3f') for m in ms)} "
                 f"| {cell([m['first_acc'] for m in ms], '.3f')} | {cell([m['final_acc'] for m in ms], '.3f')} "
                 f"| {cell([m['w2r'] - m['r2w'] for m in ms], '.1f')} "
                 f"| {cell([m.get('scene_list_ok', float('nan')) for m in ms], '.3f')} "
                 f"| {cell([m.get('scene_objects', float('nan')) for m in ms], '.3f')} |\n")
    return head + body + f"\nmean ± standard error over n = {len(runs)} runs\n" + paired_claims(per_run)


# The demo's claims, each a difference paired by run (seed): (claim, minuend, subtrahend), each a
# (model, prompt label, metric); accuracies in points, w2r / r2w in answers.
CLAIMS = (
    ("plain GRPO - base", ("grpo", "single", "final_acc"), ("base", "single", "final_acc")),
    ("SRPO (stage 2) - stage 1, final", ("srpo", "reflect", "final_acc"), ("sft", "reflect", "final_acc")),
    ("SRPO final - plain GRPO", ("srpo", "reflect", "final_acc"), ("grpo", "single", "final_acc")),
    ("SRPO: w2r - r2w (answers)", ("srpo", "reflect", "w2r"), ("srpo", "reflect", "r2w")),
    ("stage 1: final - first", ("sft", "reflect", "final_acc"), ("sft", "reflect", "first_acc")),
    ("base - blind control", ("base", "single", "final_acc"), ("base", "single, shuffled images", "final_acc")),
)


def paired_claims(per_run):
    """The CLAIMS whose models every run evaluated, as per-run differences, their mean +- SE, and
    whether the mean is above 2 SE (a one-sided check; with 3 runs only a rough one)."""
    rows = []
    for claim, (m1, p1, k1), (m2, p2, k2) in CLAIMS:
        if not all((m1, p1) in r and (m2, p2) in r for r in per_run):
            continue
        scale = 1 if k1 in ("w2r", "r2w") else 100
        diffs = [scale * (r[(m1, p1)][k1] - r[(m2, p2)][k2]) for r in per_run]
        mean, se = mean_se(diffs)
        rows.append(f"| {claim} | {', '.join(f'{d:+.1f}' for d in diffs)} | {mean:+.1f} ± {se:.1f} "
                    f"| {'yes' if mean > 2 * se else 'no'} |")
    if not rows:
        return ""
    return ("\n| paired by run | per run | mean ± SE | mean > 2 SE |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def warm_variants(cores):
    """(threads, n) of every decode graph the stages compile: one sample per prompt (eval) and
    several (reflect, RL) are different graphs (sizes of 1 are specialized), and so is each thread
    count a stage can have with --jobs 2 on `cores` cores (half of them, or all when alone)."""
    return [(t, n) for t in sorted({max(1, cores // 2), max(1, cores - cores // 2), cores}) for n in (8, 1)]


def warm_compile(run):
    """The 'compile' stage: torch.compile the sampler's decode step for every (threads, n) the
    later stages use, while the base model trains beside it, so that they find it in inductor's
    cache. On a fresh machine each cold compile took 45-90 s inside a stage (reflect, srpo,
    eval-reflect are one after the other on the critical path); from the cache it takes ~12 s
    (reflect: 143-157 s without this stage, 67 s with it).
    Needs only the base model's architecture: its tokenizer (written first by sft.py) and
    sft.build_tiny; the weights do not matter. Writes logs/compile.json."""
    import torch
    from support import checkpoint as ckpt_lib
    from support import data
    import sampler
    import sft
    tok_dir, t0 = f"{run}/base/tokenizer", time.time()
    while not os.path.exists(f"{tok_dir}/tokenizer.json") or not os.path.exists(f"{tok_dir}/preprocessor_config.json"):
        if time.time() - t0 > 900:  # the base stage failed before its tokenizer: do not hold the pipeline
            print("[compile] no base tokenizer after 15 min: skipped", flush=True)
            return data.write_json_atomic(f"{run}/logs/compile.json", [])
        time.sleep(1)  # the base stage trains the tokenizer first
    time.sleep(1)
    tok = data.Tokenizer.from_dir(tok_dir)
    tok.image_cfg = ckpt_lib.image_config("pipeline.py", tok_dir)
    net = sft.build_tiny(tok, sft.SFTConfig()).eval()
    records = data.load_records(f"{run}/task/train.jsonl")[:8]
    prompts = [data.encode_prompt(r, tok, data.SYSTEM_PROMPT_SINGLE) for r in records]
    took = []
    for threads, n in warm_variants(len(os.sched_getaffinity(0))):  # pipeline.py's --threads default
        torch.set_num_threads(threads)
        t0 = time.time()
        try:  # only a cache warmer: a failure costs the later stages their own compile, nothing else
            sampler.generate_texts(net, tok, prompts, sampler.SampleConfig(n=n, max_new_tokens=8, seed=0), batch_size=8)
        except Exception as e:  # noqa: BLE001
            print(f"[compile] threads {threads}, n {n}: failed ({e!r:.200}); the stages will compile it", flush=True)
        took.append(dict(threads=threads, n=n, seconds=round(time.time() - t0, 1)))
        print(f"[compile] threads {threads}, n {n}: {took[-1]['seconds']} s", flush=True)
    data.write_json_atomic(f"{run}/logs/compile.json", took)


def check_seeds(run, seed, task_seed, quick):
    """Record the run's seeds in run/pipeline.json; refuse to resume a run made with others
    (its finished stages would be silently mixed with the new seeds')."""
    path, want = f"{run}/pipeline.json", dict(seed=seed, task_seed=task_seed, quick=quick)
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            sys.exit(f"[pipeline] {run} was made with {have}, not {want}: use another --run")
    else:
        with open(path, "w") as f:
            json.dump(want, f, allow_nan=False)


def write_report(run, prov: Provenance):
    """run/report.html: every evaluated model's responses to the test items side by side, with the
    run's provenance and its curves (support/report.py)."""
    from support import report
    dirs = [f"{run}/eval/{p}" for p in ("single", "reflect", "blind", "ablation") if os.path.exists(f"{run}/eval/{p}/metrics.json")]
    png = f"{run}/curves.png"
    try:   # results.md is the run's result; a report that cannot be built is said loudly, and does not undo it
        report.write_eval_report(f"{run}/report.html", dirs, title=f"SRPO pipeline {os.path.basename(run)}",
                                 provenance=dict(seed=prov.seed, task_seed=prov.task_seed, torch=prov.torch,
                                                 finished=prov.finished),
                                 curves_png=open(png, "rb").read() if os.path.exists(png) else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"[pipeline] WARNING: {run}/report.html not written: {e}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the whole SRPO pipeline on the built-in task", allow_abbrev=False)
    ap.add_argument("--run", default=None, help="output directory (default runs/demo, or runs/demo-seedN with --seed N)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every training and sampling stage")
    ap.add_argument("--task-seed", type=int, default=0, help="seed of the task (images, questions, splits)")
    ap.add_argument("--quick", action="store_true", help="shortened pipeline (end-to-end test)")
    ap.add_argument("--only", nargs="*", default=None, choices=list(NEEDS), help="run only these stages")
    ap.add_argument("--jobs", type=int, default=2, help="stages run at once (independent ones only); 1 = one "
                                                          "after the other, output on the terminal")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in all, split "
                    "between the running stages; a training stage takes the threads a finished one frees "
                    "(default: this machine's CPUs; on a machine busy with other jobs use 1: OpenMP threads "
                    "spinning on busy cores slow a stage many times over)")
    ap.add_argument("--ablation", action="store_true", help="also run the paper's ablations in miniature "
                    "(SRPO with the code's reward, without f_len, without I_eff, from the base model; stage 1 "
                    "with the paper's SFT target) in the same run directory")
    ap.add_argument("--no-gate", action="store_true", help=f"run the RL stages even when the base model's scene "
                    f"list on val is below {PERCEPTION_BAR} (the perception gate; --quick has no gate)")
    ap.add_argument("--summarize", nargs="+", metavar="RUN", help="print the runs' results side by side with "
                    "mean +- standard error (runs of different --seed), and run nothing")
    ap.add_argument("--warm-compile", metavar="RUN", help=argparse.SUPPRESS)  # the 'compile' stage
    a = ap.parse_args(argv)
    if a.warm_compile:
        return warm_compile(a.warm_compile)
    if a.summarize:
        missing = [r for r in a.summarize if not os.path.exists(f"{r}/eval")]
        if missing:
            sys.exit(f"[pipeline] --summarize: no evaluations in {missing}")
        print(summary_table(a.summarize))
        return
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: must be >= 1")
    if a.threads < 1:
        ap.error(f"--threads {a.threads}: must be >= 1")
    run = os.path.abspath(a.run or ("runs/demo" if a.seed == 0 else f"runs/demo-seed{a.seed}"))
    os.makedirs(run, exist_ok=True)
    check_seeds(run, a.seed, a.task_seed, a.quick)
    plan = stages(run, a.quick, a.seed, a.task_seed) + (ablation_stages(run, a.quick, a.seed) if a.ablation else [])
    env = dict(os.environ)
    times_path, wall_path = f"{run}/times.json", f"{run}/wall.json"
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    wall_before = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else 0.0
    started, t_start = now_utc(), time.time()

    def on_done(name, seconds):
        times[name] = times.get(name, 0.0) + seconds
        with open(times_path, "w") as f:
            json.dump(times, f, indent=1, allow_nan=False)
    plan = [p for p in plan if a.only is None or p[0] in a.only]
    try:  # 1. up to the perception gate, 2. the gate's verdict, 3. RL and the evaluations
        run_plan([p for p in plan if p[0] in BEFORE_GATE], a.jobs, env, f"{run}/logs", on_done, a.threads)
        gate = gate_result(run)
        if gate is not None:
            print(f"[pipeline] {gate_message(gate)}", flush=True)
            if gate < PERCEPTION_BAR and not a.no_gate:
                prov = collect_provenance(a.seed, a.task_seed, f"{a.threads}", started, times, wall_before + time.time() - t_start)
                with open(f"{run}/results.md", "w") as f:
                    f.write("## provenance\n\n" + provenance_md(prov) + "\n## results\n\n" + gate_message(gate) + "\n")
                sys.exit(1)
        run_plan([p for p in plan if p[0] not in BEFORE_GATE], a.jobs, env, f"{run}/logs", on_done, a.threads)
    finally:  # this command's wall time, also when a stage failed (the rerun adds its own)
        wall_s = wall_before + time.time() - t_start
        with open(wall_path, "w") as f:
            json.dump({"wall_s": wall_s}, f, allow_nan=False)
    if not all(os.path.exists(f"{run}/eval/{p}/metrics.json") for p in ("single", "reflect")):
        return  # --only without the eval stages: no table yet
    prov = collect_provenance(a.seed, a.task_seed, f"{a.threads} split between the running stages (--jobs {a.jobs})",
                              started, times, wall_s)
    with open(f"{run}/provenance.json", "w") as f:
        json.dump({**asdict(prov), "total_s": prov.total_s}, f, indent=1, allow_nan=False)
    gate = gate_result(run)
    report = ("## provenance\n\n" + provenance_md(prov) + "\n## results\n\n"
              + ("" if gate is None else gate_message(gate) + "\n\n") + results_table(run))
    with open(f"{run}/results.md", "w") as f:
        f.write(report)
    logs = [p for p in (f"{run}/base/log.jsonl", f"{run}/sft/log.jsonl", f"{run}/srpo/log.jsonl", f"{run}/grpo/log.jsonl")
            if os.path.exists(p)]
    subprocess.call([sys.executable, "-m", "support.curves", *logs, "--out", f"{run}/curves.png"], cwd=HERE)
    write_report(run, prov)
    print(report)
    print(f"[pipeline] results in {run}/results.md and {run}/report.html, curves in {run}/curves.png; wall time {wall_s:.0f} s "
          f"({wall_s / 60:.1f} min) on {prov.cpus} CPUs")


if __name__ == "__main__":
    main()
