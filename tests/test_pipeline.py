"""pipeline.py: seeds reach every stage, provenance is collected and written, and (slow) the
whole pipeline, shortened (--quick): every stage runs, and every stage's output exists and loads
(checkpoints in our model and in transformers, JSONL data, metrics)."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from support import data
import model as model_lib
import pipeline
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flag(argv, name):
    """The value after --name in argv, or None."""
    return argv[argv.index(name) + 1] if name in argv else None


def test_seed_reaches_every_training_stage_task_seed_only_the_task():
    plan = {name: argv for name, _, argv in pipeline.stages("/r", quick=False, seed=3, task_seed=5)}
    assert flag(plan["task"], "--seed") == "5"
    for name in ("base", "reflect", "sft", "srpo", "grpo"):
        assert flag(plan[name], "--seed") == "3", name
        assert plan[name].count("--seed") == 1, name       # a stage flag list never overrides it
    # greedy evaluation draws nothing: no seed, and the same test set for every --seed
    assert all("--seed" not in plan[n] for n in ("eval-single", "eval-reflect", "eval-blind"))
    assert all(flag(plan[n], "--data") == "/r/task/test.jsonl" for n in ("eval-single", "eval-reflect", "eval-blind"))
    # the base model trains 1.8 epochs: at 1.3 it stopped inside its late perception phase on some machines
    assert flag(plan["base"], "--epochs") == "1.8"
    default = {name: argv for name, _, argv in pipeline.stages("/r", quick=True)}
    assert flag(default["base"], "--seed") == "0" and flag(default["task"], "--seed") == "0"
    # the compile stage runs beside the base model (needs only the task) and nothing waits for it
    assert plan["compile"][1:] == ["pipeline.py", "--warm-compile", "/r"] and "compile" not in default
    assert pipeline.NEEDS["compile"] == ["task"] and not any("compile" in v for v in pipeline.NEEDS.values())


def test_cpu_model_and_commit(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000 @ 3.0GHz\nflags\t: a b\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000 @ 3.0GHz\n")
    assert pipeline.cpu_model(str(info)) == "Test CPU 9000 @ 3.0GHz"
    assert pipeline.cpu_model(str(tmp_path / "absent")) == (platform.processor() or "unknown")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = pipeline.git_commit()
    assert len(head) == 40 and commit.split()[0] == head
    assert commit in (head, head + " + uncommitted changes")
    assert pipeline.git_commit(str(tmp_path)) == "unknown"          # not a git checkout


def test_provenance_markdown_by_hand():
    p = pipeline.Provenance(commit="abc", seed=2, task_seed=0, torch="2.0", python="3.11.7", cpu="CPU X", cpus=2,
                            threads="1", started="2026-12-01T04:00:00Z", finished="2026-12-01T04:07:00Z",
                            stage_s={"task": 10.2, "base": 400.4}, wall_s=300.0)
    assert p.total_s == pytest.approx(410.6)
    md = pipeline.provenance_md(p)
    assert "- commit: abc\n" in md
    assert "--seed 2 (every training / sampling stage), --task-seed 0" in md
    assert "torch 2.0, Python 3.11.7" in md and "CPU: CPU X (2 logical CPUs), torch threads: 1" in md
    assert "started 2026-12-01T04:00:00Z, finished 2026-12-01T04:07:00Z" in md
    assert "wall time: task 10 s, base 400 s; stage sum 411 s; pipeline 300 s (5.0 min)" in md


REAL_STAGES = pipeline.stages


def fake_stages(run, quick, seed=0, task_seed=0):
    """The real plan with every command replaced by a tiny Python program that writes the
    stage's 'done' file (eval stages: a metrics.json; base: also a log.jsonl)."""
    out = []
    for name, done, _ in REAL_STAGES(run, quick, seed, task_seed):
        if name.startswith("eval-") or name == "gate":
            ckpts = {"eval-single": ["base", "grpo"], "eval-reflect": ["sft", "srpo"], "eval-blind": ["base"],
                     "gate": ["base"]}[name]
            m = dict(first_acc=0.5, final_acc=0.625, w2r=1, r2w=2, r2r=3, w2w=4, single=0, format=1.0, mean_len=40.0,
                     scene_list_ok=0.875, scene_objects=0.95, answer_follows_list=0.5)
            content = json.dumps(dict(results=[dict(checkpoint=c, metrics=m) for c in ckpts]))
        else:
            content = "x"
        code = (f"import os, json; os.makedirs(os.path.dirname({done!r}), exist_ok=True); "
                f"open({done!r}, 'w').write({content!r})")
        if name == "base":
            log = os.path.join(run, "base", "log.jsonl")
            rows = "".join(json.dumps(dict(step=s, loss=1.0 / s, lr=1e-3, grad_norm=1.0, loss_tokens=9)) + "\n"
                           for s in range(1, 21))
            code += f"; open({log!r}, 'w').write({rows!r})"
        out.append((name, done, [sys.executable, "-c", code]))
    return out


