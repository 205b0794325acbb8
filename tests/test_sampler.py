"""sampler.py against independent references: transformers' Qwen2_5_VLForConditionalGeneration
(generate, full forward, logits warpers) loaded with the same random weights."""
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch

from support import data
import model as M
import sampler as S

VOCAB = 256
PAD = 0
NEVER = 10 ** 6  # an eos id for transformers that no token matches: no stop, no eos suppression


def random_model(seed=0):
    """Tiny Qwen2.5-VL with weights big enough for peaked, non-degenerate next-token distributions."""
    torch.manual_seed(seed)
    cfg = M.tiny_config(vocab_size=VOCAB, tie_word_embeddings=False)
    net = M.Qwen2_5_VL(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2 and not name.startswith("visual"):
                p.normal_(0.0, 0.12)
    return net


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box has 2 cores, shared with other test processes: 2 torch threads on an oversubscribed
    machine make each small op wait for a descheduled thread (10-100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration
    net = random_model()
    path = str(tmp_path_factory.mktemp("tiny"))
    M.save_pretrained(net, path)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return net, hf


def prompt(cfg, gen, parts):
    """parts: ints (that many random text tokens) and (t, h, w) image grids -> encode_messages-like dict."""
    ids, pixels, grids = [], [], []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(1, 200, (part,), generator=gen).tolist()
        else:
            t, h, w = part
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
            pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen))
            grids.append(torch.tensor([t, h, w]))
    ids = torch.tensor(ids)
    return dict(input_ids=ids, assistant_mask=torch.zeros_like(ids, dtype=torch.bool),
                pixel_values=torch.cat(pixels) if pixels else None,
                image_grid_thw=torch.stack(grids) if grids else None)


PROMPTS = [[5, (1, 4, 4), 3],                    # one image, 4 image tokens
           [7],                                  # text only
           [2, (1, 4, 6), 2, (1, 2, 2), 4],      # two images of different sizes
           [12, (1, 6, 4), 1]]


def make_batch(cfg, prompts=PROMPTS, repeat=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = [prompt(cfg, gen, p) for p in prompts]
    items = [it for it in items for _ in range(repeat)]  # prompt-major, as sampler rows
    return data.collate(items, PAD, left_pad=True)


def hf_inputs(batch, cfg):
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int())


def hf_logprobs(hf, cfg, batch, out, temperature):
    """log_softmax(logits / T) of the completion tokens from ONE full transformers forward over
    prompt + completion (completion right-padded, masked after its length)."""
    T, N = batch["input_ids"].shape[1], out["tokens"].shape[1]
    comp_mask = (torch.arange(N)[None] < out["lengths"][:, None]).long()
    full = dict(batch, input_ids=torch.cat([batch["input_ids"], out["tokens"]], 1),
                attention_mask=torch.cat([batch["attention_mask"], comp_mask], 1))
    with torch.no_grad():
        logits = hf(**hf_inputs(full, cfg)).logits[:, T - 1: T + N - 1].float()
    lp = torch.log_softmax(logits / temperature, -1).gather(-1, out["tokens"][..., None])[..., 0]
    return lp * comp_mask, comp_mask.bool()


