"""
Profile: where the time of one CPU training step goes, for the tiny model (model.tiny_config()).

    sft   one SFT-shaped micro-batch: 16 sequences of [prompt (272 tokens, an 80-token image) |
          60 answer tokens], right-padded, forward + summed CE on the answer + backward (sft.micro_loss
          with share_prefix off; bench/sft_step.py times it on and off)
    grpo  bench/grpo_step.py's training pass: 8 prompts x 8 responses of 128 tokens, micro-batches
          of 2 whole groups (16 rows) through model.forward_shared_prefix, forward + backward

Prints the wall time of a few steps, then torch.profiler's table of the ops by self CPU time (one
step, input shapes grouped with --shapes). A profile, not a benchmark: no baseline, no ratio.

    python bench/train_profile.py            # both
    python bench/train_profile.py --only sft --shapes
    python bench/train_profile.py --only sdpa    # the sft attention: explicit mask vs is_causal

Profiles and the proposals they led to are in docs/LOG.md: the matmuls (~40%) and SDPA
forward + backward (~1/3) dominate both passes.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import data  # noqa: E402
import grpo_step as B  # noqa: E402  (bench/grpo_step.py: the same world and training pass)
import sampler as S  # noqa: E402


def sft_batch(tok, prompts, n=16, answer=60):
    ans = torch.randint(0, tok.vocab_size - 10, (answer,), generator=torch.Generator().manual_seed(0))
    items = []
    for p in (prompts * n)[:n]:
        ids = torch.cat([p["input_ids"], ans])
        am = torch.zeros_like(ids, dtype=torch.bool)
        am[len(p["input_ids"]):] = True
        items.append(dict(input_ids=ids, assistant_mask=am, pixel_values=p["pixel_values"],
                          image_grid_thw=p["image_grid_thw"]))
    return data.collate(items, 0, left_pad=False)


def sft_step(policy, batch):
    logits = policy(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    attention_mask=batch["attention_mask"])
    mask = batch["assistant_mask"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1][mask].float(), batch["input_ids"][:, 1:][mask], reduction="sum")
    loss.backward()
    policy.zero_grad(set_to_none=True)


def sdpa_mask_vs_causal(reps=5):
    """The sft shape's attention (16 x 4 heads x 332 x 32, half the rows right-padded from 280),
    forward + backward, with the explicit causal+padding mask vs is_causal=True (the same outputs
    on the real tokens of right-padded rows). Interleaved; prints the ratio of the medians."""
    import statistics
    Bn, H, T, d = 16, 4, 332, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bn, H, T, d, generator=g).requires_grad_() for _ in range(3))
    real = torch.ones(Bn, T, dtype=torch.bool)
    real[::2, 280:] = False
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    mask = torch.zeros(Bn, 1, T, T).masked_fill(~keep, float("-inf"))

    def run(causal):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal)
        o.sum().backward()
        return o.detach()
    diff = (run(False) - run(True))[real[:, None, :, None].expand(Bn, H, T, d)].abs().max()
    times = {False: [], True: []}
    for _ in range(reps):
        for causal in (False, True):
            t0 = time.perf_counter()
            run(causal)
            times[causal].append(time.perf_counter() - t0)
    print(f"sdpa fwd+bwd {Bn}x{H}x{T}x{d}: mask {statistics.median(times[False]):.3f} s, is_causal "
          f"{statistics.median(times[True]):.3f} s (real tokens differ by {float(diff):.1e}): "
          f"is_causal {statistics.median(times[False]) / statistics.median(times[True]):.2f}x")


def report(name, fn, reps, shapes):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(f"{name}: {' '.join(f'{t:.3f}' for t in times)} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        fn()
    print(prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=20,
                                                               max_name_column_width=40, max_shapes_column_width=80))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["sft", "grpo", "sdpa"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", action="store_true", help="group the table by input shapes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "sdpa":
        return sdpa_mask_vs_causal()
    P, G = 8, 8
    with tempfile.TemporaryDirectory() as tmp:
        tok, prompts, _, policy = B.make_world(tmp, P)
        policy.train()
        if args.only in (None, "sft"):
            batch = sft_batch(tok, prompts)
            report(f"sft step {tuple(batch['input_ids'].shape)}", lambda: sft_step(policy, batch), args.reps, args.shapes)
        if args.only in (None, "grpo"):
            no_eos = type("NoEos", (), {})()
            no_eos.__dict__.update(pad_id=tok.pad_id, eos_ids=[], decode=tok.decode)
            gen = S.generate_texts(policy, no_eos, prompts, S.SampleConfig(max_new_tokens=128, n=G, compile=False),
                                   batch_size=P)
            adv = torch.randn(P * G, generator=torch.Generator().manual_seed(0))
            report("grpo training pass (8 x 8 x 128, shared prompt)",
                   lambda: B.training_pass(policy, prompts, gen, adv, G, 2, True), args.reps, args.shapes)


if __name__ == "__main__":
    main()
