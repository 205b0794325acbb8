"""What sft.py and grpo.py share to train: the AdamW parameter groups, the lr schedule, the
gradient clip with its finiteness check, bf16 autocast on GPU (sft.py; grpo.py uses FSDP2 mixed precision), and a run's start and end
(process group, lock, resume, preemption). The run directory itself (lock, log, checkpoints) is
checkpoint.py's.

Preemption: schedulers send SIGTERM before they kill a job (Ctrl-C sends SIGINT). During run() both
only set a flag; at the end of every step the loop calls stop_requested(d), which all-reduces the
flag (max over ranks: every rank stops after the same step, whichever got the signal), and on a stop
saves a checkpoint and raises Preempted: the script exits 128 + the signal (143 for SIGTERM) after
naming the checkpoint, and a rerun of the same command resumes from it. The step in flight when
the signal comes is finished first, so nothing is lost when the scheduler's grace period (torchrun:
30 s, then SIGKILL) covers a step and a save. More signals change nothing (torchrun forwards
the one it got, so workers see two); a second Ctrl-C more than a second after the first stops at
once (KeyboardInterrupt), and SIGKILL always does.
"""
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch

from support import checkpoint
from support import cli
from support import dist


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), vision_lr_scale=1.0):
    """AdamW over the trainable parameters. Weight decay only on weight matrices: decaying norm
    gains, biases or token embedding rows pulls them towards 0, which is not a prior anyone wants
    for them. Each group holds lr_scale (the vision tower's: vision_lr_scale); set_lr applies it."""
    groups = []
    for vision in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.") == vision]
        decays = lambda n, p: p.dim() >= 2 and "embed_tokens" not in n
        scale = vision_lr_scale if vision else 1.0
        groups += [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)


def lr_at(step, lr, min_lr, warmup, end):
    """lr of optimizer step `step` (0-based): linear warmup over `warmup` steps, then a cosine from
    lr down to min_lr, reached at step `end`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, end - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        # .get: grpo.py checkpoints written before it shared make_optimizer have no lr_scale
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_grad_norm(params, max_norm, loss) -> float:
    """Clip the gradients of params to max_norm (0 = off) and return their norm before clipping.
    A non-finite loss or norm raises NonFiniteLoss: the caller stops before the optimizer step."""
    # clip_grad_norm_(params, 0) would zero every gradient: 0 means off
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP2: a DTensor
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise checkpoint.NonFiniteLoss(f"loss {loss}, grad norm {norm}")
    return norm


def follow_thread_budget(device):
    """CPU: set torch's thread count to the share pipeline.py gives this stage. The pipeline runs
    independent stages at the same time and splits the machine's cores between the ones running,
    writing each one's share to the file named by $SRPO_THREADS_FILE whenever a stage starts or
    ends; a training loop calls this every step, so a training stage left alone gets every core
    (sampling-only stages keep the share they started with). Without
    the variable (a script run by hand) nothing changes: --threads holds."""
    path = os.environ.get("SRPO_THREADS_FILE")
    if not path or device.type != "cpu":
        return
    try:
        with open(path) as f:
            n = int(f.read())
    except (OSError, ValueError):  # not written yet, or being rewritten: keep the current count
        return
    if n > 0 and n != torch.get_num_threads():
        torch.set_num_threads(n)


def autocast(device):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def run(cfg, check_config, train):
    """A script's whole run: the process group (torchrun) or one process, cfg checked against the
    world size, SIGTERM / SIGINT turned into a stop after the current step (see the docstring),
    train(cfg, d); out/lock released, the signal handlers restored and the process group closed
    however it ends (a failed rank skips the final barrier, so the others fail instead of hanging;
    a preempted run stopped on every rank at the same step, so it takes the barrier)."""
    d, ok = dist.init(), False
    try:
        with StopSignals():
            check_config(cfg, d.world_size)
            result = train(cfg, d)
        ok = True
        return result
    except cli.Preempted:
        ok = True
        raise
    finally:
        if d.is_main:
            checkpoint.release_lock(cfg.out)
        dist.close(ok)


class StopSignals:
    """Inside `with`: SIGTERM and SIGINT set _signal instead of ending the process (main thread
    only; elsewhere nothing changes). The previous handlers come back on exit."""
    names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __enter__(self):
        global _signal, _signal_time
        _signal, _signal_time, self.old = 0, 0.0, {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in self.names}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False

    @staticmethod
    def _handle(signum, frame):
        global _signal, _signal_time
        if signum == signal.SIGINT and _signal and time.monotonic() - _signal_time > 1.0:
            raise KeyboardInterrupt                                    # a person pressing Ctrl-C again
        if not _signal:
            _signal, _signal_time = signum, time.monotonic()
            if os.environ.get("RANK", "0") == "0":
                print(f"\n{StopSignals.names[signum]}: finishing this step, then saving a checkpoint and "
                      f"stopping", file=sys.stderr, flush=True)


_signal, _signal_time = 0, 0.0


def stop_requested(d) -> int:
    """Collective, once per step on every rank: the signal (SIGTERM / SIGINT) any rank got so far, else 0."""
    return int(dist.all_reduce(torch.tensor([_signal], device=d.device), "max").item())


def preempted(prog, signum, step, ckpt) -> cli.Preempted:
    """The exception a loop raises after its stop checkpoint (cli.main: the message, exit 128 + signum)."""
    return cli.Preempted(f"{prog}: stopped by {StopSignals.names.get(signum, signum)} after step {step}; "
                         f"checkpoint saved in {ckpt}; rerun the same command to resume", signum)


def resume(prog, ckpt, model, optimizer, config: dict, free, data: dict | None = None) -> int:
    """Load the optimizer state and RNG of ckpt (the weights were built from it) after checking that
    the run's config equals the one it was written with, except the `free` fields, and that its
    data files have the content they had then (data: checkpoint.data_fingerprint). -> its step."""
    with cli.reading(prog, "checkpoint", ckpt):
        step, extra = checkpoint.load(ckpt, model, optimizer)
    checkpoint.check_resume_config(prog, ckpt, extra.get("config", {}), config, free)
    checkpoint.check_resume_data(prog, ckpt, extra.get("data", {}), data or {})
    return step