@pytest.mark.parametrize("compile", [True, False])  # torch.compile'd decode step / eager
def test_greedy_matches_transformers_generate(models, compile):
    net, hf = models
    cfg = net.config
    batch = make_batch(cfg)
    T, N = batch["input_ids"].shape[1], 24
    # 1) no eos: exactly N tokens on both sides
    # transformers suppresses nothing
    sc = S.SampleConfig(max_new_tokens=N, greedy=True, suppress_ids=(), compile=compile)
    ours = S.generate(net, batch, [], sc, pad_id=PAD)
    ref = hf.generate(**hf_inputs(batch, cfg), do_sample=False, max_new_tokens=N, eos_token_id=NEVER)[:, T:]
    assert ours["tokens"].shape == (4, N)
    assert torch.equal(ours["tokens"], ref)
    assert len(set(ours["tokens"][0].tolist())) > 3  # not a degenerate repeat-one-token model
    # 2) per-row stop: eos = a token each row reaches at a different step (or never)
    eos = [int(ours["tokens"][0, 5]), int(ours["tokens"][2, 11])]
    stop = S.generate(net, batch, eos, sc, pad_id=PAD)
    ref = hf.generate(**hf_inputs(batch, cfg), do_sample=False, max_new_tokens=N, eos_token_id=eos,
                      pad_token_id=PAD)[:, T:]
    ref = torch.cat([ref, torch.full((4, N - ref.shape[1]), PAD)], 1)
    assert torch.equal(stop["tokens"], ref)
    for r in range(4):
        hits = [i for i, t in enumerate(ours["tokens"][r].tolist()) if t in eos]
        want = hits[0] + 1 if hits else N
        assert stop["lengths"][r] == want
        assert stop["finish_reasons"][r] == ("stop" if hits else "length")
        assert torch.equal(stop["tokens"][r, :want], ours["tokens"][r, :want])
        assert (stop["logprobs"][r, want:] == 0).all()
    assert len(set(stop["lengths"].tolist())) > 1


def test_text_only_batch_matches_transformers(models):
    net, hf = models
    cfg = net.config
    batch = make_batch(cfg, prompts=[[9], [4], [13]])
    assert batch["pixel_values"] is None
    T, N = batch["input_ids"].shape[1], 10
    sc = S.SampleConfig(max_new_tokens=N, greedy=True, suppress_ids=(), prefill_chunk=2)
    ours = S.generate(net, batch, [], sc)
    ref = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                      max_new_tokens=N, eos_token_id=NEVER)[:, T:]
    assert torch.equal(ours["tokens"], ref)


@pytest.mark.parametrize("compile", [True, False])
def test_logprobs_equal_full_forward(models, compile):
    net, hf = models
    cfg = net.config
    n, temp = 3, 0.8
    eos = list(range(40, 48))  # ~3% of the vocabulary: some rows stop early
    sc = S.SampleConfig(max_new_tokens=20, temperature=temp, top_k=50, top_p=0.9, n=n, seed=3, compile=compile)
    out = S.generate(net, make_batch(cfg), eos, sc, pad_id=PAD)
    assert out["tokens"].shape == (4 * n, 20) and out["logprobs"].dtype == torch.float32
    ref, valid = hf_logprobs(hf, cfg, make_batch(cfg, repeat=n), out, temp)  # rows prompt-major
    assert (out["logprobs"] - ref).abs().max() < 1e-4
    assert (out["tokens"][~valid] == PAD).all()
    for r in range(4 * n):
        L = int(out["lengths"][r])
        body = out["tokens"][r, :L].tolist()
        assert not any(t in eos for t in body[:-1]) and len(body) == L
        assert out["finish_reasons"][r] == ("stop" if body[-1] in eos else "length")
    assert "stop" in out["finish_reasons"] and "length" in out["finish_reasons"]


def test_seeded_reproducible_and_compaction_invariant(models):
    net, _ = models
    cfg = net.config
    batch, eos = make_batch(cfg), list(range(40, 56))
    sc = S.SampleConfig(max_new_tokens=16, temperature=1.0, n=4, seed=7)
    a = S.generate(net, batch, eos, sc)
    b = S.generate(net, batch, eos, sc)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["logprobs"], b["logprobs"])
    c = S.generate(net, batch, eos, S.SampleConfig(max_new_tokens=16, n=4, seed=8))
    assert not torch.equal(a["tokens"], c["tokens"])
    # the n samples of one prompt are different samples
    assert len({tuple(row) for row in a["tokens"][:4].tolist()}) > 1
    # dropping finished rows from the batch (at every finish / never) and prefilling one prompt
    # or three prompts per forward change nothing
    for frac, chunk in ((0.0, 1), (2.0, 3)):
        d = S.generate(net, batch, eos, S.SampleConfig(max_new_tokens=16, n=4, seed=7, compact_frac=frac,
                                                       prefill_chunk=chunk))
        assert torch.equal(a["tokens"], d["tokens"]) and torch.equal(a["lengths"], d["lengths"])
        assert (a["logprobs"] - d["logprobs"]).abs().max() < 1e-5
    assert "stop" in a["finish_reasons"]