def test_main_writes_provenance_results_and_curves(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "stages", fake_stages)
    run = tmp_path / "run"
    pipeline.main(["--run", str(run), "--seed", "4"])
    md = (run / "results.md").read_text()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 4 and prov["task_seed"] == 0 and prov["torch"] == torch.__version__
    assert prov["threads"] == f"{len(os.sched_getaffinity(0))} split between the running stages (--jobs 2)"
    assert prov["cpu"] == pipeline.cpu_model()
    assert set(prov["stage_s"]) == {"task", "base", "compile", "gate", "reflect", "sft", "srpo", "grpo", "eval-single",
                                    "eval-reflect", "eval-blind"}
    assert prov["total_s"] == pytest.approx(sum(prov["stage_s"].values()))
    # the command's own wall time: stages two at a time, so at most the stage sum (+ polling)
    assert 0 < prov["wall_s"] <= prov["total_s"] + 5 and f"pipeline {prov['wall_s']:.0f} s" in md
    assert prov["commit"].split()[0] == pipeline.git_commit().split()[0]
    assert md.startswith("## provenance\n") and "--seed 4" in md and f"torch {torch.__version__}" in md
    # one table row per (checkpoint, prompt), values as written by the fake eval stages
    assert "| base | single | 0.500 | 0.625 | 1 | 2 | 3 | 4 | 0 | 1.000 | 40.0 | 0.875 | 0.950 | 0.500 |" in md
    assert "| base | single, shuffled images |" in md and "| srpo | reflect |" in md
    assert "base model on val: scene list 0.875 >= 0.85 (perception gate passed)" in md
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run remembers its seeds: resuming it with another seed is refused
    with pytest.raises(SystemExit, match="made with"):
        pipeline.main(["--run", str(run), "--seed", "5"])
    pipeline.main(["--run", str(run), "--seed", "4"])              # same seeds: every stage skipped
    again = json.loads((run / "provenance.json").read_text())
    assert again["stage_s"] == prov["stage_s"] and again["wall_s"] >= prov["wall_s"]   # resumed: summed


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "pipeline.py", "--quick", "--run", str(run)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    # task: both splits, every record's image exists
    for split in ("train", "test"):
        recs = data.read_jsonl(run / "task" / f"{split}.jsonl")
        assert recs and all(os.path.exists(run / "task" / r["image"]) for r in recs)

    # reflection data: two-pass format, correct final answer (what stage 1 trains on)
    refl = data.read_jsonl(run / "reflect" / "train.jsonl")
    assert refl, "no reflection samples written"
    for r in refl:
        s = reward.srpo_reward(r["messages"][-1]["content"], r["answer"], lambda t: len(t.split()))
        assert s.format == 0.5 and s.final_correct

    # every checkpoint loads here and in transformers, with the same logits
    from transformers import Qwen2_5_VLForConditionalGeneration
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for stage in ("base", "sft", "srpo", "grpo"):
        ckpt = run / stage
        ours = model_lib.from_pretrained(str(ckpt)).eval()
        data.Tokenizer.from_dir(str(ckpt))
        theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt)).eval()
        with torch.no_grad():
            assert torch.allclose(ours(ids), theirs(input_ids=ids).logits, atol=1e-4), stage
        assert os.path.exists(ckpt / "log.jsonl"), stage

    # evaluation: one row per checkpoint, and the results table
    for prompt, names in (("single", {"base", "grpo"}), ("reflect", {"sft", "srpo"}), ("blind", {"base"})):
        with open(run / "eval" / prompt / "metrics.json") as f:
            rows = json.load(f)["results"]
        assert {r["checkpoint"] for r in rows} == names
        assert all(0.0 <= r["metrics"]["final_acc"] <= 1.0 for r in rows)
    # grpo.py logs the perception metric on the built-in task (a fraction)
    for stage in ("srpo", "grpo"):
        last = json.loads((run / stage / "log.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= last["scene_acc"] <= 1.0, stage
    table = (run / "results.md").read_text()
    assert all(n in table for n in ("base", "sft", "srpo", "grpo", "shuffled images", "scene list"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the HTML report: the five evaluations side by side (tests/test_report.py checks its content)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert all(f'"name":"{c}"' in page for c in ("base (single)", "grpo (single)", "sft (reflect)", "srpo (reflect)",
                                                 "base (single, shuffled images)"))


def test_run_plan_starts_each_stage_after_what_it_needs_two_at_a_time(tmp_path):
    """Fake stages append 'start NAME' / 'end NAME' to one file: no stage starts before the stages
    it needs have ended, at most two run at once, and both branches overlap."""
    events = tmp_path / "events.txt"
    def fake(name, seconds):
        code = (f"import time; f = open({str(events)!r}, 'a'); f.write('start {name}\\n'); f.flush(); "
                f"time.sleep({seconds}); open({str(tmp_path / name)!r}, 'w').write('x'); f.write('end {name}\\n')")
        return (name, str(tmp_path / name), [sys.executable, "-c", code])
    plan = [fake(n, 0.6 if n in ("grpo", "reflect") else 0.1) for n in pipeline.NEEDS]
    finished = []
    pipeline.run_plan(plan, 2, dict(os.environ), str(tmp_path / "logs"), lambda n, s: finished.append(n))
    ev = events.read_text().split("\n")[:-1]
    when = {e: i for i, e in enumerate(ev)}
    for name, needs in pipeline.NEEDS.items():
        for d in needs:
            assert when[f"end {d}"] < when[f"start {name}"], (d, name)
    live, most = 0, 0
    for e in ev:
        live += 1 if e.startswith("start") else -1
        most = max(most, live)
    assert most == 2 and sorted(finished) == sorted(pipeline.NEEDS)
    assert when["start reflect"] < when["end grpo"] and when["start grpo"] < when["end reflect"]   # in parallel


def test_run_plan_splits_the_cores_and_gives_a_lone_stage_the_freed_ones(tmp_path):
    """Two stages at once on 3 cores start with 2 and 1 threads (OMP_NUM_THREADS); when the short
    one ends, the long one's share file says 3, and training.follow_thread_budget applies it."""
    seen = tmp_path / "seen.txt"
    long_code = (f"import os, time; f = open({str(seen)!r}, 'a'); f.write('reflect start ' + os.environ['OMP_NUM_THREADS'] + '\\n'); "
                 f"f.flush()\nwhile not os.path.exists({str(tmp_path / 'grpo')!r}): time.sleep(0.05)\ntime.sleep(1.5); "
                 f"f.write('reflect later ' + open(os.environ['SRPO_THREADS_FILE']).read() + '\\n'); "
                 f"open({str(tmp_path / 'reflect')!r}, 'w').write('x')")
    short_code = (f"import os; open({str(seen)!r}, 'a').write('grpo start ' + os.environ['OMP_NUM_THREADS'] + '\\n'); "
                  f"open({str(tmp_path / 'grpo')!r}, 'w').write('x')")
    plan = [("reflect", str(tmp_path / "reflect"), [sys.executable, "-c", long_code]),
            ("grpo", str(tmp_path / "grpo"), [sys.executable, "-c", short_code])]
    pipeline.run_plan(plan, 2, dict(os.environ), str(tmp_path / "logs"), lambda n, s: None, cores=3)
    lines = sorted(seen.read_text().split("\n")[:-1])
    assert lines == ["grpo start 1", "reflect later 3", "reflect start 2"]
    assert pipeline.thread_shares(["a", "b", "c"], 2) == {"a": 1, "b": 1, "c": 1}  # never 0 threads
    (tmp_path / "share").write_text("3")
    before = torch.get_num_threads()
    try:
        from support import training
        os.environ["SRPO_THREADS_FILE"] = str(tmp_path / "share")
        training.follow_thread_budget(torch.device("cpu"))
        assert torch.get_num_threads() == 3
        (tmp_path / "share").write_text("")  # being rewritten: unchanged
        training.follow_thread_budget(torch.device("cpu"))
        assert torch.get_num_threads() == 3
    finally:
        del os.environ["SRPO_THREADS_FILE"]
        torch.set_num_threads(before)


def test_run_plan_failure_stops_new_stages_and_exits_nonzero(tmp_path):
    ok = lambda n: (n, str(tmp_path / n), [sys.executable, "-c", f"open({str(tmp_path / n)!r}, 'w').write('x')"])
    plan = [ok("task"), ("base", str(tmp_path / "base"), [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]),
            ok("reflect")]
    with pytest.raises(SystemExit, match=r"(?s)boom.*stage base failed \(exit 3\)"):
        pipeline.run_plan(plan, 2, dict(os.environ), str(tmp_path / "logs"), lambda n, s: None)
    assert not os.path.exists(tmp_path / "reflect")             # never started: it needs base


def test_only_rejects_unknown_stage_names(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--only", "tsak", "--run", "/nonexistent/x"])
    assert "invalid choice: 'tsak'" in capsys.readouterr().err


def test_ablation_rows_change_one_thing_of_the_srpo_stage():
    """Each ablation's command is the main SRPO stage's (minus the unused --test) plus its flags,
    from the model the paper's row names; the SFT-target row is stage 1 with --target paper."""
    main = {name: argv for name, _, argv in pipeline.stages("/r", quick=False, seed=2)}
    abl = {name: argv for name, _, argv in pipeline.ablation_stages("/r", quick=False, seed=2)}
    srpo = [a for a in main["srpo"] if a not in ("--test", "/r/task/test.jsonl")]
    expect = {"srpo-code": (["--reward_preset", "code"], "/r/sft"), "srpo-nolen": (["--length_weight", "0"], "/r/sft"),
              "srpo-noeff": (["--effectiveness", "0"], "/r/sft"), "srpo-nosft": ([], "/r/base")}
    for name, (flags, init) in expect.items():
        want = [init if a == "/r/sft" else f"/r/ablation/{name}" if a == "/r/srpo" else a for a in srpo] + flags
        assert abl[name] == want, name
        assert pipeline.NEEDS[name] == [init.split("/")[-1]]
    assert abl["reflect-paper"][abl["reflect-paper"].index("--target") + 1] == "paper"
    assert [a for a in abl["reflect-paper"] if a not in ("--target", "paper")] == \
        [a.replace("/r/reflect/", "/r/ablation/reflect-paper/") for a in main["reflect"]]
    assert flag(abl["sft-paper"], "--data") == "/r/ablation/reflect-paper/train.jsonl"
    assert flag(abl["sft-paper"], "--init") == "/r/base" and flag(abl["sft-paper"], "--epochs") == flag(main["sft"], "--epochs")
    ev = abl["eval-ablation"]
    assert ev[ev.index("--model") + 1:ev.index("--data")] == [f"/r/ablation/{n}" for n in (*expect, "sft-paper")]
    assert set(pipeline.NEEDS["eval-ablation"]) == {*expect, "sft-paper"}


def test_summary_table_mean_and_standard_error_by_hand(tmp_path, capsys):
    def write(run, first, final, w2r, r2w, scene):
        os.makedirs(run / "eval" / "reflect")
        m = dict(first_acc=first, final_acc=final, w2r=w2r, r2w=r2w, r2r=0, w2w=0, single=0, format=1.0,
                 mean_len=1.0, scene_list_ok=scene, scene_objects=scene + 0.1)
        (run / "eval" / "reflect" / "metrics.json").write_text(json.dumps(dict(results=[dict(checkpoint="srpo", metrics=m)])))
    write(tmp_path / "s0", 0.4, 0.5, 10, 4, 0.9)
    write(tmp_path / "s1", 0.5, 0.6, 20, 2, 0.8)
    write(tmp_path / "s2", 0.6, 0.7, 30, 6, 0.7)
    pipeline.main(["--summarize", str(tmp_path / "s0"), str(tmp_path / "s1"), str(tmp_path / "s2")])
    out = capsys.readouterr().out
    # final 0.5, 0.6, 0.7: mean 0.6, sd 0.1, SE 0.1 / sqrt(3) = 0.0577; w2r - r2w = 6, 18, 24: mean 16,
    # sd sqrt(((-10)^2 + 2^2 + 8^2) / 2) = sqrt(84) = 9.165, SE 5.29
    assert "| srpo | reflect | 0.500, 0.600, 0.700 | 0.500 ± 0.058 | 0.600 ± 0.058 | 16.0 ± 5.3 | 0.800 ± 0.058 | 0.900 ± 0.058 |" in out
    assert "n = 3 runs" in out
    assert pipeline.mean_se([2.0])[0] == 2.0 and pipeline.mean_se([2.0])[1] != pipeline.mean_se([2.0])[1]  # nan
    with pytest.raises(SystemExit, match="no evaluations"):
        pipeline.main(["--summarize", str(tmp_path / "absent")])


def test_summary_claims_are_paired_by_run(tmp_path, capsys):
    """Each claim is the per-run difference of two rows, then mean +- SE over runs (by hand)."""
    def write(run, base, grpo):
        os.makedirs(run / "eval" / "single")
        m = lambda acc: dict(first_acc=acc, final_acc=acc, w2r=0, r2w=0, r2r=0, w2w=0, single=300, format=1.0, mean_len=1.0)
        results = [dict(checkpoint="base", metrics=m(base)), dict(checkpoint="grpo", metrics=m(grpo))]
        (run / "eval" / "single" / "metrics.json").write_text(json.dumps(dict(results=results)))
    for name, base, grpo in (("s0", 0.40, 0.46), ("s1", 0.50, 0.52), ("s2", 0.45, 0.51)):
        write(tmp_path / name, base, grpo)
    pipeline.main(["--summarize", *(str(tmp_path / n) for n in ("s0", "s1", "s2"))])
    out = capsys.readouterr().out
    # grpo - base = +6, +2, +6 points: mean 4.667, sd sqrt((1.333^2 + 2.667^2 + 1.333^2) / 2) = 2.309,
    # SE 1.333; 4.667 > 2 x 1.333. The reflect and blind claims need rows these runs lack: left out.
    assert "| plain GRPO - base | +6.0, +2.0, +6.0 | +4.7 ± 1.3 | yes |" in out
    assert "SRPO" not in out.split("paired by run")[1] and "blind" not in out


def test_perception_gate_stops_before_rl_and_says_why(tmp_path, monkeypatch, capsys):
    """A base model that does not see the image stops the pipeline before any RL stage, with the
    reason on the console and in results.md and exit status 1; --no-gate continues; --quick has no gate."""
    run = tmp_path / "r"
    (run / "eval" / "gate").mkdir(parents=True)
    (run / "eval" / "gate" / "metrics.json").write_text(json.dumps(
        {"results": [{"checkpoint": "base", "metrics": {"scene_list_ok": 0.377, "final_acc": 0.45}}]}))
    ran = []
    monkeypatch.setattr(pipeline, "run_plan", lambda plan, *a, **k: ran.append([name for name, _, _ in plan]))
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--run", str(run)])
    assert e.value.code == 1
    assert ran == [["task", "base", "compile", "gate"]]          # nothing after the gate ran
    why = "the base model does not perceive the scene (scene list 0.38 < 0.85 on val)"
    assert why in capsys.readouterr().out and why in (run / "results.md").read_text()
    ran.clear()
    pipeline.main(["--run", str(run), "--no-gate"])              # continues anyway (no evals here: no table)
    assert ran[0] == ["task", "base", "compile", "gate"] and {"reflect", "grpo", "srpo", "sft"} <= set(ran[1])
    # a seeing base passes; the quick pipeline (whose base is not meant to see) has no gate stage
    assert "passed" in pipeline.gate_message(0.9) and pipeline.gate_message(0.85).startswith("base model on val")
    assert "gate" not in [name for name, _, _ in pipeline.stages("/r", quick=True)]
    gate = {name: argv for name, _, argv in pipeline.stages("/r", quick=False)}["gate"]
    assert flag(gate, "--data") == "/r/task/val.jsonl" and flag(gate, "--metric") == "demo.task:scene_list_ok"
    assert gate[gate.index("--metric") + 1:][:3] == list(pipeline.TASK_METRICS)
