"""
The demo's robustness matrix: does the base model learn to see on every numeric path?

Floats round differently on other machines (other SIMD kernels in PyTorch and MKL, other thread
counts), and a schedule that trains a seeing base model on one machine may not on another. This
script trains the pipeline's base model (the same command as `pipeline.py`'s base stage) on
several numeric paths of this machine and prints its scene list (the share of images whose
whole scene the model lists exactly) on val and test, per cell:

    path      what it sets
    native    nothing: this CPU's own kernels
    avx2      ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (= native on an AVX2-only CPU)
    default   ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 (no wide SIMD at all)
  each with 1 or 2 torch threads (another split of every reduction).

Evaluation off the native path runs eagerly (SRPO_COMPILE=0): an inductor cache filled by native
kernels is not keyed by ATEN_CPU_CAPABILITY. Each cell is a pipeline run directory
(runs/paths/CELL/{task,base,eval/gate}); `python pipeline.py --run runs/paths/CELL --seed S
--task-seed T` continues it with RL, reusing its base model. Cells that are done are skipped, so
rerunning the command resumes. Each base takes ~6-12 min on one core: the full default matrix
(4 paths x 3 seeds + one other task seed) is about 2 hours of one core; --jobs 2 runs two cells
at once.

    python bench/demo_paths.py                                   # the default matrix
    python bench/demo_paths.py --paths native:1 default:2 --seeds 0 --task-seeds 0 1
    python bench/demo_paths.py --table                           # print the table of what is done
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pipeline  # noqa: E402

PATHS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
         "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}}


def cell_name(path, threads, seed, task_seed):
    return f"{path}-{threads}t-seed{seed}-task{task_seed}"


def cell_commands(run, path, threads, seed, task_seed):
    """-> [(name, marker, argv, env)] of one cell: the pipeline's own task, base and gate commands
    (base with a fixed thread count), then the base model on test."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **PATHS[path])
    env.pop("SRPO_THREADS_FILE", None)
    if path != "native":
        env["SRPO_COMPILE"] = "0"
    plan = {name: (marker, argv) for name, marker, argv in pipeline.stages(run, False, seed, task_seed)}
    out = []
    for name in ("task", "base", "gate"):
        marker, argv = plan[name]
        out.append((name, marker, argv + (["--threads", str(threads)] if name == "base" else []), env))
    marker, argv = plan["eval-blind"]   # the base model on test, as the pipeline's evaluations run it
    argv = [a for a in argv if a != "--shuffle-images"]
    argv[argv.index("--out") + 1] = f"{run}/eval/base-test"
    out.append(("test", f"{run}/eval/base-test/metrics.json", argv, env))
    return out


def scene_list(run, which):
    path = f"{run}/eval/{which}/metrics.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = json.load(f)["results"][0]["metrics"]
    return m.get("scene_list_ok"), m["final_acc"]


def run_cell(root, spec, log):
    path, threads, seed, task_seed = spec
    run = os.path.abspath(f"{root}/{cell_name(*spec)}")
    os.makedirs(run, exist_ok=True)
    # one task directory per task seed, shared by the cells (the task does not depend on the path)
    shared = os.path.abspath(f"{root}/task{task_seed}")
    if not os.path.exists(f"{run}/task"):
        os.symlink(shared, f"{run}/task")
    with open(f"{run}/pipeline.json", "w") as f:  # what pipeline.py checks before it resumes a run
        json.dump(dict(seed=seed, task_seed=task_seed, quick=False), f)
    for name, marker, argv, env in cell_commands(run, path, threads, seed, task_seed)[1:]:  # task: made by main
        if os.path.exists(marker):
            continue
        t0 = time.time()
        with open(f"{run}/{name}.log", "a") as out:
            rc = subprocess.call(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        print(f"[paths] {cell_name(*spec)} {name}: exit {rc} in {time.time() - t0:.0f} s", file=log, flush=True)
        if rc:
            return False
    return True


def table(root, specs):
    rows = ["| cell | path | threads | seed | task seed | scene list val | scene list test | base acc test |",
            "|---|---|---|---|---|---|---|---|"]
    vals = []
    for spec in specs:
        run = f"{root}/{cell_name(*spec)}"
        v, t = scene_list(run, "gate"), scene_list(run, "base-test")
        fmt = lambda x: "-" if x is None else f"{x[0]:.3f}"
        rows.append(f"| {cell_name(*spec)} | {spec[0]} | {spec[1]} | {spec[2]} | {spec[3]} | {fmt(v)} | {fmt(t)} "
                    f"| {'-' if t is None else format(t[1], '.3f')} |")
        if v and t:
            vals.append(min(v[0], t[0]))
    if vals:
        rows.append(f"\n{len(vals)} cells done; lowest scene list (val or test): {min(vals):.3f} "
                    f"(gate {pipeline.PERCEPTION_BAR}); cells below the gate: {sum(x < pipeline.PERCEPTION_BAR for x in vals)}")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--root", default="runs/paths", help="one pipeline run directory per cell under it")
    ap.add_argument("--paths", nargs="+", default=["native:1", "native:2", "default:1", "default:2"],
                    help="PATH:THREADS cells, PATH in " + ", ".join(PATHS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--task-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--extra", nargs="*", default=["native:2:0:1"],
                    help="more cells as PATH:THREADS:SEED:TASK_SEED (default: one other task seed)")
    ap.add_argument("--jobs", type=int, default=1, help="cells at once (each one core per thread)")
    ap.add_argument("--table", action="store_true", help="only print the table of the cells done so far")
    a = ap.parse_args(argv)
    specs = []
    for p in a.paths:
        path, threads = p.split(":")
        if path not in PATHS:
            ap.error(f"--paths {p}: unknown path {path!r}; known: {list(PATHS)}")
        specs += [(path, int(threads), s, t) for t in a.task_seeds for s in a.seeds]
    for e in a.extra:
        path, threads, s, t = e.split(":")
        specs.append((path, int(threads), int(s), int(t)))
    if not a.table:
        from concurrent.futures import ThreadPoolExecutor
        for t in sorted({spec[3] for spec in specs}):  # the shared task directories first, one at a time
            if not os.path.exists(f"{a.root}/task{t}/manifest.json"):
                _, _, argv = pipeline.stages(os.path.abspath(f"{a.root}/task{t}-tmp"), False, 0, t)[0]
                argv[argv.index("--out") + 1] = os.path.abspath(f"{a.root}/task{t}")
                subprocess.check_call(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        with ThreadPoolExecutor(a.jobs) as pool:
            ok = list(pool.map(lambda spec: run_cell(a.root, spec, sys.stdout), specs))
        if not all(ok):
            print(table(a.root, specs))
            sys.exit("[paths] some cells failed: see their logs under " + a.root)
    print(table(a.root, specs))


if __name__ == "__main__":
    main()
