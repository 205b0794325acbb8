"""sft.py: assistant-only loss against transformers, data order, schedule, bad input, and (slow)
end to end: torchrun x2 == 1 process, kill -9 + rerun == uninterrupted run, output loadable by
transformers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support import checkpoint
from support import data
import model as M
import sft
from support import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vision_depth": 1, "vision_hidden_size": 32, "vision_intermediate_size": 64,
        "vision_num_heads": 2, "vision_fullatt_block_indexes": [0]}
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}


def make_dataset(d, n=24, seed=0):
    """n records: an image with k colored squares, 'How many squares?', answer k. Image sizes vary
    (56..112 px), so sequence lengths vary."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    lines = []
    for i in range(n):
        size = 56 + 28 * int(torch.randint(0, 3, (1,), generator=g))
        k = 1 + int(torch.randint(0, 4, (1,), generator=g))
        color = list(COLORS)[int(torch.randint(0, 3, (1,), generator=g))]
        img = Image.new("RGB", (size, size), "white")
        for j in range(k):
            img.paste(COLORS[color], (4 + 12 * j, 4, 12 + 12 * j, 12))
        img.save(os.path.join(d, "images", f"{i}.png"))
        think = " ".join(f"{color} {j + 1}" for j in range(k)) * (1 + i % 3)
        rec = {"id": f"r{i}", "answer": str(k), "messages": [
            {"role": "system", "content": data.SYSTEM_PROMPT_SINGLE},
            {"role": "user", "content": [{"type": "image", "image": f"images/{i}.png"},
                                         {"type": "text", "text": "How many squares are there?"}]},
            {"role": "assistant", "content": f"<think>{think}</think>\n<answer>{k}</answer>"}]}
        lines.append(json.dumps(rec))
    path = os.path.join(d, "train.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("sftdata")))


@pytest.fixture(scope="module")
def tok(dataset, tmp_path_factory):
    return data.train_tokenizer(sft.tokenizer_texts(dataset), str(tmp_path_factory.mktemp("tok")), vocab_size=400)


def test_assistant_only_loss_matches_transformers(dataset, tok, tmp_path):
    """micro_loss = sum of CE over assistant tokens; transformers' loss with labels = -100 outside
    the assistant tokens is its mean. Same checkpoint, right-padded batch of different lengths."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cfg = sft.SFTConfig(tiny=json.dumps(TINY))
    model = sft.build_tiny(tok, cfg)
    M.save_pretrained(model, str(tmp_path / "ck"), tokenizer_dir=os.path.dirname(tok.path))
    examples = sft.load_examples(dataset, tok, None)
    batch = sft.encode_batch([0, 1, 2, 5], examples, tok, "cpu")
    assert batch["input_ids"].shape[0] == 4 and (batch["attention_mask"] == 0).any()  # padding present
    loss_sum, n = sft.micro_loss(model, batch, torch.autocast("cpu", enabled=False))
    assert n == sum(examples[i].n_loss for i in [0, 1, 2, 5])

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "ck"), dtype=torch.float32).eval()
    labels = batch["input_ids"].masked_fill(~batch["assistant_mask"], -100)
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    torch.testing.assert_close(loss_sum / n, out.loss, rtol=1e-5, atol=1e-5)
    # the mask covers exactly the assistant content + <|im_end|>
    first = batch["input_ids"][0][batch["assistant_mask"][0]]
    assert tok.decode(first).startswith("<think>") and first[-1] == tok.im_end_id


def test_tiny_model_special_ids_are_the_tokenizers(tok):
    """Every vision special id of the tiny model is the tokenizer's own token, and none of them
    sits on a format tag (the sampler never draws the image/video pads, so a pad id on <reflection>
    would make the two-pass format unsampleable)."""
    import sft
    cfg = sft.build_tiny(tok, sft.SFTConfig()).config
    assert cfg.image_token_id == tok.encode("<|image_pad|>")[0]
    assert cfg.video_token_id == tok.encode("<|video_pad|>")[0]
    assert cfg.vision_start_token_id == tok.encode("<|vision_start|>")[0]
    assert cfg.vision_end_token_id == tok.encode("<|vision_end|>")[0]
    tags = {tok.encode(t)[0] for t in data.FORMAT_TAGS}
    assert not tags & {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}


def test_data_order_is_deterministic_bucketed_and_sharded(dataset, tok):
    examples = sft.load_examples(dataset, tok, None)
    cfg = sft.SFTConfig(batch_size=8, bucket=3, seed=3)
    e0, e0b, e1 = (sft.epoch_batches(examples, cfg, 0), sft.epoch_batches(examples, cfg, 0),
                   sft.epoch_batches(examples, cfg, 1))
    assert e0 == e0b and e0 != e1
    flat = [i for b in e0 for i in b]
    assert len(e0) == 3 and all(len(b) == 8 for b in e0) and sorted(flat) == list(range(24))
    # bucketing: padding of the bucketed batches is at most that of an unsorted split of the same window
    pad = lambda bs: sum(max(examples[i].length for i in b) * len(b) - sum(examples[i].length for i in b) for b in bs)
    plain = sft.epoch_batches(examples, sft.SFTConfig(batch_size=8, bucket=1, seed=3), 0)
    assert pad(e0) <= pad(plain)
    # each global batch is split into micro-batches dealt to the ranks: a partition
    b = e0[0]
    shares = [sft.rank_micro_batches(b, examples, 2, r, 2) for r in range(2)]
    assert all(len(s) == 2 for s in shares)
    assert sorted(i for s in shares for mb in s for i in mb) == sorted(b)


def test_lr_schedule():
    cfg = sft.SFTConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert sft.lr_at(0, 14, cfg) == pytest.approx(0.25)
    assert sft.lr_at(3, 14, cfg) == pytest.approx(1.0)
    assert sft.lr_at(4, 14, cfg) == pytest.approx(1.0)
    assert sft.lr_at(9, 14, cfg) == pytest.approx(0.55)   # halfway through the cosine: (1 + 0.1) / 2
    assert sft.lr_at(14, 14, cfg) == pytest.approx(0.1)
    assert [sft.lr_at(s, 4, cfg) for s in range(2)] == pytest.approx([0.5, 1.0])  # short run: warmup <= half


def _records(path):
    with open(path) as f:
        return f.read().split("\n")


def test_bad_input_names_file_and_line(dataset, tok, tmp_path):
    lines = [l for l in _records(dataset) if l]
    d = os.path.dirname(dataset)

    def write(name, ls):
        p = os.path.join(d, name)
        with open(p, "w") as f:
            f.write("\n".join(ls) + "\n")
        return p

    bad = write("bad_json.jsonl", lines[:2] + ['{"id": "x", "messages": [}'] + lines[3:5])
    with pytest.raises(ValueError, match=r"bad_json\.jsonl:3: invalid JSON"):
        sft.load_examples(bad, tok, None)

    missing = json.loads(lines[1])
    missing["messages"][1]["content"][0]["image"] = "images/nope.png"
    p = write("missing.jsonl", [lines[0], "", json.dumps(missing)])  # blank line: the record is on line 3
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: messages\[1\]\.content\[0\]\.image: image file not found: .*nope\.png"):
        sft.load_examples(p, tok, None)

    with open(os.path.join(d, "images", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    corrupt = json.loads(lines[1])
    corrupt["messages"][1]["content"][0]["image"] = "images/corrupt.png"
    p = write("corrupt.jsonl", [lines[0], json.dumps(corrupt)])
    with pytest.raises(ValueError, match=r"corrupt\.jsonl:2: messages\[1\]\.content\[0\]\.image: cannot read image .*corrupt\.png"):
        sft.load_examples(p, tok, None)

    no_asst = json.loads(lines[0])
    no_asst["messages"] = no_asst["messages"][:2]
    p = write("no_asst.jsonl", [lines[1], json.dumps(no_asst)])
    with pytest.raises(ValueError, match=r"no_asst\.jsonl:2: no assistant message"):
        sft.load_examples(p, tok, None)

    no_msgs = {"id": "y", "answer": "1"}
    p = write("no_msgs.jsonl", [json.dumps(no_msgs)])
    with pytest.raises(ValueError, match=r"no_msgs\.jsonl:1: field 'messages'"):
        sft.load_examples(p, tok, None)


def test_vision_lr_scale(tok):
    """Adam's first step moves every weight by ~lr (|g| / (|g| + eps) ~ 1), so with
    vision_lr_scale 0.1 the vision tower moves by ~0.1 lr and the language model by ~lr."""
    cfg = sft.SFTConfig(lr=1e-3, vision_lr_scale=0.1)
    model = sft.build_tiny(tok, cfg)
    opt = training.make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), cfg.vision_lr_scale)  # as sft.setup
    training.set_lr(opt, cfg.lr)  # as the training loop does
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    vision = [v for n, v in moved.items() if n.startswith("visual.")]
    text = [v for n, v in moved.items() if not n.startswith("visual.")]
    assert vision and text
    assert all(abs(v - 1e-4) < 1e-6 for v in vision), vision
    assert all(abs(v - 1e-3) < 1e-6 for v in text), text


def test_freeze_vision_and_init_from_checkpoint(dataset, tmp_path):
    """In-process run from scratch, then --init from its output with --freeze_vision: the vision
    tower is bit-for-bit the one it started from, the language model moved, the loss went down
    and the optimizer holds no vision state."""
    base, stage1 = str(tmp_path / "base"), str(tmp_path / "stage1")
    sft.train(sft.parse_args(_args(dataset, base, steps=3, save_every=10)))
    argv = _args(dataset, stage1, steps=4, save_every=10)
    argv[argv.index("--init") + 1] = base
    sft.train(sft.parse_args(argv + ["--freeze_vision", "1"]))
    w0, w1 = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(stage1, "model.safetensors"))
    vision = [k for k in w0 if "visual." in k]
    assert vision and all(torch.equal(w0[k], w1[k]) for k in vision)
    emb = next(k for k in w0 if k.endswith("embed_tokens.weight"))
    assert not torch.equal(w0[emb], w1[emb])
    opt = checkpoint.read_optimizer_state(os.path.join(stage1, "checkpoint"))
    assert opt and not any(k.startswith("visual.") for k in opt)
    assert os.path.exists(os.path.join(stage1, "tokenizer.json"))
    losses = _losses(stage1)
    assert len(losses) == 4 and losses[-1] < _losses(base)[0]


# ----------------------------------------------------------------------------- end to end (subprocess)

def _args(data_path, out, steps=6, save_every=2):
    return ["--data", data_path, "--out", out, "--init", "tiny", "--tiny", json.dumps(TINY), "--vocab_size", "400",
            "--max_steps", str(steps), "--batch_size", "8", "--micro_batch_size", "2", "--save_every", str(save_every),
            "--lr", "3e-3", "--warmup_steps", "2", "--seed", "7"]


def _env(threads=1):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)


def _run(cmd, threads=1, timeout=240):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _ckpt_step(out):
    try:
        with open(os.path.join(out, "checkpoint", "train_state.json")) as f:
            return json.load(f)["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _losses(out):
    return [r["loss"] for r in data.read_jsonl(os.path.join(out, "log.jsonl"))]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(dataset, tmp_path):
    """Same global batch (8 = 1 x 4 x 2 = 2 x 2 x 2): the loss curves agree to 1e-5 relative and
    the final weights to 1e-5 absolute (only float summation order differs)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, "sft.py"] + _args(dataset, one, steps=6, save_every=3))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
          "sft.py"] + _args(dataset, two, steps=6, save_every=3))
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 6 and l1[-1] < l1[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    w1, w2 = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    # the distributed run's sharded optimizer checkpoint puts together to the full state
    o1 = checkpoint.read_optimizer_state(os.path.join(one, "checkpoint"))
    o2 = checkpoint.read_optimizer_state(os.path.join(two, "checkpoint"))
    assert o1.keys() == o2.keys() and all(o1[k].shape == o2[k].shape for k in o1)


@pytest.mark.slow
def test_kill9_then_rerun_gives_same_weights(dataset, tmp_path):
    """Uninterrupted run vs a run killed with SIGKILL after its step-4 checkpoint, then rerun with
    the same command: bitwise identical final weights, and a log with each step once."""
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    _run([sys.executable, "sft.py"] + _args(dataset, ref, steps=8, save_every=2))

    cmd = [sys.executable, "sft.py"] + _args(dataset, killed, steps=8, save_every=2)
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while _ckpt_step(killed) < 4 and p.poll() is None and time.time() - t0 < 180:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(killed, "model.safetensors")), "run finished before the kill"
    r = _run(cmd)
    assert "resuming from" in r.stdout

    w_ref, w_res = (load_file(os.path.join(ref, "model.safetensors")),
                    load_file(os.path.join(killed, "model.safetensors")))
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    steps = [r["step"] for r in data.read_jsonl(os.path.join(killed, "log.jsonl"))]
    assert steps == list(range(1, 9))
    assert _losses(killed) == _losses(ref)
    # out/ is a complete HF checkpoint: transformers loads it, our tokenizer loads it
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(killed, dtype=torch.float32)
    assert torch.equal(hf.get_input_embeddings().weight, M.from_pretrained(killed).embed_tokens.weight)
    assert data.Tokenizer.from_dir(killed).vocab_size == hf.config.text_config.vocab_size


