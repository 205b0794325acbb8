"""
Benchmark: sampler.generate vs transformers `generate` on the same model, fp32 CPU.

The default tiny model (model.tiny_config, random weights) is saved with model.save_pretrained
and loaded into transformers' Qwen2_5_VLForConditionalGeneration, so both run the same weights
on the same left-padded prompts (mixed lengths, one image of one of three sizes per prompt).
Both sample at temperature 1 (no top-k / top-p) and are forced to exactly --new tokens per row
(no eos stop: eos_ids=[] here, an eos id no token matches there). Tokens/s = batch * new / wall
time of the whole call (prefill included).

Also: the fp32 matmul peak of this machine (a big torch.mm in the same run) and the fraction of
it the decode steps reach (decode FLOPs = 2 * matmul params * tokens + attention 4*d*S per token
and layer), and the effect of dropping finished rows (eos on, rows of very different lengths).

Reproduce (1 torch thread by default; the machine is shared, so run it when it is quiet and read
the ratios, which come from interleaved best-of-3 runs):

    python bench/sampler.py                        # batch 1, 64, 256; 128 new tokens; ratio printed last
    python bench/sampler.py --threads 2 --batch 64
    python bench/sampler.py --batch 64 --new 32    # a quick look

Run of 09:05 UTC, 25 Nov (AMD EPYC, 2 cores shared with the team's jobs, torch 2.13, transformers
5.24, fp32, 1 thread, 128 new tokens, sampling at temperature 1, best of 3 alternating runs):

    model: tiny_config(), 1.18M params, vocab 1024, torch threads 1
    fp32 matmul peak (2048^3 torch.mm): 90.7 GFLOP/s
    batch    1 prompt  56: ours   616 tok/s (prefill+1 0.01s, decode 0.20s =  1.4% of matmul peak) | transformers  453 tok/s
    batch   64 prompt  74: ours  8030 tok/s (prefill+1 0.18s, decode 0.84s = 22.7% of matmul peak) | transformers 5548 tok/s
    batch  256 prompt  74: ours  9756 tok/s (prefill+1 0.70s, decode 2.66s = 28.6% of matmul peak) | transformers 6262 tok/s
    8 prompts x 8 samples: ours 10219 tok/s | transformers 6542 tok/s (num_return_sequences=8) | 1.56x
    eos on, batch 64, compact_frac 0.0 / 0.25 / 0.5 / never: 0.70 / 0.64 / 0.79 / 1.13 s
    speedup vs transformers generate, batch 1: 1.36x   batch 64: 1.45x   batch 256: 1.56x

With --threads 2 on the loaded machine (load average ~5.7) both collapse: batch 64 ours 962 tok/s,
transformers 1121 tok/s (0.86x): every parallel op waits for a descheduled thread; 1 is the default.
Over the session the batch-64 ratio moved between 1.4x and 2.1x with the load.

The 3x target at batch 64 is NOT met. What was done (commits of 09:00-09:10), measured interleaved
against the previous sampler/model on the same weights and prompts (identical sampled tokens):
batch 1 1.14x, batch 64 1.20x, batch 256 ~1.0x faster.
  - CPU decode attention (model.Attention, T == 1): the g = n_head/n_kv query heads of a kv head as
    one (g, hd) @ (hd, S) matmul with an additive 0/-inf bias built once per step, instead of SDPA
    with a bool mask (SDPA converts it and sets up per head): 1.09-1.12x end to end;
  - rope frequencies computed once per config/device (lru_cache), no per-step pow/split/cat;
  - sampling: no divide at T = 1, inverse CDF on exp(logprobs) (no second softmax);
  - vision tower: attention per window / per image (equal-length segments batched into one SDPA
    call) instead of a dense N x N mask over all patches of a forward: prefill of 64 prompts in one
    forward 0.38 -> 0.19 s, 256 prompts 1.46 -> 0.70 s; with the sampler's 8-prompt chunks 1.09x.
  Measured and dropped: growing the static cache in chunks of 32 slots so that the filled keys lie
  back to back (1.08 vs 1.10 s, 4.58 vs 4.74 s: no gain end to end); fused qkv / gate-up (one
  64x128 @ 128x768 GEMM vs two 384-wide ones: 330 vs 342 us, and a fused copy would go stale when
  GRPO updates the weights); F.rms_norm (on CPU it is the same pow/mean/rsqrt kernels).

What stands in the way (per decode step at batch 64, mean key length S ~ 139, forward hooks, 1
thread): ~6.5 ms/step when the machine is quiet, of which
  - attention ~45-55%: the two batched matmuls read every row's K and V (4 layers x 64 rows x 2 kv
    heads x 139 x 32 floats x 2 = 18 MB per step, out of L3 at batch >= 64) as 128 separate
    17.8 KB streams, at 3.5-6.5 GB/s where a plain streaming sum of the same tensor reaches 14 GB/s
    (bench of the kernels alone: QK^T 1.3-2.2 ms, PV 1.4-2.4 ms per layer at batch 256). SDPA,
    einsum, K @ q^T, elementwise mul+sum and a contiguous (chunk-grown) cache were all measured:
    none is clearly faster. At batch 256 attention is ~22 of the 36 ms step;
  - GEMMs (q, k, v, o, gate, up, down, lm_head: 117 MFLOP/step at batch 64) ~2.7 ms, i.e. ~45
    GFLOP/s on 64-row operands whose weights (4.8 MB) are evicted from cache by the KV stream;
  - ~2 ms of small elementwise kernels (9 RMSNorms, rope, residuals, softmax: ~40 ops per layer,
    5-15 us each) and 0.2 ms/step of sampler loop (profiled at batch 1: 0.19 ms/step outside
    model.forward).
transformers pays the same attention/GEMM kernels plus its DynamicCache torch.cat and generate loop,
which is worth ~1.4-2x here, not 3x. Getting to 3x in eager fp32 would need a fused decode kernel
(torch.compile of the decode step, as gpt-fast does, or a custom attention that streams the cache)
-- not done: minutes of compilation on this 2-core machine, recompiles as S and the batch change.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model as M  # noqa: E402
import sampler as S  # noqa: E402


def make_batch(cfg, B, seed=0):
    """B left-padded prompts: 16-48 text tokens, an image (4, 16 or 8 LLM tokens), 8 text tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(B):
        t, h, w = [(1, 4, 4), (1, 8, 8), (1, 4, 8)][int(torch.randint(3, (1,), generator=g))]
        pre = torch.randint(1, cfg.text.vocab_size - 8, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g)
        post = torch.randint(1, cfg.text.vocab_size - 8, (8,), generator=g)
        img = torch.full((t * h * w // 4,), cfg.image_token_id)
        ids = torch.cat([pre, torch.tensor([cfg.vision_start_token_id]), img, torch.tensor([cfg.vision_end_token_id]), post])
        items.append(dict(input_ids=ids, assistant_mask=torch.zeros_like(ids, dtype=torch.bool),
                          pixel_values=torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g),
                          image_grid_thw=torch.tensor([[t, h, w]])))
    return data.collate(items, 0, left_pad=True)


def hf_generate(hf, cfg, batch, new, n=1):
    return hf.generate(num_return_sequences=n,input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int(),
                       do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=new, eos_token_id=10 ** 6, pad_token_id=0)  # no id matches: no stop


def timed(fn, reps=1):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_interleaved(f, g, reps):
    """Best-of-reps wall times of f and g (g may be None), alternating f, g, f, g, ... so that the
    load of a shared machine drifting over time hits both alike."""
    tf, tg = float("inf"), float("inf")
    for _ in range(reps):
        tf = min(tf, timed(f))
        if g is not None:
            tg = min(tg, timed(g))
    return tf, tg


def matmul_peak(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n ** 3 / timed(lambda: torch.mm(a, b), reps)  # FLOP/s


def decode_flops(cfg, batch, new):
    """FLOPs of decode steps 1..new-1 (the prefill and first sample excluded)."""
    t = cfg.text
    hd = t.head_dim
    layer = (t.hidden_size * hd * (t.num_attention_heads + 2 * t.num_key_value_heads)  # q, k, v
             + t.num_attention_heads * hd * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)  # o, mlp
    mm_params = t.num_hidden_layers * layer + t.hidden_size * t.vocab_size  # + lm_head
    B, T = batch["input_ids"].shape
    flops = 0
    for step in range(1, new):
        S_len = T + step  # keys attended (static cache: padded prompt slots included)
        flops += B * (2 * mm_params + t.num_hidden_layers * 4 * t.num_attention_heads * hd * S_len)
    return flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="best of this many runs, ours and theirs alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); 1 because "
                    "on a shared, oversubscribed machine 2 threads make every parallel op wait for a "
                    "descheduled thread (a 64x128 @ 128x384 linear: 0.08 ms -> 30 ms), for both contenders")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    cfg = M.tiny_config()
    net = M.Qwen2_5_VL(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        M.save_pretrained(net, d)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval()
    print(f"model: tiny_config(), {M.count_params(net) / 1e6:.2f}M params, vocab {cfg.text.vocab_size}, "
          f"torch threads {torch.get_num_threads()}")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak / 1e9:.1f} GFLOP/s")

    new = args.new
    warm = make_batch(cfg, 2)
    S.generate(net, warm, [], S.SampleConfig(max_new_tokens=4))
    if not args.no_hf:
        hf_generate(hf, cfg, warm, 4)
    ratios = []
    for B in args.batch:
        batch = make_batch(cfg, B, seed=B)
        sc = S.SampleConfig(max_new_tokens=new, temperature=1.0, seed=0)
        ours = lambda: S.generate(net, batch, [], sc)  # noqa: E731
        hf_ = (lambda: hf_generate(hf, cfg, batch, new)) if not args.no_hf else None
        if hf_:
            assert hf_().shape[1] - batch["input_ids"].shape[1] == new
        t_ours, t_hf = best_interleaved(ours, hf_, args.reps)
        t_first = timed(lambda: S.generate(net, batch, [], S.SampleConfig(max_new_tokens=1)), args.reps)
        t_dec = max(t_ours - t_first, 1e-9)
        frac = decode_flops(cfg, batch, new) / t_dec / peak
        line = (f"batch {B:4d} prompt {batch['input_ids'].shape[1]:3d} new {new}: ours {B * new / t_ours:8.0f} tok/s "
                f"(prefill+1 {t_first:.2f}s, decode {t_dec:.2f}s = {frac * 100:.1f}% of matmul peak)")
        if hf_:
            ratios.append((B, t_hf / t_ours))
            line += f" | transformers {B * new / t_hf:8.0f} tok/s"
        print(line, flush=True)

    # GRPO-shaped: prompts x n samples; we prefill each prompt once, transformers expands the inputs
    if not args.no_hf and 64 in args.batch:
        batch = make_batch(cfg, 8, seed=8)
        sc = S.SampleConfig(max_new_tokens=new, temperature=1.0, seed=0, n=8)
        t_ours, t_hf = best_interleaved(lambda: S.generate(net, batch, [], sc),
                                        lambda: hf_generate(hf, cfg, batch, new, n=8), args.reps)
        print(f"8 prompts x 8 samples, new {new}: ours {64 * new / t_ours:8.0f} tok/s | transformers "
              f"{64 * new / t_hf:8.0f} tok/s (num_return_sequences=8) | {t_hf / t_ours:.2f}x")

    # dropping finished rows: eos on, per-token stop probability ~1/64 -> lengths spread over [1, new]
    B = 64 if 64 in args.batch else args.batch[0]
    batch = make_batch(cfg, B, seed=B)
    eos = list(range(100, 100 + cfg.text.vocab_size // 64))
    for frac in (0.0, 0.25, 0.5, 2.0):
        sc = S.SampleConfig(max_new_tokens=new, seed=0, compact_frac=frac)
        out = S.generate(net, batch, eos, sc)
        t = timed(lambda: S.generate(net, batch, eos, sc), args.reps)
        print(f"eos on, batch {B}, compact_frac {frac:4}: {t:.2f}s for {int(out['lengths'].sum())} tokens "
              f"(mean length {out['lengths'].float().mean():.0f})" + ("  [never compacts]" if frac > 1 else ""))
    for B, r in ratios:
        print(f"speedup vs transformers generate, batch {B}: {r:.2f}x")


if __name__ == "__main__":
    main()
