"""checkpoint.py: training-state round trip, atomic replace, recovery after a kill between the two
renames, file modes, strict-JSON logs, the run-directory lock, --out vs input checks, tokenizer
always present."""
import json
import os
import random
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import checkpoint
from support import data
import model as M
from support import hf_checkpoint
from test_dist import make_opt, tiny_model, train_steps


def test_train_state_round_trip(tmp_path):
    """save -> (new model from the checkpoint, new optimizer) -> load: same optimizer state, step,
    extra and RNG streams, and the next optimizer step gives bitwise the same weights."""
    model = tiny_model()
    opt = make_opt(model)
    train_steps(model, opt, 2)
    path = str(tmp_path / "ck")
    torch.manual_seed(123), np.random.seed(5), random.seed(9)
    checkpoint.save(path, model, opt, step=2, extra={"epoch": 0, "note": "x"})
    expect_rng = (torch.rand(4), np.random.rand(3), random.random())

    files = sorted(os.listdir(path))
    assert {"config.json", "model.safetensors", "train", "train_state.json",
            "rng_rank0.safetensors", "rng_rank0.json"} <= set(files)
    files += ["train/" + f for f in os.listdir(os.path.join(path, "train"))]
    assert all(f.endswith((".json", ".safetensors")) for f in files if f != "train"), files  # nothing pickled
    assert not os.path.exists(path + ".tmp")

    torch.manual_seed(0), np.random.seed(0), random.seed(0)  # scramble, load must restore
    model2 = M.from_pretrained(path)
    model2.train()
    opt2 = make_opt(model2)
    step, extra = checkpoint.load(path, model2, opt2)
    assert step == 2 and extra == {"epoch": 0, "note": "x"}
    got_rng = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got_rng[0], expect_rng[0]) and np.array_equal(got_rng[1], expect_rng[1])
    assert got_rng[2] == expect_rng[2]

    names = {id(p): n for n, p in model.named_parameters()}
    names2 = {n: p for n, p in model2.named_parameters()}
    for p, st in opt.state.items():
        st2 = opt2.state[names2[names[id(p)]]]
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], st2[k]), (names[id(p)], k)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95) and opt2.param_groups[0]["weight_decay"] == 0.1

    train_steps(model, opt, 1, seed=1)
    train_steps(model2, opt2, 1, seed=1)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n


def test_save_is_atomic_and_replaces(tmp_path):
    """A stale half-written .tmp dir is ignored and cleaned; saving over an existing checkpoint
    replaces it completely."""
    model = tiny_model()
    opt = make_opt(model)
    train_steps(model, opt, 1)
    path = str(tmp_path / "ck")
    os.makedirs(path + ".tmp")
    with open(os.path.join(path + ".tmp", "junk.bin"), "w") as f:
        f.write("half written")
    checkpoint.save(path, model, opt, step=1)
    train_steps(model, opt, 1)
    checkpoint.save(path, model, opt, step=2, extra={"k": 1})
    with open(os.path.join(path, "train_state.json")) as f:
        assert json.load(f)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ck"] and "junk.bin" not in os.listdir(path)
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        checkpoint.load(str(tmp_path), model, opt)


def test_recover_after_kill_between_the_two_renames(tmp_path):
    """save publishes with checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint. Killed in
    between, there is no checkpoint/: recover() puts the newest complete state back (step 2, from
    .tmp), deletes nothing; with only .old left it restores that. An incomplete .tmp (no
    train_state.json: killed while writing) is never taken."""
    model, path = tiny_model(), str(tmp_path / "checkpoint")
    opt = make_opt(model)
    train_steps(model, opt, 1)
    checkpoint.save(path, model, opt, step=1)
    shutil.copytree(path, path + ".keep1")
    train_steps(model, opt, 1)
    checkpoint.save(path, model, opt, step=2)
    os.rename(path, path + ".tmp")                                     # the state after the first rename
    shutil.copytree(path + ".keep1", path + ".old")
    assert checkpoint.recover(path) and checkpoint.saved_step(path) == 2
    assert os.path.isdir(path + ".old")                                # nothing deleted
    shutil.rmtree(path)
    os.makedirs(path + ".tmp")                                         # a half-written new one
    assert checkpoint.recover(path) and checkpoint.saved_step(path) == 1   # the .old one
    assert not checkpoint.recover(str(tmp_path / "none"))


