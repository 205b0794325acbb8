"""
Benchmark: one SFT micro-batch (forward + summed CE on the answer + backward, sft.micro_loss),
with the rows' common prefix encoded once (share_prefix, sft.py's default) against every row
encoding it (the plain forward). Prints the ratio of the medians, measured interleaved.

The shape is bench/grpo_step.py's world: 16 rows of [the reflect system prompt, one 280x224 image
(80 image tokens), a question | an answer of --answer tokens], right-padded, tiny model
(model.tiny_config(), random weights), fp32, 1 torch thread. The rows share the system prompt and
the user turn's header (model.common_prefix_len: up to the image), as every SFT batch of the
built-in task does; their images differ. The built-in task's rows are shorter (single prompt:
~174 tokens of which 83 shared; reflect data: ~325 of which 158), so its gains are larger.

    python bench/sft_step.py                  # 16 rows, 60-token answers
    python bench/sft_step.py --answer 120     # the stage-1 (reflection) answer length

On a quiet machine, 16 rows x 332 tokens (93 shared): 1.43x (runs: docs/LOG.md).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpo_step as B  # noqa: E402  (the same world as the GRPO benchmark)
import sft  # noqa: E402
from train_profile import sft_batch  # noqa: E402


def step(model, batch, share):
    model.zero_grad(set_to_none=True)
    loss_sum, _ = sft.micro_loss(model, batch, torch.autocast("cpu", enabled=False), share_prefix=share)
    loss_sum.backward()
    return float(loss_sum.detach())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--answer", type=int, default=60)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok, prompts, _, model = B.make_world(tmp, 8)
    model.train()
    batch = sft_batch(tok, prompts, n=args.rows, answer=args.answer)
    L = model.common_prefix_len(batch["input_ids"], batch["attention_mask"])
    print(f"model: tiny_config(), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
          f"{args.rows} rows x {batch['input_ids'].shape[1]} tokens, {L} shared; torch threads {torch.get_num_threads()}")
    losses = {share: step(model, batch, share) for share in (False, True)}  # warm-up, and the same loss
    print(f"loss sum: plain {losses[False]:.4f} | shared {losses[True]:.4f}")
    times = {False: [], True: []}
    for _ in range(args.reps):
        for share in (False, True):
            t0 = time.perf_counter()
            step(model, batch, share)
            times[share].append(time.perf_counter() - t0)
    plain, shared = statistics.median(times[False]), statistics.median(times[True])
    print(f"plain  {plain:.3f} s (runs: {' '.join(f'{t:.3f}' for t in times[False])})")
    print(f"shared {shared:.3f} s (runs: {' '.join(f'{t:.3f}' for t in times[True])})")
    print(f"SFT micro-batch forward+backward, common prefix encoded once: {plain / shared:.2f}x")


if __name__ == "__main__":
    main()