# ----------------------------------------------------------------------------- reliability

def test_tokenizer_corpus_adds_texts_and_names_bad_lines(dataset, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps("a teacher reflection") + "\n\n" + json.dumps("<reflection>x</reflection>") + "\n")
    texts = sft.tokenizer_texts(dataset, str(corpus))
    assert texts[-2:] == ["a teacher reflection", "<reflection>x</reflection>"]
    assert len(texts) == len(sft.tokenizer_texts(dataset)) + 2
    corpus.write_text(json.dumps("ok") + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: expected a JSON string"):
        sft.tokenizer_texts(dataset, str(corpus))


def test_general_modules_do_not_import_task():
    """demo/task.py is the built-in task; the stage files and support/ are general."""
    import ast
    import glob
    for path in [os.path.join(ROOT, n) for n in ("sft.py", "grpo.py")] + glob.glob(os.path.join(ROOT, "support", "*.py")):
        tree = ast.parse(open(path).read())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m and m.split(".")[0] in ("task", "demo") for m in mods), path


def test_resume_keeps_the_tokenizer(dataset, tmp_path):
    """Resumed runs used to copy the tokenizer from the checkpoint they resumed from, which a
    later save deleted: the checkpoints after it (and the final export) had no tokenizer.json.
    Now the run's tokenizer lives in out/tokenizer/ and every save copies it from there."""
    out = str(tmp_path / "run")
    sft.train(sft.parse_args(_args(dataset, out, steps=2, save_every=2)))
    sft.train(sft.parse_args(_args(dataset, out, steps=8, save_every=2)))      # resumes at 2, saves 4, 6, 8
    for d in (out, os.path.join(out, "checkpoint"), os.path.join(out, "tokenizer")):
        assert os.path.exists(os.path.join(d, "tokenizer.json")), d
    assert [r["step"] for r in data.read_jsonl(os.path.join(out, "log.jsonl"))] == list(range(1, 9))
    assert not os.path.exists(os.path.join(out, "lock"))                      # released at the end