def test_compaction_never_leaves_one_row_or_one_group(models, monkeypatch):
    """Dropping finished rows keeps at least 2 rows in 2 groups in the decode step (a compiled
    graph specializes sizes of 1: one live row or one live group would compile a graph of its own),
    keeping finished rows as needed, and samples exactly what never compacting samples."""
    net, _ = models
    batch, eos = make_batch(net.config), list(range(40, 56))
    seen = []  # (rows K, groups P) of every decode step

    def recording(model, cfg):
        def step(model, tok, cos, sin, pk, *rest):
            seen.append((tok.shape[0], pk.shape[1]))
            return S.decode_step(model, tok, cos, sin, pk, *rest)
        return step
    monkeypatch.setattr(S, "decode_fn", recording)
    for n in (1, 4):
        seen.clear()
        kw = dict(max_new_tokens=40, temperature=1.0, n=n, seed=14, compile=False)  # seed 14: one group alone with 2+ rows
        a = S.generate(net, batch, eos, S.SampleConfig(**kw, compact_frac=0.0))
        assert seen and min(k for k, _ in seen) >= 2 and min(p for _, p in seen) >= 2, (n, seen)
        live = (a["lengths"][:, None] > torch.arange(40)).view(4, n, 40)  # (group, sample, step)
        alive, alive_rows = live.any(1).sum(0), live.sum((0, 1))  # groups / rows sampling per step
        if n == 4:  # a step where one group still samples with 2+ rows: the case that needs a kept row
            assert ((alive == 1) & (alive_rows >= 2)).any(), "the single-group case is not exercised"
        b = S.generate(net, batch, eos, S.SampleConfig(**kw, compact_frac=2.0))
        assert torch.equal(a["tokens"], b["tokens"]) and (a["logprobs"] - b["logprobs"]).abs().max() < 1e-5


