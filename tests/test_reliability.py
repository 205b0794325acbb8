"""What a hostile user tries, made into tests: outputs never touch inputs (cli.check_paths, every
script), resume keyed by the data's content and not by paths, one line and exit 1 for every error a
user can fix (cli.main: load errors naming the file, a full disk naming the path and the free space
and keeping the previous checkpoint), and SIGTERM / SIGINT stopping after the current step with a
checkpoint that a rerun resumes to the same weights as an uninterrupted run."""
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from support import checkpoint
from support import cli
from support import data
import eval as eval_lib
import grpo
import reflect_data
import sft
from support import training
from test_grpo import RUN_SCRIPT, _loop_args, fake_score_batch, world  # noqa: F401 (world: a fixture)
from test_sft import ROOT, _args, _env, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("reldata")))


@pytest.fixture(scope="module")
def run2(dataset, tmp_path_factory):
    """A finished 2-step sft run (checkpoint/ at step 2, the HF export in the directory itself)."""
    out = str(tmp_path_factory.mktemp("rel") / "run")
    sft.train(sft.parse_args(_args(dataset, out, steps=2, save_every=2)))
    return out


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_line(prog, fn, capsys):
    """cli.main(prog, fn) -> its exit status and the stderr it printed (which must be one line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(prog, fn)
    err = [l for l in capsys.readouterr().err.strip().splitlines() if not re.search(r"\d+/\d+ \[", l)]   # no tqdm
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith(prog + ": "), err
    return e.value.code, err[0]


def copy_data(src, dst):
    """The sft data set (train.jsonl + images/) copied to dst -> the new train.jsonl."""
    shutil.copytree(os.path.dirname(src), dst)
    return os.path.join(dst, os.path.basename(src))


# ----------------------------------------------------------------------------- outputs never touch inputs

def test_out_containing_the_input_is_refused_by_every_script(dataset, run2, tmp_path, capsys):
    """--init RUN/checkpoint --out RUN: the first save would replace the input weights. Every script
    refuses any overlap of its output with a model input, in both directions and through symlinks,
    before writing anything (the input's bytes are unchanged); an --out that is an existing file is
    one line."""
    inp = str(tmp_path / "inp")                                       # a directory holding the model as checkpoint/
    shutil.copytree(os.path.join(run2, "checkpoint"), os.path.join(inp, "checkpoint"),
                    ignore=shutil.ignore_patterns("train_state.json", "train", "rng_*"))
    ckpt = os.path.join(inp, "checkpoint")
    weights = os.path.join(ckpt, "model.safetensors")
    before, listing = sha256(weights), sorted(os.listdir(ckpt))
    link = tmp_path / "link"
    link.symlink_to(inp)
    for out in (inp, str(link)):                                      # the input inside --out
        argv = _args(dataset, out, steps=4)
        argv[argv.index("--init") + 1] = ckpt
        code, err = one_line("sft.py", lambda: sft.train(sft.parse_args(argv)), capsys)
        assert code == 1 and f"contains --init {ckpt}" in err, err
        code, err = one_line("grpo.py", lambda: grpo.main(grpo.parse_args(
            ["--model", ckpt, "--train", dataset, "--out", out])), capsys)
        assert code == 1 and f"contains --model {ckpt}" in err, err
    for out in (ckpt, os.path.join(str(link), "checkpoint", "sub")):   # --out at or inside the input
        code, err = one_line("grpo.py", lambda: grpo.main(grpo.parse_args(
            ["--model", ckpt, "--train", dataset, "--out", out])), capsys)
        assert code == 1 and "overwrite its own input" in err
    with pytest.raises(SystemExit, match=r"eval.py: --out .* contains --model"):
        eval_lib.main(["--model", ckpt, "--data", dataset, "--out", str(link)])
    with pytest.raises(SystemExit, match=r"reflect_data.py: --out .* is inside --policy"):
        reflect_data.main(["--policy", str(link), "--data", dataset, "--out", os.path.join(ckpt, "r.jsonl")])
    data_link = tmp_path / "data_link.jsonl"
    data_link.symlink_to(dataset)
    with pytest.raises(SystemExit, match=r"reflect_data.py: --out .* is --data"):
        reflect_data.main(["--policy", ckpt, "--data", dataset, "--out", str(data_link)])
    assert sha256(weights) == before and sorted(os.listdir(ckpt)) == listing and os.listdir(inp) == ["checkpoint"]
    # an existing file as --out: one line, not a FileExistsError traceback
    f = tmp_path / "file"
    f.write_text("x")
    code, err = one_line("sft.py", lambda: sft.train(sft.parse_args(_args(dataset, str(f), steps=1))), capsys)
    assert code == 1 and "is an existing file" in err
    with pytest.raises(SystemExit, match="is an existing file"):
        eval_lib.main(["--model", ckpt, "--data", dataset, "--out", str(f)])
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- resume keyed by content

def test_resume_refuses_changed_data_and_follows_a_moved_run(dataset, tmp_path):
    """Same --data path, other contents: refused, saying what changed (also with the same record
    count). A run directory moved elsewhere resumes: no path of it is compared."""
    train = copy_data(dataset, str(tmp_path / "data"))
    run, moved = str(tmp_path / "run"), str(tmp_path / "elsewhere" / "run")
    sft.train(sft.parse_args(_args(train, run, steps=2, save_every=2)))
    os.makedirs(os.path.dirname(moved))
    shutil.move(run, moved)
    lines = open(train).readlines()
    open(train, "w").writelines(lines[:12])                            # 24 -> 12 records
    with pytest.raises(checkpoint.RunError, match=r"--data .*train.jsonl changed since .*records 24 -> 12"):
        sft.train(sft.parse_args(_args(train, moved, steps=4, save_every=2)))
    recs = [json.loads(l) for l in lines]
    recs[5]["answer"] = "7"                                            # same count, one answer edited
    open(train, "w").writelines(json.dumps(r) + "\n" for r in recs)
    with pytest.raises(checkpoint.RunError, match=r"changed since .*sha256 [0-9a-f]{12} -> [0-9a-f]{12}"):
        sft.train(sft.parse_args(_args(train, moved, steps=4, save_every=2)))
    open(train, "w").writelines(lines)                                 # the data it was trained on
    sft.train(sft.parse_args(_args(train, moved, steps=4, save_every=2)))
    assert [r["step"] for r in data.read_jsonl(os.path.join(moved, "log.jsonl"))] == [1, 2, 3, 4]


def test_grpo_run_copied_elsewhere_resumes_and_changed_train_is_refused(world, tmp_path, monkeypatch):
    """A grpo run directory copied elsewhere (even with the lock of a live run in it) resumes there;
    the same --train path with half the records is refused."""
    import reward
    monkeypatch.setattr(reward, "score_batch", fake_score_batch)
    monkeypatch.setenv("SRPO_COMPILE", "0")
    train = copy_data(world["train"], str(tmp_path / "task"))
    run, copy = str(tmp_path / "run"), str(tmp_path / "copy")
    args = lambda out, steps: grpo.parse_args(_loop_args(world, out, steps, train=train, max_new_tokens=6))
    grpo.main(args(run, 1))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:   # copied while a run held it: the copy's lock is the original's, not the copy's
        checkpoint.lock_run_dir("grpo.py", run)
        lock = open(os.path.join(run, "lock")).read().split(" ")
        open(os.path.join(run, "lock"), "w").write(" ".join([str(holder.pid)] + lock[1:]))
        shutil.copytree(run, copy)
        with pytest.raises(checkpoint.RunError, match=f"in use by pid {holder.pid}"):
            checkpoint.lock_run_dir("grpo.py", run)
    finally:
        holder.kill()
        holder.wait()
    lines = open(train).readlines()
    open(train, "w").writelines(lines[:len(lines) // 2])
    with pytest.raises(checkpoint.RunError, match=r"--train .* changed since .*records 48 -> 24"):
        grpo.main(args(copy, 2))
    open(train, "w").writelines(lines)
    grpo.main(args(copy, 2))
    log = data.read_jsonl(os.path.join(copy, "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2] and checkpoint.saved_step(os.path.join(copy, "checkpoint")) == 2


# ----------------------------------------------------------------------------- one line per error

def test_broken_model_files_are_named_in_one_line(dataset, run2, tmp_path, capsys):
    """A truncated tokenizer.json / config.json / model.safetensors in --init / --model: one line
    naming the file (the tokenizers library says only 'EOF while parsing ... line N'); SRPO_DEBUG=1
    adds the traceback."""
    for name, keep in (("tokenizer.json", 0.5), ("config.json", 0.5), ("model.safetensors", 0.3)):
        bad = str(tmp_path / name.replace(".", "_"))
        shutil.copytree(os.path.join(run2, "checkpoint"), bad)
        f = os.path.join(bad, name)
        raw = open(f, "rb").read()
        open(f, "wb").write(raw[:int(len(raw) * keep)])
        argv = _args(dataset, str(tmp_path / ("out_" + name)), steps=1)
        argv[argv.index("--init") + 1] = bad
        code, err = one_line("sft.py", lambda: sft.train(sft.parse_args(argv)), capsys)
        assert code == 1 and f in err, err
        code, err = one_line("grpo.py", lambda: grpo.main(grpo.parse_args(
            ["--model", bad, "--train", dataset, "--out", str(tmp_path / ("g_" + name))])), capsys)
        assert code == 1 and f in err, err
        with pytest.raises(SystemExit, match=f"^reflect_data.py: .*{re.escape(f)}"):
            reflect_data.main(["--policy", bad, "--data", dataset, "--out", str(tmp_path / name / "r.jsonl"),
                               "--limit", "1"])
    os.environ["SRPO_DEBUG"] = "1"
    try:
        with pytest.raises(SystemExit):
            cli.main("grpo.py", lambda: grpo.main(grpo.parse_args(
                ["--model", bad, "--train", dataset, "--out", str(tmp_path / "dbg")])))
    finally:
        del os.environ["SRPO_DEBUG"]
    assert "Traceback" in capsys.readouterr().err


def test_script_entry_points_print_one_line(dataset, run2, tmp_path):
    """The same through `python script.py`: exit status 1, one line on stderr, no traceback, for a
    corrupted image (sft.py) and a truncated tokenizer.json (grpo.py)."""
    train = copy_data(dataset, str(tmp_path / "data"))
    open(os.path.join(os.path.dirname(train), "images", "3.png"), "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(run2, "checkpoint"), bad)
    raw = open(os.path.join(bad, "tokenizer.json"), "rb").read()
    open(os.path.join(bad, "tokenizer.json"), "wb").write(raw[:len(raw) // 2])
    for cmd, want in (([sys.executable, "sft.py"] + _args(train, str(tmp_path / "o1"), steps=1), "3.png"),
                      ([sys.executable, "grpo.py", "--model", bad, "--train", dataset, "--out", str(tmp_path / "o2")],
                       os.path.join(bad, "tokenizer.json"))):
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and want in lines[0] and "Traceback" not in r.stderr, r.stderr


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the step-4 checkpoint (here the last file of checkpoint.tmp/): one line
    naming the path and the free space; checkpoint.tmp/ is removed and checkpoint/ (step 2) kept;
    the rerun resumes from it. ENOSPC on log.jsonl: one line as well."""
    out = str(tmp_path / "run")
    real, calls = checkpoint.save_file, []

    def full_on_second_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            real(tensors, path, *a, **k)                               # a partial checkpoint.tmp/ exists
            raise _enospc(path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", full_on_second_save)
    code, err = one_line("sft.py", lambda: sft.train(sft.parse_args(_args(dataset, out, steps=6, save_every=2))), capsys)
    assert code == 1 and "no space left" in err and "checkpoint.tmp" in err and " free " in err
    assert "previous checkpoint" in err and "(step 2) is kept" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.tmp"))
    assert checkpoint.saved_step(os.path.join(out, "checkpoint")) == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    monkeypatch.setattr(data, "append_jsonl", lambda path, rec: (_ for _ in ()).throw(_enospc(path)))
    code, err = one_line("sft.py", lambda: sft.train(sft.parse_args(_args(dataset, out, steps=6, save_every=2))), capsys)
    assert code == 1 and "no space left" in err and "log.jsonl" in err and " free " in err
    monkeypatch.undo()
    sft.train(sft.parse_args(_args(dataset, out, steps=6, save_every=2)))
    assert [r["step"] for r in data.read_jsonl(os.path.join(out, "log.jsonl"))] == list(range(1, 7))


# ----------------------------------------------------------------------------- preemption

def test_sigterm_stops_after_the_step_and_resumes_to_the_same_weights(dataset, tmp_path, monkeypatch):
    """SIGTERM in the middle of step 3 (no save due before step 10): the step is finished, a
    checkpoint written at step 3, Preempted raised (cli.main: exit 143); the rerun resumes there
    and ends with bitwise the weights of an uninterrupted run."""
    ref, stopped = str(tmp_path / "ref"), str(tmp_path / "stopped")
    sft.train(sft.parse_args(_args(dataset, ref, steps=5, save_every=10)))
    real, n = training.follow_thread_budget, {"calls": 0}

    def signal_in_step_3(device):                                      # called once at the start of every step
        n["calls"] += 1
        if n["calls"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(device)

    monkeypatch.setattr(training, "follow_thread_budget", signal_in_step_3)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Preempted, match=r"stopped by SIGTERM after step 3; checkpoint saved") as e:
        sft.train(sft.parse_args(_args(dataset, stopped, steps=5, save_every=10)))
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == handler   # restored
    assert checkpoint.saved_step(os.path.join(stopped, "checkpoint")) == 3
    assert not os.path.exists(os.path.join(stopped, "lock"))
    monkeypatch.undo()
    sft.train(sft.parse_args(_args(dataset, stopped, steps=5, save_every=10)))
    a, b = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(stopped, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in data.read_jsonl(os.path.join(stopped, "log.jsonl"))] == [1, 2, 3, 4, 5]


def test_grpo_sigint_stops_after_the_step_and_resumes_to_the_same_weights(world, tmp_path, monkeypatch):
    """The same in grpo.py's loop, one process, with SIGINT (Ctrl-C) in the middle of step 2."""
    import reward
    monkeypatch.setattr(reward, "score_batch", fake_score_batch)
    monkeypatch.setenv("SRPO_COMPILE", "0")
    ref, stopped = str(tmp_path / "ref"), str(tmp_path / "stopped")
    args = lambda out: grpo.parse_args(_loop_args(world, out, 3, save_every=10, max_new_tokens=6))
    grpo.main(args(ref))
    real, n = training.follow_thread_budget, {"calls": 0}

    def signal_in_step_2(device):
        n["calls"] += 1
        if n["calls"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(device)

    monkeypatch.setattr(training, "follow_thread_budget", signal_in_step_2)
    with pytest.raises(cli.Preempted, match=r"stopped by SIGINT after step 2"):
        grpo.main(args(stopped))
    assert checkpoint.saved_step(os.path.join(stopped, "checkpoint")) == 2
    monkeypatch.setattr(training, "follow_thread_budget", real)
    grpo.main(args(stopped))
    a, b = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(stopped, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in data.read_jsonl(os.path.join(stopped, "log.jsonl"))] == [1, 2, 3]


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143),
                                        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_sigterm_exit_status_from_the_command_line(dataset, tmp_path, sig, status):
    """`python sft.py` given SIGTERM (SIGINT: Ctrl-C): exit status 143 (130) and one message naming
    the checkpoint, no KeyboardInterrupt traceback."""
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "sft.py"] + _args(dataset, out, steps=400, save_every=1000), cwd=ROOT,
                         env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(os.path.join(out, "log.jsonl")) and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == status and "Traceback" not in err, err[-2000:]
    step = checkpoint.saved_step(os.path.join(out, "checkpoint"))
    assert 1 <= step < 400 and f"stopped by {sig.name} after step {step}; checkpoint saved in" in err
    assert len(data.read_jsonl(os.path.join(out, "log.jsonl"))) == step


def _children(pid):
    """The pids whose parent is pid (torchrun's workers), from /proc."""
    kids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                kids.append(int(d))
        except OSError:
            pass
    return kids


@pytest.mark.slow
def test_sigterm_at_a_random_moment_of_a_two_rank_grpo_run(world, tmp_path):
    """torchrun x2 (FSDP2, gloo), SIGTERM at a random moment, to the whole process group (torchrun
    forwards it too, so each rank gets it twice) or to one rank alone: every step logged before the
    signal is in the checkpoint (at most the step in flight is redone), the ranks agree on the step
    to stop at, and the rerun ends with bitwise the weights and log of an uninterrupted 2-rank run."""
    script = tmp_path / "run.py"                                      # grpo.py's __main__, with the stand-in reward
    script.write_text(RUN_SCRIPT.replace("grpo.main(grpo.parse_args(sys.argv[2:]))",
                                         "from support import cli, dist\ncli.main('grpo.py', lambda: grpo.main(grpo.parse_args("
                                         "sys.argv[2:])))\ndist.exit_worker()"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SRPO_COMPILE": "0"}
    port = 31500 + os.getpid() % 1000

    def cmd(out):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                str(script), ROOT] + _loop_args(world, out, 6, save_every=100, beta=0.05)

    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    p = subprocess.run(cmd(full), capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    log_path = os.path.join(stopped, "log.jsonl")
    proc = subprocess.Popen(cmd(stopped), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    t0 = time.time()
    while not os.path.exists(log_path) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.5))                               # anywhere in steps 2..3
    logged = len(data.read_jsonl(log_path, allow_torn_tail=True))
    target = random.choice(["all", "one rank"])   # a scheduler signalling every process, or one rank alone
    if target == "all":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(random.choice(_children(proc.pid)), signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, f"the run ended before the signal ({target})"
    err += f"\n(SIGTERM sent to {target})"
    saved = checkpoint.saved_step(os.path.join(stopped, "checkpoint"))
    assert logged <= saved <= logged + 1 < 6, (logged, saved)
    assert err.count(f"grpo.py: stopped by SIGTERM after step {saved}; checkpoint saved") == 1, err[-3000:]   # rank 0
    assert "Preempted" not in err                                      # no worker traceback (torchrun prints its own)
    p = subprocess.run(cmd(stopped), capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0 and f"resuming at step {saved}" in p.stdout, p.stderr[-3000:]
    a = load_file(os.path.join(full, "model.safetensors"))
    b = load_file(os.path.join(stopped, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s") and "tok_s" not in k} for r in rs]
    assert strip(data.read_jsonl(log_path)) == strip(data.read_jsonl(os.path.join(full, "log.jsonl")))


def test_disk_full_without_a_file_name_names_the_file_being_written(tmp_path, capsys, monkeypatch):
    """A full disk often surfaces at flush / close as OSError(ENOSPC) without a file name: the line
    names the file being written (found in the traceback) and its file system's free space, and
    data.write_json_atomic leaves no partial temporary file."""
    path = str(tmp_path / "run_config.json")

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_dump = json.dump
    monkeypatch.setattr(json, "dump", lambda obj, f, **k: real_dump(obj, FullDisk(f), **k))
    code, err = one_line("grpo.py", lambda: data.write_json_atomic(path, {"a": 1}), capsys)
    assert code == 1 and f"no space left on the device writing {path}.tmp" in err and " free there" in err, err
    assert os.listdir(tmp_path) == []