def test_non_finite_loss_stops_with_an_error(dataset, tmp_path):
    """NaN weights: the first loss is NaN. The run stops before the optimizer step with an error
    (exit status 1 from the command line), and log.jsonl stays strict JSON. --lr inf is refused."""
    with pytest.raises(ValueError, match="--lr inf: must be a finite number"):
        sft.parse_args(_args(dataset, str(tmp_path / "x")) + ["--lr", "inf"])
    base = str(tmp_path / "base")
    sft.train(sft.parse_args(_args(dataset, base, steps=1, save_every=10)))
    net = M.from_pretrained(base)
    with torch.no_grad():
        net.embed_tokens.weight[3] = float("nan")
    M.save_pretrained(net, str(tmp_path / "nan"), tokenizer_dir=base)
    argv = _args(dataset, str(tmp_path / "out"), steps=3)
    argv[argv.index("--init") + 1] = str(tmp_path / "nan")
    with pytest.raises(sft.checkpoint.NonFiniteLoss, match=r"step 1: non-finite loss nan"):
        sft.train(sft.parse_args(argv))
    strict = lambda c: (_ for _ in ()).throw(ValueError(c))
    rows = [json.loads(line, parse_constant=strict) for line in open(tmp_path / "out" / "log.jsonl")]
    assert len(rows) == 1 and "error" in rows[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoint")
    r = subprocess.run([sys.executable, "sft.py"] + argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 1 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag,value", [("batch_size", "0"), ("micro_batch_size", "0"), ("lr", "nan"),
                                        ("min_lr", "-1"), ("grad_clip", "-1"), ("epochs", "0")])
