"""
KV-cached batched sampler for the Qwen2.5-VL of model.py: the rollout engine of GRPO.

The idea (a static KV cache and a compiled one-token step, batched and multimodal):

1. prefill: the left-padded prompts (with their images) go through the model once, a few prompts
   per forward (`prefill_chunk`: bounds activation memory), filling a static (preallocated)
   prompt KV cache, ONE row per prompt, and giving the logits of the last prompt position;
2. the n samples of a prompt (a GRPO group) share that prefill AND that cache row: nothing is
   repeated n times (rows stay prompt-major: prompt 0 sample 0..n-1, prompt 1 sample 0..n-1, ...);
   each sample's generated tokens go to a second cache, one row per sample;
3. decode: one token per row per step (`decode_step`: the decoder layers written out for a single
   token; the loop then stores the new keys/values). Attention is cascade attention (Hydragen):
   the queries of a group's n rows are stacked into one (n*g, hd) @ (hd, T) product against the
   group's one prompt cache, each row attends to its own generated tokens and to itself, and the
   two softmaxes are merged by their log-sum-exp (`attend_two_parts`). The prompt keys are read
   once per group instead of once per sample, and stored once. The new token's M-RoPE position
   is the last prompt position + 1 + step on each of the 3 axes (what transformers does with its
   rope_deltas), so no image bookkeeping is needed after the prefill; the rotary cos/sin of all
   steps and the attention bias (-inf on prompt padding) are computed once before the loop. On
   CPU the decode step is torch.compile'd: the ~40 small ops per layer fuse into
   a few C++ loops, the own-token attention into one pass over each row's cache (the prompt part
   stays two matmuls per group). One graph with dynamic shapes
   serves all batch sizes >= 2, group sizes n >= 2 and key lengths (n = 1 gets its own, and so
   would a batch of 1 row or 1 group, which compaction avoids; each torch thread count too); a
   cold compile takes ~25-90 s here, ~12 s from inductor's cache. SampleConfig(compile=False) or SRPO_COMPILE=0
   decodes eagerly, as does an FSDP-sharded model. A compiled step checks itself (SelfChecked):
   the first call of every new graph is compared with the eager step on the same inputs, and a
   disagreement or a failing compile warns loudly and decodes eagerly for the rest of the run;
   inductor's cache key names the CPU's vector ISA (key_compile_cache);
4. a row stops at its first eos id (its eos token is kept: it is part of the response GRPO
   trains on) or at max_new_tokens. Finished rows are dropped from the batch (their generated
   cache rows are gathered out; a group's prompt cache row when all its rows are done) once they
   are at least `compact_frac` of the rows still decoding, so they stop costing compute; a
   finished row is kept when fewer than 2 rows or 2 groups would remain (no graph of their own).

5. on CUDA the loop is `decode_static` instead (SampleConfig.path; the choice is decode_path):
   the same sampling with every shape fixed, gpt-fast style: one KV cache row per sample of
   capacity prompt + max_new_tokens written in place at a position tensor, attention through
   scaled_dot_product_attention masked by position (finished rows keep decoding, their tokens
   discarded), sampling on the device with a host sync only every `eos_every` steps, and the
   step captured once per call as a CUDA graph and replayed for every token. On CPU it runs too
   (same tokens as the cascade loop and transformers), but the cascade loop is faster there.

Log-probs: for every generated token we return log_softmax(logits / temperature)[token] over
the FULL vocabulary -- the distribution the policy defines at temperature T, which is what the
GRPO loss recomputes (the paper computes log-probabilities on logits divided by the sampling
temperature). top-k / top-p only restrict which tokens can be drawn; they are not
folded into the returned log-prob, so at unchanged weights logp_old == logp_new and the PPO
ratio is exactly 1. Greedy decoding returns the same quantity for the argmax token.

Sampling is reproducible: all randomness comes from one torch.Generator seeded with cfg.seed,
one uniform number per output row and step, turned into a token by inverse CDF. A row's draws
do not depend on the other rows, so dropping finished rows does not change the samples.

FSDP2: a model sharded with fully_shard is all-gathered once for the whole rollout
(`unsharded(model)`), instead of once per layer per decoded token, and resharded at the end.
The price is the whole model in the gathered dtype on every rank while generate runs (2 bytes
per parameter in bf16: 15.5 GB for Qwen2.5-VL-7B; memory.py's `rollout` term).

Command line:  python sampler.py --model PATH --image IMG --prompt "..."   (streams on a tty)
"""
import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

import model as M  # KVCache


@dataclass
class SampleConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0          # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0              # 0 = off
    greedy: bool = False        # argmax; temperature (if > 0) then only scales the returned log-probs
    n: int = 1                  # samples per prompt (GRPO group size), sharing one prefill
    seed: int = 0
    compact_frac: float = 0.25  # drop finished rows when they are >= this fraction of the batch
    prefill_chunk: int = 8      # prompts per prefill forward
    suppress_ids: tuple = None  # never drawn; None = the model's <|image_pad|>, <|video_pad|> (they
                                # cannot be fed back as text: a forward takes them for image slots)
    compile: bool = True        # torch.compile the decode step (plain modules; eager if it fails, if its
                                # first call disagrees with the eager step, or if SRPO_COMPILE=0)
    path: str = "auto"          # decode loop: "cascade" (shared-prompt attention, shrinking batch: the fast
                                # one on CPU), "static" (fixed shapes, CUDA graph on GPU), "auto" = static
                                # on CUDA, cascade elsewhere (see decode_path)
    cuda_graph: bool = True     # static path on CUDA: capture the decode step once, replay it every token
    eos_every: int = 8          # static path: look every this many steps whether all rows stopped (a host sync)