def test_checkpoint_files_respect_umask(tmp_path):
    """safetensors' save_file writes 0600; a checkpoint must be readable by the group / others
    as the umask allows (0644 under umask 022), like every other file the run writes."""
    old = os.umask(0o022)
    try:
        model, path = tiny_model(), str(tmp_path / "ck")
        opt = make_opt(model)
        train_steps(model, opt, 1)
        checkpoint.save(path, model, opt, step=1)
        files = [os.path.join(d, n) for d in (path, os.path.join(path, "train")) for n in os.listdir(d)]
        files = [f for f in files if os.path.isfile(f)]
        assert any("/train/" in f for f in files)
        for f in files:
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
        checkpoint.export_final(path, str(tmp_path))
        assert stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode) == 0o644
    finally:
        os.umask(old)


def test_save_refuses_a_missing_tokenizer(tmp_path):
    model = tiny_model()
    opt = make_opt(model)
    with pytest.raises(checkpoint.RunError, match="no tokenizer.json"):
        checkpoint.save(str(tmp_path / "ck"), model, opt, step=1, tokenizer_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "ck")


def test_log_lines_are_strict_json(tmp_path):
    """json.dumps writes NaN / Infinity, which strict parsers reject: they become null."""
    path = str(tmp_path / "log.jsonl")
    checkpoint.append_log(path, {"step": 1, "loss": float("nan"), "x": [float("inf"), 1.0], "d": {"y": -float("inf")}})
    checkpoint.append_log(path, {"step": 2, "loss": 1.5})
    strict = lambda c: (_ for _ in ()).throw(ValueError(c))
    rows = [json.loads(line, parse_constant=strict) for line in open(path)]
    assert rows[0] == {"step": 1, "loss": None, "x": [None, 1.0], "d": {"y": None}}
    checkpoint.truncate_log(path, 1)
    assert [json.loads(line, parse_constant=strict)["step"] for line in open(path)] == [1]
    data.write_json_atomic(str(tmp_path / "a.json"), {"v": float("nan")})
    assert json.load(open(tmp_path / "a.json")) == {"v": None}


def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(out)
        with open(os.path.join(out, "lock"), "w") as f:
            f.write(f"{holder.pid} {__import__('socket').gethostname()}")
        with pytest.raises(checkpoint.RunError, match=f"in use by pid {holder.pid}"):
            checkpoint.lock_run_dir("grpo.py", out)
    finally:
        holder.kill()
        holder.wait()
    checkpoint.lock_run_dir("grpo.py", out)                            # dead pid: taken over
    assert open(os.path.join(out, "lock")).read().split()[0] == str(os.getpid())
    checkpoint.release_lock(out)
    assert not os.path.exists(os.path.join(out, "lock"))


def test_out_must_not_be_an_input(tmp_path):
    m = str(tmp_path / "model")
    for out in (m, m + "/", os.path.join(m, "sub")):
        with pytest.raises(checkpoint.RunError, match="overwrite its own input"):
            checkpoint.check_out_dir("grpo.py", out, {"--model": m})
    checkpoint.check_out_dir("grpo.py", str(tmp_path / "model2"), {"--model": m})
    # the input inside out/ (--init RUN/checkpoint --out RUN): a save would replace it
    with pytest.raises(checkpoint.RunError, match=r"contains --model .*overwrite its own input"):
        checkpoint.check_out_dir("grpo.py", str(tmp_path), {"--model": m})


def test_preprocessor_config_travels_from_the_model_to_every_save_and_the_export(tmp_path):
    """install_tokenizer writes the run's preprocessor_config.json (the source's pixel budget, the
    --max_pixels override winning) beside the tokenizer; every checkpoint and the final export
    carry it, and hf_checkpoint.image_config reads the override back from them."""
    import test_model
    src = tmp_path / "src"
    src.mkdir()
    data.train_tokenizer(["a b c"], str(src), vocab_size=300)
    (src / "preprocessor_config.json").write_text(json.dumps(test_model.QWEN25_VL_7B_PREPROCESSOR))
    out = tmp_path / "run"
    tok_dir = checkpoint.install_tokenizer("grpo.py", str(src), str(out))
    assert hf_checkpoint.image_config(tok_dir).max_pixels == 12845056                  # the source's, not 28*28*1280
    tok_dir = checkpoint.install_tokenizer("grpo.py", str(src), str(out), max_pixels=28 * 28 * 256)
    model = tiny_model()
    opt = make_opt(model)
    checkpoint.save(str(out / "checkpoint"), model, opt, step=1, tokenizer_dir=tok_dir)
    checkpoint.export_final(str(out / "checkpoint"), str(out))
    for d in (tok_dir, out / "checkpoint", out):
        c = hf_checkpoint.image_config(str(d))
        assert (c.min_pixels, c.max_pixels) == (3136, 28 * 28 * 256), d
    with pytest.raises(checkpoint.RunError, match="grpo.py: --max_pixels: max_pixels 10 must be >= min_pixels 3136"):
        checkpoint.install_tokenizer("grpo.py", str(src), str(out), max_pixels=10)