def test_bad_values_name_their_flag(flag, value):
    with pytest.raises(ValueError, match=f"--{flag} "):
        sft.parse_args([f"--{flag}", value])


def test_no_arguments_says_what_to_run(tmp_path):
    """`python sft.py` / `python grpo.py` in a directory without runs/demo: one line naming the
    missing file and the pipeline command that makes it; no traceback, exit status 1."""
    for script, want in (("sft.py", "python pipeline.py --only task`"),
                         ("grpo.py", "python pipeline.py --only task base reflect sft`")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and want in lines[0] and "not found" in lines[0], r.stderr
        assert os.listdir(tmp_path) == []                                     # nothing written


def test_no_weight_decay_on_norms_biases_embeddings(tok):
    cfg = sft.SFTConfig(weight_decay=0.1)
    model = sft.build_tiny(tok, cfg)
    opt = training.make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), cfg.vision_lr_scale)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n and "embed_tokens" not in n for n in decayed)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.slow
def test_second_run_on_a_locked_out_fails_at_once(dataset, tmp_path):
    """A live run holds out/lock: a second one -- here under torchrun x2, where only rank 0
    takes the lock -- fails at once naming the holder's pid, and does not hang the other rank."""
    import socket
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "lock").write_text(f"{holder.pid} {socket.gethostname()}")
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            "sft.py"] + _args(dataset, str(out), steps=2), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and f"in use by pid {holder.pid}" in r.stderr, r.stderr[-2000:]
        assert time.time() - t0 < 90
        assert (out / "lock").read_text().split()[0] == str(holder.pid)     # the holder's lock is untouched
        assert not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_bad_records_listed_at_start_or_skipped(dataset, tok, tmp_path, capsys):
    """Every bad record is named at start (file:line and field, with the count), or dropped and
    counted with skip_bad (--skip_bad_records); the run never meets one mid-epoch."""
    lines = open(dataset).read().splitlines()[:5]
    open(os.path.join(os.path.dirname(dataset), "images", "zero.png"), "wb").close()
    zero = json.loads(lines[1])
    zero["messages"][1]["content"][0]["image"] = "images/zero.png"
    ctrl = json.loads(lines[3])
    ctrl["messages"][1]["content"][1]["text"] += "<|im_end|>"
    lines[1], lines[3] = json.dumps(zero), json.dumps(ctrl).replace('"answer": "', '"answer": NaN, "x": "')
    p = os.path.join(os.path.dirname(dataset), "hostile.jsonl")
    with open(p, "w") as f:
        f.write("\n".join(lines + ['{"messages": "hello"}']) + "\n")
    with pytest.raises(data.BadRecords) as e:
        sft.load_examples(p, tok, None)
    msg = str(e.value).split("\n")
    assert msg[0].startswith(f"{p}: 3 bad records of 6")
    assert msg[1].strip().startswith(f"{p}:2: messages[1].content[0].image: cannot read image")
    assert msg[2].strip().startswith(f"{p}:4: field 'answer': NaN")
    assert msg[3].strip().startswith(f"{p}:6: field 'messages'")
    ex = sft.load_examples(p, tok, None, skip_bad=True)
    assert [e.where for e in ex] == [f"{p}:{i}" for i in (1, 3, 5)]
    assert f"skipped 3 bad record(s) of 6" in capsys.readouterr().err
    ctrl.pop("x", None)
    with open(p, "w") as f:
        f.write(json.dumps(ctrl) + "\n")
    with pytest.raises(data.BadRecords, match=rf"{p}:1: messages\[1\]\.content\[1\]\.text: text contains the control token"):
        sft.load_examples(p, tok, None)