def _check(cfg: SampleConfig):
    if cfg.max_new_tokens < 1:
        raise ValueError(f"sampler.py: SampleConfig.max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if not cfg.greedy and not cfg.temperature > 0:
        raise ValueError(f"sampler.py: SampleConfig.temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"sampler.py: SampleConfig.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.path not in ("auto", "cascade", "static") or cfg.eos_every < 1:
        raise ValueError(f"sampler.py: SampleConfig.path must be auto, cascade or static and eos_every >= 1, "
                         f"got {cfg.path!r}, {cfg.eos_every}")
    if cfg.top_k < 0 or cfg.n < 1 or cfg.prefill_chunk < 1:
        raise ValueError(f"sampler.py: SampleConfig.top_k must be >= 0, n and prefill_chunk >= 1, "
                         f"got {cfg.top_k}, {cfg.n}, {cfg.prefill_chunk}")


# ----------------------------------------------------------------------------- FSDP2

def fsdp_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model):
    return len(fsdp_modules(model)) > 0


@contextlib.contextmanager
def unsharded(model):
    """All-gather the parameters of an FSDP2-sharded model once, keep them gathered through every
    forward of the block (no reshard after each layer's forward), reshard at the end. No-op for
    a plain model. Public FSDP2 API only (FSDPModule.unshard / set_reshard_after_forward / reshard).
    On exit the modules get fully_shard's defaults back (dist.shard_model shards with them):
    every module reshards after forward except the root, whose parameters backward needs first."""
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


# ----------------------------------------------------------------------------- sampling

def sample_next(logits, cfg: SampleConfig, uniform, suppress=None):
    """logits (B, V) float32, uniform (B,) in [0, 1), suppress (S,) long token ids never drawn ->
    tokens (B,) long, logprobs (B,) float32 = log_softmax(logits / T)[token] over the full vocabulary."""
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy at temperature 0: logp at 1
    logprobs = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # (B, V)
    masked = logprobs if suppress is None else logprobs.index_fill(-1, suppress, float("-inf"))
    if cfg.greedy:
        tokens = masked.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(masked, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if cfg.top_p < 1.0:  # as transformers: after top-k, on the renormalized distribution
        sorted_lp, order = torch.sort(masked, dim=-1, descending=True)  # (B, V)
        probs = sorted_lp.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p  # the better tokens already hold top_p
        masked = masked.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    # inverse CDF with one uniform per row: a row's draw does not depend on the other rows
    cdf = masked.exp().cumsum(dim=-1)  # (B, V) unnormalized (masked tokens removed): scaled by its total below
    tokens = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)[:, 0]
    tokens = tokens.clamp_(max=logits.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------- prefill

class CacheRows:
    """Rows [a, b) of a KVCache, as a cache the model can write through (views of k, v)."""

    def __init__(self, cache, a, b):
        self.k, self.v = cache.k[:, a:b], cache.v[:, a:b]


def image_spans(config, input_ids, grid):
    """Row r's images are grid[img[r]:img[r+1]] and its patches pixel_values[patch[r]:patch[r+1]]
    (images are listed in the order of the rows). Returns two lists of B + 1 ints."""
    B = input_ids.shape[0]
    if grid is None:
        return [0] * (B + 1), [0] * (B + 1)
    patches = grid.prod(-1)  # (N_img,)
    tok_end = (patches // config.vision.spatial_merge_size ** 2).cumsum(0)  # image tokens up to image i
    row_end = (input_ids == config.image_token_id).sum(1).cumsum(0).to(tok_end.device)  # (B,)
    if int(row_end[-1]) != int(tok_end[-1]):
        raise ValueError(f"sampler.py: batch['input_ids'] holds {int(row_end[-1])} image tokens, "
                         f"batch['image_grid_thw'] gives {int(tok_end[-1])}")
    img = [0] + torch.searchsorted(tok_end, row_end, right=True).tolist()
    patch_end = [0] + patches.cumsum(0).tolist()
    return img, [patch_end[i] for i in img]


def prefill(model, input_ids, attn, pos_ids, pixel_values, grid, cache, chunk):
    """Run the prompts through the model `chunk` rows at a time (bounds the activation memory),
    writing their keys/values into the cache rows.
    Returns the logits of the last prompt position (B, V) float32."""
    B = input_ids.shape[0]
    img, patch = image_spans(model.config, input_ids, grid)
    logits = []
    for a in range(0, B, chunk):
        b = min(a + chunk, B)
        pv, g = None, None
        if img[b] > img[a]:
            pv, g = pixel_values[patch[a]:patch[b]], grid[img[a]:img[b]]
        out = model(input_ids[a:b], pixel_values=pv, image_grid_thw=g, attention_mask=attn[a:b],
                    position_ids=pos_ids[:, a:b], cache=CacheRows(cache, a, b), logits_to_keep=1)
        logits.append(out[:, -1].float())
    return torch.cat(logits)  # (B, V)


# ----------------------------------------------------------------------------- decode step

def grouped(x, slot, P, n):
    """Rows -> groups: x (K, Hkv, g, d) of the K live rows, slot (K,) each row's place p*n + j among
    the P live groups of n -> (P, Hkv, n*g, d), the queries of a group stacked (zeros for rows
    already finished) so that one matmul per group and kv head reads the group's prompt once."""
    K, H, g, d = x.shape
    x = x.new_zeros(P * n, H, g, d).index_copy(0, slot, x)
    return x.view(P, n, H, g, d).transpose(1, 2).reshape(P, H, n * g, d)


def ungrouped(x, slot, n):
    """The inverse of grouped: (P, Hkv, n*g, d) -> (K, Hkv, g, d) of the live rows."""
    P, H, ng, d = x.shape
    return x.view(P, H, n, ng // n, d).transpose(1, 2).reshape(P * n, H, ng // n, d).index_select(0, slot)


def attend_two_parts(q, k, v, pk, pv, p_bias, gk, gv, g_bias, slot, n, scale, fused):
    """Cascade (Hydragen) attention of one new token per row: to its group's prompt and to the
    row's own generated tokens, the two softmaxes merged by their log-sum-exp.
    q (K, Hkv, g, hd); k, v (K, Hkv, 1, hd) of the new token; pk, pv (P, Hkv, T, hd) the prompt cache,
    ONE copy per group; p_bias (P, 1, 1, T) 0 / -inf (prompt padding); gk, gv (K, Hkv, S, hd) the
    generated tokens; g_bias (S,) 0 / -inf (slots not written yet) -> (K, Hkv, g, hd).
    With n samples per prompt the prompt keys are read once per group instead of once per row
    (the rows of a group stacked: (n*g, hd) @ (hd, T)), and stored once.
    fused: the own-token products as multiply-and-sum instead of matmuls (compiled on CPU: one
    pass over each row's cache instead of K*Hkv tiny matmuls: half the time of bmm at batch 64)."""
    # scores and products in the cache's dtype (bf16 on GPU), softmax sums in fp32
    dt = pk.dtype
    # prompt: softmax numerator and denominator per group, then back to rows
    qg = grouped(q, slot, pk.shape[0], n)  # (P, Hkv, n*g, hd)
    # matmuls on every path: as a multiply-and-sum, inductor recomputes the roped query for every
    # prompt key (the matmuls add ~0.3 to the GRPO-shaped ratio in bench/sampler.py)
    sp = qg @ pk.transpose(-1, -2)  # (P, Hkv, n*g, T)
    sp = sp.float() * scale + p_bias
    mp = sp.amax(-1, keepdim=True)  # (P, Hkv, n*g, 1)
    ep = (sp - mp).exp()
    op = ep.to(dt) @ pv  # (P, Hkv, n*g, hd)
    op, mp, lp = (ungrouped(t, slot, n) for t in (op.float(), mp, ep.sum(-1, keepdim=True)))  # (K, Hkv, g, .)
    # own tokens: the S generated ones and the new one
    S = gk.shape[2]
    sg = (q[:, :, :, None] * gk[:, :, None]).sum(-1) if fused else q @ gk.transpose(-1, -2)  # (K, Hkv, g, S)
    sg = torch.cat([sg.float() * scale + g_bias, (q * k).sum(-1, keepdim=True).float() * scale], dim=-1)
    mg = sg.amax(-1, keepdim=True)  # (K, Hkv, g, 1)
    eg = (sg - mg).exp()  # (K, Hkv, g, S + 1)
    og = (eg[..., :S, None].to(dt) * gv[:, :, None]).sum(-2) if fused else eg[..., :S].to(dt) @ gv
    og = og.float() + eg[..., S:] * v.float()  # (K, Hkv, g, hd)
    # merge: the softmax over [prompt | own] = the two partial sums rescaled to a common maximum
    m = torch.maximum(mp, mg)
    wp, wg = (mp - m).exp(), (mg - m).exp()
    return ((op * wp + og * wg) / (lp * wp + eg.sum(-1, keepdim=True) * wg)).to(dt)


def decode_step(model, tok, cos, sin, pk, pv, p_bias, gk, gv, g_bias, slot, n, fused=False):
    """One new token per live row through the decoder, reading the caches and writing nothing (the
    caller stores the returned k, v: a compiled graph then never copies a cache).
    tok (K,) long; cos, sin (K, hd) rotary of this step's position; pk, pv (L, P, Hkv, T, hd) the
    prompt cache of the P live groups; p_bias (P, T); gk, gv (L, K, Hkv, S_max, hd) the generated
    tokens' cache; g_bias (S,) 0 for the S slots to read, -inf for those not written yet;
    slot (K,) row -> place in its group (see grouped); n samples per prompt
    -> logits (K, V) float32, k, v (L, K, Hkv, hd) of the new token."""
    K = tok.shape[0]
    x = model.embed_tokens(tok)  # (K, C)
    cos, sin = cos[:, None, None], sin[:, None, None]  # (K, 1, 1, hd)
    p_bias = p_bias[:, None, None, :].float()  # (P, 1, 1, T)
    S = g_bias.shape[0]
    new_k, new_v = [], []
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(K, a.n_kv, -1, a.hd)  # (K, Hkv, g, hd): the g query heads of each kv head
        k = a.k_proj(h).view(K, a.n_kv, 1, a.hd)   # (K, Hkv, 1, hd)
        v = a.v_proj(h).view(K, a.n_kv, 1, a.hd)
        q, k = M.apply_rotary(q, cos, sin), M.apply_rotary(k, cos, sin)
        y = attend_two_parts(q, k, v, pk[i], pv[i], p_bias, gk[i, :, :, :S], gv[i, :, :, :S], g_bias,
                             slot, n, a.hd ** -0.5, fused)  # (K, Hkv, g, hd)
        x = x + a.o_proj(y.reshape(K, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_k.append(k[:, :, 0])
        new_v.append(v[:, :, 0])
    logits = model.lm_head(model.norm(x)).float()
    return logits, torch.stack(new_k), torch.stack(new_v)


# ----------------------------------------------------------------------------- compiled steps check themselves

def key_compile_cache():
    """Make inductor's cache key name the CPU vector ISA and the MKL instruction set. Its FX graph
    key does not include them: C++ written for AVX-512 (loops of 16 floats) and loaded from the
    cache in a process whose vector ISA is AVX2 (ATEN_CPU_CAPABILITY=avx2) is compiled with AVX2's
    8-float Vectorized and reads and writes the wrong elements (NaN or garbage, no error).
    bench/inductor_isa_cache.py shows it. Appends to torch.compiler.config.cache_key_tag (part of
    the key) once per process; a tag the user set is kept in front."""
    import torch.compiler.config as cc
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    tag = (f"srpo:torch={torch.__version__},isa={pick_vec_isa()},"
           f"mkl={os.environ.get('MKL_ENABLE_INSTRUCTIONS', '')}")
    if tag not in cc.cache_key_tag:
        cc.cache_key_tag = f"{cc.cache_key_tag}|{tag}" if cc.cache_key_tag else tag


def graphs_compiled():
    """Graphs dynamo has compiled (or loaded from the cache) in this process: when it grows, a call
    ran code that has not been checked yet."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def disagreement(fast, slow, dtype):
    """None if every tensor of `fast` is within tolerance of `slow`, else a description.
    Tolerance: max |fast - slow| <= tol * max |slow| per tensor, tol 1e-3 in fp32 (compiled and
    eager differ by ~1e-6 there: summation order) and 5e-2 in bf16 / fp16 (one rounding ~4e-3)."""
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for i, (f, e) in enumerate(zip(fast, slow)):
        f, e = f.float(), e.float()
        err = float((f - e).abs().max()) if f.numel() else 0.0
        scale = float(e.abs().max()) if e.numel() else 0.0
        if not err <= tol * max(scale, 1e-6):  # also catches NaN
            return f"output {i}: max |compiled - eager| = {err:.3g} > {tol:g} x max |eager| ({scale:.3g})"
    return None


class SelfChecked:
    """A compiled step that checks itself against the eager step. The first call, and every call
    that compiles a new graph (or loads one from inductor's cache), also runs the eager step on
    the same inputs and compares the outputs (and what `written()` reads of the state the step
    writes); on a disagreement or a failing compile it warns once, loudly, and runs the eager
    step for the rest of the process. Checked calls return the eager result. A check costs one
    eager step per graph. written(args) -> tensors the step wrote, compared after each run."""

    def __init__(self, compiled, eager, what, dtype, written=lambda args: ()):
        self.compiled, self.eager, self.what, self.dtype, self.written = compiled, eager, what, dtype, written
        self.failed, self.seen = False, -1  # graphs_compiled() at the last check (-1: none yet)
        self.check_s = 0.0  # seconds spent in the eager reruns of checked calls

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        before = graphs_compiled()
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 -- any compile failure (e.g. no C++ compiler): eager from now on
            return self.fall_back(f"torch.compile failed: {e!r:.300}", args)
        if self.seen == graphs_compiled() and before == self.seen:
            return out
        t0 = time.perf_counter()
        fast = [t.clone() for t in (out if isinstance(out, tuple) else (out,)) + tuple(self.written(args))]
        ref = self.eager(*args)
        slow = list((ref if isinstance(ref, tuple) else (ref,)) + tuple(self.written(args)))
        bad = disagreement(fast, slow, self.dtype)
        self.check_s += time.perf_counter() - t0
        if bad:
            return self.fall_back(f"its first call disagrees with the eager step on the same inputs, {bad}. "
                                  f"Likely a stale or foreign inductor cache (TORCHINDUCTOR_CACHE_DIR="
                                  f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}) or a compiler bug", args)
        self.seen = graphs_compiled()
        return ref

    def fall_back(self, cause, args):
        self.failed = True
        msg = f"sampler.py: WARNING: the compiled {self.what} is not used: {cause}. Decoding eagerly for the rest of this run."
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        print(msg, file=sys.stderr, flush=True)
        return self.eager(*args)


def compile_step(fn, **kw):
    """torch.compile with inductor's cache keyed by the vector ISA (key_compile_cache); one place
    that a test can replace."""
    key_compile_cache()
    return torch.compile(fn, **kw)


_cascade_step = None  # SelfChecked(compiled decode_step), built once per process


def decode_fn(model, cfg: SampleConfig):
    """The cascade decode step to run: compiled (shapes dynamic: one graph while the batch shrinks
    and the key length grows) for a plain module on CPU when cfg.compile, eager otherwise.
    FSDP-sharded models stay eager (hooks in a compiled graph: not tried), and so does CUDA (the
    static path is the CUDA one). The compiled step checks itself (SelfChecked)."""
    if (not cfg.compile or os.environ.get("SRPO_COMPILE") == "0" or is_fsdp(model)
            or next(model.parameters()).device.type != "cpu"):
        return decode_step
    global _cascade_step
    if _cascade_step is None:
        compiled = compile_step(functools.partial(decode_step, fused=True), dynamic=True)

        def traced(*args):
            # no duck shaping while tracing: sizes that happen to be equal on the first call (a batch
            # of 2 rows and 2 kv heads) stay separate symbols, so one graph serves every batch >= 2.
            # Floats specialized: with dynamic shapes dynamo first traces module float attributes
            # (the embedding's norm_type) as symbols, then restarts the whole trace to specialize
            # them: a warm-cache compile took ~30 s with the restart, ~10 s without
            duck, fx_config.use_duck_shape = fx_config.use_duck_shape, False
            try:
                with torch._dynamo.config.patch(specialize_float=True):
                    return compiled(*args)
            finally:
                fx_config.use_duck_shape = duck
        _cascade_step = SelfChecked(traced, decode_step, "decode step", next(model.parameters()).dtype)
    return _cascade_step


# ----------------------------------------------------------------------------- generate

@torch.no_grad()
def generate(model, batch, eos_ids, cfg: SampleConfig, pad_id=0, stream=None):
    """Sample cfg.n completions for each left-padded prompt of `batch` (from data.collate).

    batch: input_ids (B, T) long, attention_mask (B, T) 1 = real token (left padding),
           pixel_values (N_patches, 1176) or None, image_grid_thw (N_images, 3) or None
    eos_ids: token ids that end a completion (kept as its last token); [] = never stop early
    stream: optional callable(step, rows (K,) long, tokens (K,) long) called after each step
    returns dict(tokens (B*n, max_new) long, padded with pad_id after the end,
                 logprobs (B*n, max_new) float32, 0 after the end,
                 lengths (B*n,) long incl. the eos token, finish_reasons list "stop" | "length")
    Rows are prompt-major: row b*n + j is sample j of prompt b.
    """
    _check(cfg)
    input_ids, attn = batch["input_ids"], batch.get("attention_mask")
    if input_ids.ndim != 2:
        raise ValueError(f"sampler.py: batch['input_ids'] must be (B, T), got {tuple(input_ids.shape)}")
    if attn is None:
        attn = torch.ones_like(input_ids)
    if not bool(attn[:, -1].all()):
        raise ValueError("sampler.py: batch['attention_mask'] has padding at the last position: "
                         "prompts must be LEFT-padded (data.collate(..., left_pad=True))")
    params = next(model.parameters())
    device, dtype = params.device, params.dtype  # the caches and the decode step: the model's dtype
    input_ids, attn = input_ids.to(device), attn.to(device).long()
    pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pixel_values is not None:
        pixel_values, grid = pixel_values.to(device, dtype), grid.to(device)
    B, T = input_ids.shape
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    suppress = cfg.suppress_ids
    if suppress is None:
        suppress = [i for i in (model.config.image_token_id, getattr(model.config, "video_token_id", None))
                    if i is not None and i < model.config.text.vocab_size]
    suppress = torch.tensor(list(suppress), dtype=torch.long, device=device) if len(suppress) else None

    with unsharded(model):
        dtype = next(model.parameters()).dtype  # FSDP2 mixed precision: the gathered copy's (bf16), not the fp32 shards'
        # prefill: each prompt once (cfg.prefill_chunk per forward); its cache serves its n samples
        pos_ids, _ = model.get_rope_index(input_ids, grid, attn)  # (3, B, T)
        prompt = M.KVCache(model.config, B, T, device, dtype)  # (L, B, Hkv, T, hd)
        logits = prefill(model, input_ids, attn, pos_ids.to(device), pixel_values, grid, prompt, cfg.prefill_chunk)
        next_pos = pos_ids[:, :, -1].to(device) + 1  # (3, B) M-RoPE position of the first new token
        loop = decode_static if decode_path(cfg, device) == "static" else decode
        return loop(model, prompt, attn, logits, next_pos, cfg, eos, suppress, pad_id, stream)


def decode_path(cfg: SampleConfig, device) -> str:
    """THE choice of decode loop. On CPU the cascade loop is faster (shared prompt read once per
    group, finished rows dropped, one compiled graph for all shapes: on bench/sampler.py's 8 x 8
    row the compiled static loop made 341 tokens/s, the cascade loop 1007); on CUDA a fixed-shape
    step replayed as one CUDA graph removes the ~2700 kernel launches per token that made the
    cascade loop launch-bound there (bench/gpu_sampler.py compares them)."""
    if cfg.path != "auto":
        return cfg.path
    return "static" if torch.device(device).type == "cuda" else "cascade"


def decode(model, prompt, attn, logits, next_pos, cfg, eos, suppress, pad_id, stream):
    """The sampling loop after the prefill: prompt cache (L, B, Hkv, T, hd) and attn (B, T) of the B
    prompts, logits (B, V) of their last position, next_pos (3, B). Returns generate's dict."""
    n, max_new = cfg.n, cfg.max_new_tokens
    B, T = attn.shape
    R, device, dtype = B * n, attn.device, prompt.k.dtype  # output rows, prompt-major
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    p_bias = torch.zeros(B, T, dtype=dtype, device=device).masked_fill_(attn == 0, float("-inf"))  # (B, T)
    gen = M.KVCache(model.config, R, max_new, device, dtype)  # (L, R, Hkv, max_new, hd): generated tokens
    g_bias = torch.full((max(max_new, 2),), float("-inf"), device=device)  # 0 on the slots written so far
    steps = torch.arange(max_new, device=device)
    cos, sin = M.mrope_cos_sin(next_pos.repeat_interleave(n, 1)[:, :, None] + steps, model.config.text,
                               dtype)  # (R, max_new, hd) rotary of every step
    logits = logits.repeat_interleave(n, dim=0)  # (R, V): the n samples of a prompt draw from its logits
    step_fn = decode_fn(model, cfg)

    tokens_out = torch.full((R, max_new), pad_id, dtype=torch.long, device=device)
    logp_out = torch.zeros(R, max_new, dtype=torch.float32, device=device)
    lengths = torch.full((R,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(R, dtype=torch.bool, device=device)  # stopped on eos, per output row
    rows = torch.arange(R, device=device)  # output row of each live row
    slot = rows.clone()  # its place (group g, sample j) -> g*n + j among the live groups
    groups = torch.arange(B, device=device)  # the prompts in the prompt cache
    done = torch.zeros(R, dtype=torch.bool, device=device)  # per live row
    for step in range(max_new):
        uniform = torch.rand(R, generator=generator, device=device)[rows]  # (K,) one draw per output row
        tok, lp = sample_next(logits, cfg, uniform, suppress)  # (K,), (K,)
        tok = tok.masked_fill(done, pad_id)
        tokens_out[rows, step] = tok
        logp_out[rows, step] = lp.masked_fill(done, 0.0)
        if stream is not None:
            stream(step, rows[~done], tok[~done])
        hit = ~done & torch.isin(tok, eos)
        lengths[rows[hit]] = step + 1
        stopped[rows[hit]] = True
        done = done | hit
        n_done = int(done.sum())
        if n_done == len(rows) or step == max_new - 1:
            break
        if n_done > 0 and n_done >= cfg.compact_frac * len(rows):  # drop finished rows (and groups)
            keep = (~done).nonzero()[:, 0]
            live_groups = rows[keep] // n
            if len(keep) < 2 or bool((live_groups == live_groups[0]).all()):
                # keep a finished row (of another group if there is one) beside the live ones: a
                # batch of 1 row or 1 group compiles a graph of its own (sizes 1 are specialized;
                # 40-60 s in a pipeline stage); a kept finished row stays finished
                other = (done & (rows // n != live_groups[0])).nonzero()[:1, 0]
                keep = torch.cat([keep, other if len(other) or len(keep) >= 2 else done.nonzero()[:1, 0]])
            rows, done, tok, cos, sin = rows[keep], done[keep], tok[keep], cos[keep], sin[keep]
            gen.k, gen.v = gen.k.index_select(1, keep), gen.v.index_select(1, keep)
            live, place = torch.unique(rows // n, return_inverse=True)  # prompts still sampling, sorted
            if len(live) < len(groups):  # a whole group finished: drop its prompt cache too
                idx = torch.searchsorted(groups, live)
                prompt.k, prompt.v, p_bias = prompt.k[:, idx], prompt.v[:, idx], p_bias[idx]
                groups = live
            slot = place * n + rows % n
        if step > 0:
            g_bias[step - 1] = 0.0  # the previous step's token is in the cache now
        S = max(step, 2)  # slots to read; >= 2 so that one compiled graph serves all steps (no 0/1 specialization)
        logits, k, v = step_fn(model, tok, cos[:, step], sin[:, step], prompt.k, prompt.v, p_bias,
                               gen.k, gen.v, g_bias[:S], slot, n)
        gen.k[:, :, :, step], gen.v[:, :, :, step] = k, v  # (L, K, Hkv, hd)
    reasons = ["stop" if s else "length" for s in stopped.tolist()]
    return dict(tokens=tokens_out, logprobs=logp_out, lengths=lengths, finish_reasons=reasons)


# ----------------------------------------------------------------------------- decode, static shapes (CUDA)
# The same sampling as decode() with every shape fixed for the whole call (gpt-fast's decode on a
# CUDA graph): one KV cache row per sample of capacity C >= T + max_new, written in place at a
# position tensor; attention over all C slots by scaled_dot_product_attention, masked by position
# (finished rows keep decoding, their tokens discarded, instead of shrinking the batch); sampling
# on the device, the host looking at the eos flags only every cfg.eos_every steps. The step is
# then one graph: captured once per call as a CUDA graph and replayed for every token.

CAPACITY_MULTIPLE = 64  # C rounded up: calls whose prompts differ by a few tokens reuse the compiled graph


def static_step(model, tok, pos, cos_all, sin_all, ck, cv, prompt_mask, T):
    """One new token per row, written into the cache in place.
    tok (R,) long; pos (1,) long this step's index (its keys go to slot T + pos); cos_all, sin_all
    (R, max_new, hd) rotary of every step; ck, cv (L, R, Hkv, C, hd) the cache, the prompt at
    [0, T) and the generated tokens after it; prompt_mask (R, C) bool, True on real prompt tokens
    -> logits (R, V) float32."""
    R, C = prompt_mask.shape
    x = model.embed_tokens(tok)  # (R, C_model)
    cos = cos_all.index_select(1, pos)[:, None]  # (R, 1, 1, hd): index_select, not [pos]: no host sync
    sin = sin_all.index_select(1, pos)[:, None]
    slot = T + pos  # (1,)
    cols = torch.arange(C, device=tok.device)
    mask = (prompt_mask | ((cols >= T) & (cols <= slot)))[:, None, None]  # (R, 1, 1, C): the prompt + tokens so far
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        # the g query heads of a kv head as g query positions of one head: grouped-query attention
        # as plain attention, K/V read once per kv head, no repeat_interleave and no enable_gqa
        # (which not every fused SDPA kernel takes together with a mask)
        q = a.q_proj(h).view(R, a.n_kv, -1, a.hd)  # (R, Hkv, g, hd)
        k = a.k_proj(h).view(R, a.n_kv, 1, a.hd)  # (R, Hkv, 1, hd)
        v = a.v_proj(h).view(R, a.n_kv, 1, a.hd)
        q, k = M.apply_rotary(q, cos, sin), M.apply_rotary(k, cos, sin)
        ck[i].index_copy_(2, slot, k)  # in place at a device position: the same graph for every step
        cv[i].index_copy_(2, slot, v)
        y = F.scaled_dot_product_attention(q, ck[i], cv[i], attn_mask=mask)  # (R, Hkv, g, hd)
        x = x + a.o_proj(y.reshape(R, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x)).float()


def static_runner(model, cfg, args, dtype):
    """step(tok, pos) -> logits over the fixed tensors `args` (cos, sin, ck, cv, prompt_mask, T):
    compiled when cfg.compile (checked against eager, SelfChecked), and on CUDA captured as a
    CUDA graph that every call replays (inputs copied into the graph's own tok/pos tensors)."""
    cos, sin, ck, cv, pmask, T = args
    fn = static_step
    if cfg.compile and os.environ.get("SRPO_COMPILE") != "0" and not is_fsdp(model):
        global _static_step
        if _static_step is None:  # one per process: graphs are reused by shape, each checked once
            written = lambda a: (a[5][:, :, :, a[8]], a[6][:, :, :, a[8]])  # noqa: E731  the slot step 0 writes
            _static_step = SelfChecked(compile_step(static_step, fullgraph=True), static_step,
                                       "static decode step", dtype, written)
        fn = _static_step
    step = lambda tok, pos: fn(model, tok, pos, cos, sin, ck, cv, pmask, T)  # noqa: E731
    if not (cfg.cuda_graph and ck.is_cuda):
        return step
    tok_in = torch.zeros(pmask.shape[0], dtype=torch.long, device=ck.device)
    pos_in = torch.zeros(1, dtype=torch.long, device=ck.device)
    try:
        side = torch.cuda.Stream()  # warm-up on a side stream before capture (lazy inits, compile, the check)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(tok_in, pos_in)  # writes slot T, which step 0 overwrites
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(tok_in, pos_in)
    except Exception as e:  # noqa: BLE001 -- e.g. an op that cannot be captured: run the step as is
        warnings.warn(f"sampler.py: WARNING: CUDA graph capture of the decode step failed, running it uncaptured: {e!r:.300}")
        return step

    def replay(tok, pos):
        tok_in.copy_(tok)
        pos_in.copy_(pos)
        graph.replay()
        return logits  # the graph's output tensor, overwritten by the next replay
    return replay


_static_step = None  # SelfChecked(compiled static_step), built once per process


def decode_static(model, prompt, attn, logits, next_pos, cfg, eos, suppress, pad_id, stream):
    """decode() with fixed shapes (see above): same arguments, same returned dict, the same
    randomness (one uniform per output row and step from cfg.seed)."""
    n, max_new = cfg.n, cfg.max_new_tokens
    B, T = attn.shape
    R, device, dtype = B * n, attn.device, prompt.k.dtype
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # 1. the cache: the prompt's keys/values copied to each of its n rows, capacity rounded up
    C = -(-(T + max_new) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    cache = M.KVCache(model.config, R, C, device, dtype)  # (L, R, Hkv, C, hd)
    cache.k[:, :, :, :T] = prompt.k.repeat_interleave(n, dim=1)
    cache.v[:, :, :, :T] = prompt.v.repeat_interleave(n, dim=1)
    prompt.k = prompt.v = None  # the prompt-only cache is not read again: free it now
    pmask = torch.zeros(R, C, dtype=torch.bool, device=device)
    pmask[:, :T] = attn.repeat_interleave(n, dim=0).bool()
    steps = torch.arange(max_new, device=device)
    cos, sin = M.mrope_cos_sin(next_pos.repeat_interleave(n, 1)[:, :, None] + steps, model.config.text,
                               dtype)  # (R, max_new, hd)
    step_fn = static_runner(model, cfg, (cos, sin, cache.k, cache.v, pmask, T), dtype)
    # 2. the loop: everything stays on the device; the host syncs every eos_every steps
    logits = logits.repeat_interleave(n, dim=0)  # (R, V)
    tokens_out = torch.full((R, max_new), pad_id, dtype=torch.long, device=device)
    logp_out = torch.zeros(R, max_new, dtype=torch.float32, device=device)
    lengths = torch.full((R,), max_new, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)  # stopped on eos
    rows = torch.arange(R, device=device)
    for step in range(max_new):
        uniform = torch.rand(R, generator=generator, device=device)
        tok, lp = sample_next(logits, cfg, uniform, suppress)
        tokens_out[:, step] = tok.masked_fill(done, pad_id)
        logp_out[:, step] = lp.masked_fill(done, 0.0)
        if stream is not None:
            stream(step, rows[~done], tok[~done])
        hit = ~done & torch.isin(tok, eos)
        lengths.masked_fill_(hit, step + 1)
        done |= hit
        if step == max_new - 1 or ((step + 1) % cfg.eos_every == 0 and bool(done.all())):
            break
        logits = step_fn(tok.masked_fill(done, pad_id), steps[step:step + 1])
    reasons = ["stop" if s else "length" for s in done.tolist()]
    return dict(tokens=tokens_out, logprobs=logp_out, lengths=lengths, finish_reasons=reasons)


@dataclass
class Generation:
    """What generate_texts returns; rows are prompt-major (row i*n + j = sample j of prompt i)."""
    tokens: torch.Tensor          # (N, R) long, pad_id after each row's length
    logprobs: torch.Tensor        # (N, R) float32 log-softmax(logits / temperature) of the drawn tokens, 0 after
    lengths: torch.Tensor         # (N,) long, response tokens including the final eos when one was drawn
    texts: list                   # N decoded responses, without their final eos token
    finish_reasons: list          # N of "stop" (drew an eos) | "length" (hit max_new_tokens)


def generate_texts(model, tok, prompts, cfg: SampleConfig, batch_size=8, progress=False) -> Generation:
    """The one text-generation API: encoded prompts (data.encode_messages(..., add_generation_prompt=True))
    in, cfg.n responses per prompt out, batch_size prompts per sampler call. A response ends at its
    first eos token, which counts in `lengths` (the model learns to stop) and is dropped from `texts`.
    cfg.seed seeds the first call; call k uses cfg.seed + k."""
    from support import data
    from tqdm import tqdm
    parts = []
    for k, c in enumerate(tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=not progress)):
        batch = data.collate(prompts[c:c + batch_size], tok.pad_id, left_pad=True)
        call_cfg = dataclasses.replace(cfg, seed=cfg.seed + k)
        parts.append(generate(model, batch, tok.eos_ids, call_cfg, pad_id=tok.pad_id))
    R = max((p["tokens"].shape[1] for p in parts), default=0)
    pad = lambda t, v: torch.nn.functional.pad(t.cpu(), (0, R - t.shape[1]), value=v)
    tokens = torch.cat([pad(p["tokens"], tok.pad_id) for p in parts]) if parts else torch.zeros(0, 0, dtype=torch.long)
    logprobs = torch.cat([pad(p["logprobs"].float(), 0.0) for p in parts]) if parts else torch.zeros(0, 0)
    lengths = torch.cat([p["lengths"].cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    reasons = [r for p in parts for r in p["finish_reasons"]]
    eos = set(tok.eos_ids)
    texts = []
    for row, n in enumerate(lengths.tolist()):
        ids = tokens[row, :n].tolist()
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    return Generation(tokens=tokens, logprobs=logprobs, lengths=lengths, texts=texts, finish_reasons=reasons)


# ----------------------------------------------------------------------------- CLI

def main():
    from support import data
    ap = argparse.ArgumentParser(description="sample a completion from a Qwen2.5-VL checkpoint")
    ap.add_argument("--model", required=True, help="checkpoint dir (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system", default="reflect", choices=["reflect", "single", "none"])
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", type=int, default=0, help="1: torch.compile the decode step. Off by default: "
                    "for one prompt the compile (8-75 s here, cold or warm cache, loaded machine) costs more than "
                    "it saves (eager: ~1.5 ms per token on the tiny model)")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    net = M.from_pretrained(args.model, device=args.device, dtype=dtype).eval()
    tok = data.Tokenizer.from_dir(args.model)
    content = [{"type": "image", "image": os.path.abspath(p)} for p in args.image]
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    if args.system != "none":
        system = data.SYSTEM_PROMPT_REFLECT if args.system == "reflect" else data.SYSTEM_PROMPT_SINGLE
        messages.insert(0, {"role": "system", "content": system})
    enc = data.encode_messages(messages, tok, image_root="/", add_generation_prompt=True, where="--prompt")
    batch = data.collate([enc], tok.pad_id, left_pad=True)
    cfg = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, greedy=args.greedy, seed=args.seed, compile=args.compile == 1)

    tty = sys.stdout.isatty()
    ids, shown = [], ""

    def on_token(step, rows, toks):  # print the new text on a terminal as it comes (eos not shown)
        nonlocal shown
        if len(toks) and int(toks[0]) not in tok.eos_ids:
            ids.append(int(toks[0]))
            text = tok.decode(ids)
            if tty and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte char
                print(text[len(shown):], end="", flush=True)
                shown = text

    t0 = time.time()
    out = generate(net, batch, tok.eos_ids, cfg, pad_id=tok.pad_id, stream=on_token)
    n = int(out["lengths"][0])
    text = tok.decode(out["tokens"][0, :n - (out["finish_reasons"][0] == "stop")].tolist())
    print(text[len(shown):] if tty else text, flush=True)
    print(f"[{n} tokens, {out['finish_reasons'][0]}, {n / (time.time() - t0):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
