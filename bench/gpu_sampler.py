"""
Benchmark: the sampler on the GPU against transformers' generate, in one process, on the same
random weights (Qwen2.5-VL-7B shapes, bf16), the same prompts and the same number of new tokens.

    python bench/gpu_sampler.py --shape 7b                 # one GPU: 8 prompts x 8 samples x 256 new tokens
    python bench/gpu_sampler.py --shape tiny --device cpu  # the dry run of every code path (fp32, ~1 min)

Contenders, each as ms per decode step, tokens/s and the ratio to the memory-bandwidth bound:
  ours static + graph   sampler.generate, SampleConfig(path="static"): fixed-shape step, compiled
                        (--compile) and captured as a CUDA graph (on CUDA)
  ours static eager     the same loop, neither compiled nor captured
  ours cascade eager    the CPU-tuned loop run on the device (what CUDA used before the static path)
  hf dynamic            transformers generate, sdpa, its default dynamic cache
  hf static+compile     transformers generate, cache_implementation="static" (transformers compiles
                        the decoding forward itself on CUDA when the cache is static)
Every row samples at temperature 1 with no eos (exactly --new tokens per row). ms/step = (wall of
the call - wall of the same call with 1 new token) / (new - 1): the prefill is taken out. The bound:
the bytes of the weights one decode step must read (decoder layers, final norm, lm_head; bf16) /
--hbm bytes/s; KV reads, activations and launch gaps not counted, so it is a LOWER bound.
Then greedy agreement: ours static and hf dynamic decode greedily; printed: rows equal over all
new tokens and the mean length of the common prefix (bf16 near-ties make long greedy runs diverge
even between two correct implementations; fp32 on the tiny model must agree exactly).
Prompts: ~300 tokens each (210-229 random text tokens, one 224 x 224 image = 64 tokens, 16 more).
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import data, hf_checkpoint  # noqa: E402
import model as M  # noqa: E402
import sampler as S  # noqa: E402


@dataclasses.dataclass
class Args:
    shape: str = "7b"          # 7b: Qwen2.5-VL-7B's config (random weights); tiny: model.tiny_config
    device: str = "cuda"
    prompts: int = 8
    samples: int = 8           # per prompt (GRPO group size)
    new: int = 256             # new tokens per row
    compile: int = -1          # torch.compile our static step: 1 / 0; -1 = 1 on CUDA, 0 on CPU
    reps: int = 2              # best of this many timed calls per contender (after one warm-up call)
    hbm: float = 4.3e12        # bytes/s for the bound (H200: ~4.3e12 measured copy, 4.8e12 spec)
    skip: str = ""             # comma-separated contenders to leave out, e.g. "cascade,hf_static"


def make_prompts(cfg, B, text=(210, 230), image_px=224, post_len=16, seed=8):
    g = torch.Generator().manual_seed(seed)
    top = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
              min(cfg.eos_token_id) if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id) - 1
    p = cfg.vision.patch_size
    h = w = image_px // p
    items = []
    for _ in range(B):
        pre = torch.randint(1, top, (int(torch.randint(*text, (1,), generator=g)),), generator=g)
        post = torch.randint(1, top, (post_len,), generator=g)
        img = torch.full((h * w // cfg.vision.spatial_merge_size ** 2,), cfg.image_token_id)
        ids = torch.cat([pre, torch.tensor([cfg.vision_start_token_id]), img, torch.tensor([cfg.vision_end_token_id]), post])
        items.append(dict(input_ids=ids, assistant_mask=torch.zeros_like(ids, dtype=torch.bool),
                          pixel_values=torch.randn(h * w, cfg.vision.in_channels * cfg.vision.temporal_patch_size * p * p,
                                                   generator=g),
                          image_grid_thw=torch.tensor([[1, h, w]])))
    return data.collate(items, 0, left_pad=True)


def decode_weight_bytes(net):
    """Bytes one decode step must read: decoder layers, final norm, lm_head (the embedding is only
    gathered at the batch's rows; tied weights counted once)."""
    seen, n = set(), 0
    for m in list(net.layers) + [net.norm, net.lm_head]:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
    return n


def build(a: Args, dev, dtype):
    """Our model with random weights built on the device, and transformers' model with the same
    weights (copied in memory through model.py's checkpoint key mapping)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = M.tiny_config() if a.shape == "tiny" else M.ModelConfig()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            net = M.Qwen2_5_VL(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    hf_cfg = Qwen2_5_VLConfig.from_dict(cfg.to_hf(str(dtype).replace("torch.", "")))
    with torch.device(dev):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa").eval()
    ours = net.state_dict()
    load = {}
    for key in hf.state_dict():
        o = hf_checkpoint._key_to_ours(key)
        if o in ours:
            load[key] = ours[o]
    info = hf.load_state_dict(load, strict=False)
    missing = [k for k in info.missing_keys if k != "lm_head.weight"]
    if missing or info.unexpected_keys:
        sys.exit(f"bench/gpu_sampler.py: weight copy to transformers: missing {missing[:5]}, "
                 f"unexpected {info.unexpected_keys[:5]}")
    if "lm_head.weight" in info.missing_keys:
        hf.tie_weights()
    return cfg, net, hf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    for f in dataclasses.fields(Args):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    a = Args(**vars(ap.parse_args()))
    if a.shape not in ("7b", "tiny"):
        sys.exit(f"bench/gpu_sampler.py: --shape must be 7b or tiny, got {a.shape!r}")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_sampler.py: --device cuda but no CUDA device (the CPU dry run: --shape tiny --device cpu)")
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    compile_ = (a.compile if a.compile >= 0 else int(cuda)) == 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg, net, hf = build(a, dev, dtype)
    text = (210, 230) if a.shape == "7b" else (20, 30)
    batch = make_prompts(cfg, a.prompts, text=text)
    T = batch["input_ids"].shape[1]
    P, G, NEW = a.prompts, a.samples, a.new
    bound_ms = decode_weight_bytes(net) / a.hbm * 1e3
    print(f"model {a.shape} ({M.count_params(net) / 1e9:.3f}B params, {str(dtype)[6:]}) on {dev}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}; torch {torch.__version__}; "
          f"{P} prompts x {G} samples x {NEW} new tokens; prompts padded to {T} tokens", flush=True)
    print(f"bandwidth bound: {decode_weight_bytes(net) / 1e9:.2f} GB of decode weights / {a.hbm:.2g} B/s = "
          f"{bound_ms:.3f} ms/step (a lower bound)", flush=True)

    on_dev = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    on_dev["pixel_values"] = on_dev["pixel_values"].to(dtype)
    hf_kw = dict(input_ids=on_dev["input_ids"], attention_mask=on_dev["attention_mask"],
                 pixel_values=on_dev["pixel_values"], image_grid_thw=on_dev["image_grid_thw"],
                 mm_token_type_ids=(on_dev["input_ids"] == cfg.image_token_id).int())

    def ours(**kw):
        def call(new):
            sc = S.SampleConfig(max_new_tokens=new, temperature=1.0, n=G, seed=0, **kw)
            return S.generate(net, batch, [], sc)["tokens"]
        return call

    def theirs(**kw):
        def call(new):
            with torch.no_grad():
                out = hf.generate(**hf_kw, num_return_sequences=G, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=new, eos_token_id=10 ** 6, pad_token_id=0, **kw)
            return out[:, T:]
        return call

    contenders = [("ours static + graph", "static", ours(path="static", compile=compile_, cuda_graph=True)),
                  ("ours static eager", "static_eager", ours(path="static", compile=False, cuda_graph=False)),
                  ("ours cascade eager", "cascade", ours(path="cascade", compile=False)),
                  ("hf dynamic", "hf", theirs()),
                  ("hf static+compile", "hf_static", theirs(cache_implementation="static"))]
    skip = set(a.skip.split(",")) - {""}

    def timed(fn, new):
        sync()
        t0 = time.perf_counter()
        out = fn(new)
        sync()
        return time.perf_counter() - t0, out

    rows = {}
    for label, key, fn in contenders:
        if key in skip:
            continue
        try:
            t_warm, out = timed(fn, NEW)  # compiles, captures, warms the allocator: not timed
            assert tuple(out.shape) == (P * G, NEW), f"{label}: {tuple(out.shape)} tokens, want {(P * G, NEW)}"
            wall = min(timed(fn, NEW)[0] for _ in range(a.reps))
            timed(fn, 1)
            first = min(timed(fn, 1)[0] for _ in range(a.reps))
        except Exception as e:  # noqa: BLE001 -- report and go on with the other contenders
            print(f"{label:<22} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        ms = (wall - first) / (NEW - 1) * 1e3 if NEW > 1 else wall * 1e3
        rows[key] = ms
        print(f"{label:<22} {ms:8.2f} ms/step  {P * G * NEW / wall:9.0f} tok/s  {ms / bound_ms:6.2f}x the bound  "
              f"(warm-up call {t_warm:.1f} s, wall {wall:.2f} s, prefill + 1 token {first:.2f} s)", flush=True)
    for key, label in (("hf", "hf dynamic"), ("hf_static", "hf static+compile")):
        if "static" in rows and key in rows:
            print(f"ours static + graph vs {label}: {rows[key] / rows['static']:.2f}x faster per step", flush=True)

    # greedy agreement on the same prompts (one sample per prompt)
    sc = S.SampleConfig(max_new_tokens=NEW, greedy=True, suppress_ids=(), path="static", compile=compile_)
    mine = S.generate(net, batch, [], sc)["tokens"].cpu()
    with torch.no_grad():
        ref = hf.generate(**hf_kw, do_sample=False, max_new_tokens=NEW, eos_token_id=10 ** 6, pad_token_id=0)[:, T:].cpu()
    same = (mine == ref).long()
    prefix = same.cumprod(1).sum(1).float()  # tokens equal before the first difference
    print(f"greedy agreement ours static vs hf dynamic: {int((prefix == NEW).sum())}/{P} rows identical over "
          f"{NEW} tokens, mean common prefix {float(prefix.mean()):.1f} tokens, "
          f"{float(same.float().mean()) * 100:.1f}% of positions equal", flush=True)
    if not cuda and not math.isclose(float(prefix.mean()), NEW):
        sys.exit("bench/gpu_sampler.py: fp32 greedy output differs from transformers'")


if __name__ == "__main__":
    main()