def test_compile_fallback_and_off_switches(models, monkeypatch):
    """The compiled decode step samples what the eager one does; a torch.compile that fails (e.g.
    no C++ compiler) warns once and decodes eagerly; compile=False and SRPO_COMPILE=0 never compile."""
    net, _ = models
    batch, eos = make_batch(net.config), list(range(40, 56))
    kw = dict(max_new_tokens=12, temperature=1.0, n=2, seed=5)
    compiled = S.generate(net, batch, eos, S.SampleConfig(**kw))
    eager = S.generate(net, batch, eos, S.SampleConfig(**kw, compile=False))
    assert torch.equal(compiled["tokens"], eager["tokens"]) and torch.equal(compiled["lengths"], eager["lengths"])
    assert (compiled["logprobs"] - eager["logprobs"]).abs().max() < 1e-5

    def broken(*args):
        raise RuntimeError("InductorError: no C++ compiler")
    monkeypatch.setattr(S, "_cascade_step", None)
    monkeypatch.setattr(S, "compile_step", lambda fn, **kw: broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*Decoding eagerly"):
        out = S.generate(net, batch, eos, S.SampleConfig(**kw))
    assert S._cascade_step.failed  # not retried
    assert torch.equal(out["tokens"], eager["tokens"])

    monkeypatch.setattr(S, "_cascade_step", None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called"))
    for sc, env in ((S.SampleConfig(**kw, compile=False), "1"), (S.SampleConfig(**kw), "0")):
        monkeypatch.setenv("SRPO_COMPILE", env)
        assert torch.equal(S.generate(net, batch, eos, sc)["tokens"], eager["tokens"])


@pytest.mark.parametrize("path", ["cascade", "static"])
def test_wrong_compiled_step_warns_once_and_decodes_eagerly(models, monkeypatch, path):
    """A compiled step that computes garbage (as a stale inductor cache did) is caught by its first
    call's comparison with the eager step: one loud warning naming the cause, then eager decoding
    for the rest of the run, with the eager step's output."""
    net, _ = models
    batch, eos = make_batch(net.config), list(range(40, 56))
    kw = dict(max_new_tokens=12, temperature=1.0, n=2, seed=5, path=path)
    eager = S.generate(net, batch, eos, S.SampleConfig(**kw, compile=False))
    calls = []

    def wrong_compile(fn, **k):
        def garbage(*args):  # the eager step, its logits shifted as by misread memory
            calls.append(1)
            out = fn(*args)
            return (out[0] + 3.0, *out[1:]) if isinstance(out, tuple) else out * -1.0
        return garbage
    monkeypatch.setattr(S, "compile_step", wrong_compile)
    monkeypatch.setattr(S, "_cascade_step", None)
    monkeypatch.setattr(S, "_static_step", None)
    with pytest.warns(RuntimeWarning, match="disagrees with the eager step on the same inputs.*inductor cache") as rec:
        out = S.generate(net, batch, eos, S.SampleConfig(**kw))
        again = S.generate(net, batch, eos, S.SampleConfig(**kw))
    assert len([w for w in rec if "WARNING" in str(w.message)]) == 1
    assert len(calls) == 1  # the wrong step ran once, then never again
    for o in (out, again):
        assert torch.equal(o["tokens"], eager["tokens"]) and torch.equal(o["lengths"], eager["lengths"])


def test_compile_check_tolerance():
    a = torch.randn(4, 50)
    assert S.disagreement([a + 1e-5], [a], torch.float32) is None
    assert "max |compiled - eager|" in S.disagreement([a * 1.01], [a], torch.float32)
    assert S.disagreement([a * 1.01], [a], torch.bfloat16) is None  # bf16: one rounding is ~4e-3
    assert S.disagreement([a.masked_fill(a > 2, float("nan"))], [a], torch.bfloat16) is not None or not (a > 2).any()
    assert S.disagreement([a, a * 0], [a, a], torch.bfloat16) is not None


def test_inductor_cache_key_names_the_vector_isa():
    import torch.compiler.config as cc
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    old = cc.cache_key_tag
    try:
        cc.cache_key_tag = "mine"
        S.key_compile_cache()
        S.key_compile_cache()  # once
        assert cc.cache_key_tag.startswith("mine|srpo:") and cc.cache_key_tag.count("srpo:") == 1
        assert f"isa={pick_vec_isa()}" in cc.cache_key_tag and torch.__version__ in cc.cache_key_tag
    finally:
        cc.cache_key_tag = old


@pytest.mark.slow
def test_foreign_isa_cache_entry_not_reused(tmp_path):
    """bench/inductor_isa_cache.py: a cache entry written for AVX-512 code is reused by a plain
    process (the bug: wrong numbers on an AVX2-only CPU) and missed once key_compile_cache runs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "bench", "inductor_isa_cache.py"), "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {ln.split(":")[0]: ln for ln in res.stdout.splitlines() if ln.startswith(("untagged", "tagged"))}
    assert "cache hit" in lines["untagged"], res.stdout
    assert "cache miss" in lines["tagged"] and "correct" in lines["tagged"], res.stdout


# ----------------------------------------------------------------------------- the static path

def test_static_path_greedy_matches_transformers_and_cascade(models):
    """The fixed-shape loop (the CUDA default) on CPU, eager: token for token transformers' greedy
    generate and the cascade loop, with and without per-row eos stops."""
    net, hf = models
    cfg = net.config
    batch = make_batch(cfg)
    T, N = batch["input_ids"].shape[1], 24
    sc = S.SampleConfig(max_new_tokens=N, greedy=True, suppress_ids=(), compile=False, path="static")
    ours = S.generate(net, batch, [], sc, pad_id=PAD)
    ref = hf.generate(**hf_inputs(batch, cfg), do_sample=False, max_new_tokens=N, eos_token_id=NEVER)[:, T:]
    assert torch.equal(ours["tokens"], ref)
    eos = [int(ref[0, 5]), int(ref[2, 11])]
    stop = S.generate(net, batch, eos, sc, pad_id=PAD)
    ref = hf.generate(**hf_inputs(batch, cfg), do_sample=False, max_new_tokens=N, eos_token_id=eos,
                      pad_token_id=PAD)[:, T:]
    assert torch.equal(stop["tokens"], torch.cat([ref, torch.full((4, N - ref.shape[1]), PAD)], 1))
    cascade = S.generate(net, batch, eos, dataclasses.replace(sc, path="cascade"), pad_id=PAD)
    for k in ("tokens", "lengths"):
        assert torch.equal(stop[k], cascade[k])
    assert stop["finish_reasons"] == cascade["finish_reasons"] and len(set(stop["lengths"].tolist())) > 1


@pytest.mark.parametrize("eos_every", [1, 5])
def test_static_path_samples_what_cascade_samples(models, eos_every):
    """Top-k/top-p sampling, n per prompt, rows stopping at different steps: the static loop draws the
    same tokens as the cascade loop (the same uniform per output row and step), its log-probs are
    transformers' full forward's, and it stops once every row has (checked every eos_every steps)."""
    net, hf = models
    cfg = net.config
    n, temp = 3, 0.8
    eos = list(range(40, 48))
    kw = dict(max_new_tokens=20, temperature=temp, top_k=50, top_p=0.9, n=n, seed=3, compile=False)
    static = S.generate(net, make_batch(cfg), eos, S.SampleConfig(**kw, path="static", eos_every=eos_every), pad_id=PAD)
    cascade = S.generate(net, make_batch(cfg), eos, S.SampleConfig(**kw, path="cascade"), pad_id=PAD)
    assert torch.equal(static["tokens"], cascade["tokens"]) and torch.equal(static["lengths"], cascade["lengths"])
    assert static["finish_reasons"] == cascade["finish_reasons"]
    ref, valid = hf_logprobs(hf, cfg, make_batch(cfg, repeat=n), static, temp)
    assert (static["logprobs"] - ref).abs().max() < 1e-4 and (static["tokens"][~valid] == PAD).all()
    # every row stops early: the loop ends within eos_every steps of the last stop
    steps = []
    everything = list(range(VOCAB))
    S.generate(net, make_batch(cfg), everything, S.SampleConfig(**kw, path="static", eos_every=eos_every),
               stream=lambda step, rows, toks: steps.append(step))
    assert max(steps) == eos_every - 1


def test_static_path_cache_and_positions(models, monkeypatch):
    """One cache row per sample, capacity prompt + max_new rounded up to CAPACITY_MULTIPLE; the step
    sees the same position tensor shape every step (one graph)."""
    net, _ = models
    t = net.config.text
    shapes, seen = [], set()

    class Recording(M.KVCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            shapes.append(tuple(self.k.shape))
    orig = S.static_step

    def recording(model, tok, pos, *rest):
        seen.add((tuple(tok.shape), tuple(pos.shape)))
        return orig(model, tok, pos, *rest)
    monkeypatch.setattr(M, "KVCache", Recording)
    monkeypatch.setattr(S, "static_step", recording)
    batch = make_batch(net.config)
    T = batch["input_ids"].shape[1]
    S.generate(net, batch, [], S.SampleConfig(max_new_tokens=6, n=3, compile=False, path="static"))
    C = -(-(T + 6) // S.CAPACITY_MULTIPLE) * S.CAPACITY_MULTIPLE
    assert shapes == [(t.num_hidden_layers, 4, t.num_key_value_heads, T, t.head_dim),
                      (t.num_hidden_layers, 12, t.num_key_value_heads, C, t.head_dim)]
    assert seen == {((12,), (1,))}


def test_decode_path_choice():
    assert S.decode_path(S.SampleConfig(), "cpu") == "cascade"
    assert S.decode_path(S.SampleConfig(), "cuda") == "static"
    assert S.decode_path(S.SampleConfig(path="static"), "cpu") == "static"
    with pytest.raises(ValueError, match="path"):
        S.generate(None, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, [], S.SampleConfig(path="fast"))


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu():
    """bench/gpu_sampler.py's CPU dry run: every contender prints a row, and in fp32 our greedy
    tokens are transformers' on every row (the benchmark exits non-zero otherwise)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_sampler.py"), "--shape", "tiny", "--device",
                          "cpu", "--prompts", "2", "--samples", "2", "--new", "8", "--reps", "1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    for label in ("ours static + graph", "ours static eager", "ours cascade eager", "hf dynamic", "hf static+compile"):
        assert any(ln.startswith(label) and "ms/step" in ln for ln in res.stdout.splitlines()), (label, res.stdout)
    assert "2/2 rows identical over 8 tokens" in res.stdout


@pytest.mark.slow
def test_static_path_compiled_matches_eager(models):
    """The compiled static step (what CUDA captures in its graph) on CPU: the same greedy tokens."""
    net, _ = models
    batch = make_batch(net.config)
    sc = S.SampleConfig(max_new_tokens=16, greedy=True, suppress_ids=(), path="static")
    eager = S.generate(net, batch, [], dataclasses.replace(sc, compile=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed self-check would warn
        compiled = S.generate(net, batch, [], sc)
    assert torch.equal(compiled["tokens"], eager["tokens"])
    assert (compiled["logprobs"] - eager["logprobs"]).abs().max() < 1e-5
    assert S._static_step is not None and not S._static_step.failed


def test_top_k_top_p_temperature_distribution(models):
    """Empirical first-token frequencies over many samples vs transformers' logits warpers."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    net, hf = models
    cfg = net.config
    batch = make_batch(cfg, prompts=[PROMPTS[0]])
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = hf(**hf_inputs(batch, cfg)).logits[:, -1].float()  # (1, V)
    for temp, k, p in [(1.3, 0, 1.0), (0.7, 20, 1.0), (1.0, 0, 0.8), (1.5, 30, 0.9)]:
        scores = TemperatureLogitsWarper(temp)(batch["input_ids"], logits.clone())
        if k:
            scores = TopKLogitsWarper(k)(batch["input_ids"], scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(batch["input_ids"], scores)
        want = scores.softmax(-1)[0]
        n = 4000
        out = S.generate(net, batch, [], S.SampleConfig(max_new_tokens=1, temperature=temp, top_k=k, top_p=p,
                                                          n=n, seed=1, suppress_ids=()))
        count = torch.bincount(out["tokens"][:, 0], minlength=VOCAB).double()
        assert (count[want == 0] == 0).all(), "sampled a token outside top-k / top-p"
        expect = n * want[want > 0].double()
        chi2, dof = float(((count[want > 0] - expect) ** 2 / expect).sum()), int((want > 0).sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (temp, k, p, chi2, dof)  # ~6 sigma
        full = torch.log_softmax(logits[0] / temp, -1)  # returned logp: full-vocab, temperature-scaled
        assert (out["logprobs"][:, 0] - full[out["tokens"][:, 0]]).abs().max() < 1e-4
    # top_k=1 and a tiny top_p are greedy
    greedy = S.generate(net, batch, [], S.SampleConfig(max_new_tokens=12, greedy=True))
    for sc in (S.SampleConfig(max_new_tokens=12, top_k=1, seed=5), S.SampleConfig(max_new_tokens=12, top_p=1e-6)):
        assert torch.equal(S.generate(net, batch, [], sc)["tokens"], greedy["tokens"])
    assert T > 0


def test_suppressed_tokens_never_drawn():
    logits = torch.zeros(3, 10)
    logits[:, 3] = 50.0  # token 3 would be drawn (almost) surely
    logits[1, 7] = 2.0
    suppress = torch.tensor([3, 5])
    for sc in (S.SampleConfig(greedy=True), S.SampleConfig(temperature=0.5, top_k=4), S.SampleConfig(top_p=0.5)):
        for u in (0.0, 0.3, 0.999):
            tok, lp = S.sample_next(logits, sc, torch.full((3,), u), suppress)
            assert not any(t in (3, 5) for t in tok.tolist())
            want = torch.log_softmax(logits / sc.temperature, -1).gather(-1, tok[:, None])[:, 0]
            assert torch.allclose(lp, want)  # the policy's log-prob, suppression not folded in
            assert lp.max() < -40
    assert S.sample_next(logits, S.SampleConfig(greedy=True), torch.zeros(3), suppress)[0][1] == 7


def test_bad_input_is_a_clear_error(models):
    net, _ = models
    batch = data.collate([prompt(net.config, torch.Generator(), p) for p in ([3], [5])], PAD, left_pad=False)
    with pytest.raises(ValueError, match="LEFT-padded"):
        S.generate(net, batch, [], S.SampleConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="temperature"):
        S.generate(net, make_batch(net.config), [], S.SampleConfig(max_new_tokens=2, temperature=0.0))


# ----------------------------------------------------------------------------- FSDP2 (2 gloo ranks)

def _fsdp_worker(rank, port, q):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    net = random_model()
    cfg = net.config
    batch = make_batch(cfg)
    sc = S.SampleConfig(max_new_tokens=12, temperature=0.9, n=2, seed=4)
    # the reference decodes eagerly, as the sharded model does (compiled == eager is tested above;
    # compiling in two fresh processes at once took > 300 s on the loaded 2-core machine)
    ref = S.generate(net, batch, [40, 41], S.SampleConfig(max_new_tokens=12, temperature=0.9, n=2, seed=4,
                                                          compile=False))
    for blk in net.visual.blocks:
        fully_shard(blk)
    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    calls = [0]
    orig = pg.foreach_all_gather

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    pg.foreach_all_gather = counting
    out = S.generate(net, batch, [40, 41], sc)
    n_groups = sum(1 for m in net.modules() if hasattr(m, "unshard"))
    sharded_after = all(type(p).__name__ == "DTensor" for p in net.parameters())
    pg.foreach_all_gather = orig
    q.put((rank, torch.equal(out["tokens"], ref["tokens"]), float((out["logprobs"] - ref["logprobs"]).abs().max()),
           calls[0], n_groups, sharded_after))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_model_unsharded_once():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_fsdp_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, same, diff, calls, n_groups, sharded_after in results:
        assert same and diff < 1e-5, (rank, diff)
        assert calls == n_groups, f"rank {rank}: {calls} all-gathers for {n_groups} FSDP modules"
        assert sharded_after


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_prints_the_greedy_completion(tmp_path):
    from PIL import Image
    tok = data.train_tokenizer(["a red square and two blue circles", "how many shapes are there?"] * 20,
                               str(tmp_path / "tok"), vocab_size=300)
    torch.manual_seed(0)
    cfg = M.tiny_config(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id,
                        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                        eos_token_id=tok.eos_ids)
    net = M.Qwen2_5_VL(cfg).eval()
    ckpt = str(tmp_path / "ckpt")
    M.save_pretrained(net, ckpt, tokenizer_dir=str(tmp_path / "tok"))
    img = str(tmp_path / "x.png")
    Image.new("RGB", (60, 90), (200, 30, 30)).save(img)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "sampler.py"), "--model", ckpt, "--image", img,
                          "--prompt", "how many shapes?", "--greedy", "--max-new-tokens", "10", "--system", "none"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "how many shapes?"}]}]
    enc = data.encode_messages(messages, tok, image_root="/", add_generation_prompt=True)
    out = S.generate(net, data.collate([enc], tok.pad_id, True), tok.eos_ids,
                     S.SampleConfig(max_new_tokens=10, greedy=True), pad_id=tok.pad_id)
    n = int(out["lengths"][0]) - (out["finish_reasons"][0] == "stop")  # the eos token is not printed
    want = tok.decode(out["tokens"][0, :n].tolist())
    assert res.stdout == want + "\n"
    assert "tok/s" in res.stderr


# ----------------------------------------------------------------------------- the decode step

@pytest.mark.parametrize("fused", [False, True])  # the matmul form (eager) / multiply-and-sum (compiled)
def test_decode_step_equals_full_forward(models, fused):
    """Prefill (model.forward writing the prompt cache once per prompt), then decode_step fed given
    tokens (teacher forcing), n rows per prompt reading their group's one prompt cache: the logits
    of the model's full forward over [prompt | tokens], also after rows and a whole group are dropped."""
    net, _ = models
    cfg = net.config
    batch = make_batch(cfg, prompts=[PROMPTS[0], PROMPTS[2]])
    prompt_ids, pmask = batch["input_ids"], batch["attention_mask"]
    B, T, n, n_new = 2, prompt_ids.shape[1], 2, 5
    gen = torch.Generator().manual_seed(5)
    cont = torch.randint(1, 200, (B * n, n_new + 1), generator=gen)
    full_ids = torch.cat([prompt_ids.repeat_interleave(n, 0), cont], 1)  # (B*n, T + n_new + 1)
    full_mask = torch.cat([pmask.repeat_interleave(n, 0), torch.ones(B * n, n_new + 1, dtype=torch.long)], 1)
    img = [batch["pixel_values"][:16], batch["pixel_values"][16:]]  # prompt 0: 16 patches, prompt 1: 24 + 4
    grid = batch["image_grid_thw"]
    with torch.no_grad():
        ref = net(full_ids, torch.cat([img[0], img[0], img[1], img[1]]),
                  torch.cat([grid[:1], grid[:1], grid[1:], grid[1:]]), attention_mask=full_mask)  # (B*n, T+n_new+1, V)
        pos, _ = net.get_rope_index(prompt_ids, grid, pmask)
        prompt = M.KVCache(cfg, B, T, "cpu", torch.float32)  # ONE cache row per prompt
        last = net(prompt_ids, batch["pixel_values"], grid, attention_mask=pmask, cache=prompt, logits_to_keep=1)
        assert (last[:, 0] - ref[::n, T - 1]).abs().max() < 1e-4
        p_bias = torch.zeros(B, T).masked_fill(pmask == 0, float("-inf"))
        gk = torch.zeros(cfg.text.num_hidden_layers, B * n, cfg.text.num_key_value_heads, n_new + 1, cfg.text.head_dim)
        gv = torch.zeros_like(gk)
        cos, sin = M.mrope_cos_sin((pos[:, :, -1:] + 1).repeat_interleave(n, 1) + torch.arange(n_new + 1), cfg.text,
                                   torch.float32)  # (B*n, n_new + 1, hd)
        rows, slot, pk, pv = torch.arange(B * n), torch.arange(B * n), prompt.k, prompt.v

        def step(i):
            g_bias = torch.tensor([0.0] * i + [float("-inf")] * max(0, 2 - i))  # >= 2 slots read, as decode()
            logits, k, v = S.decode_step(net, cont[rows, i], cos[rows, i], sin[rows, i], pk, pv, p_bias, gk, gv,
                                         g_bias, slot, n, fused=fused)
            gk[:, :, :, i], gv[:, :, :, i] = k, v
            return logits

        for i in range(n_new - 1):
            assert (step(i) - ref[:, T + i]).abs().max() < 1e-4, f"decode step {i}"
        # drop rows (per-row stop): row 1 of prompt 0 and row 0 of prompt 1; both groups live on
        keep = torch.tensor([0, 3])
        rows, slot, gk, gv = rows[keep], torch.tensor([0, 3]), gk[:, keep], gv[:, keep]
        assert (step(n_new - 1) - ref[keep, T + n_new - 1]).abs().max() < 1e-4
        # a whole group finished: prompt 0's cache row goes, the live row is sample 1 of group 0 now
        keep = torch.tensor([1])
        rows, slot, gk, gv = rows[keep], torch.tensor([1]), gk[:, keep], gv[:, keep]
        pk, pv, p_bias = pk[:, 1:], pv[:, 1:], p_bias[1:]
        assert (step(n_new) - ref[3:4, T + n_new]).abs().max() < 1e-4


def test_prompt_cache_stored_once_per_group(models, monkeypatch):
    """generate allocates one prompt cache row per prompt (not per sample) and one generated-token
    row per sample, both in the model's dtype."""
    net, _ = models
    t = net.config.text
    shapes = []

    class Recording(M.KVCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            shapes.append((tuple(self.k.shape), self.k.dtype))

    monkeypatch.setattr(M, "KVCache", Recording)
    batch = make_batch(net.config)
    T = batch["input_ids"].shape[1]
    S.generate(net, batch, [], S.SampleConfig(max_new_tokens=6, n=3, compile=False))
    L, H, hd = t.num_hidden_layers, t.num_key_value_heads, t.head_dim
    assert shapes == [((L, 4, H, T, hd), torch.float32), ((L, 12, H, 6, hd), torch.float32)]
