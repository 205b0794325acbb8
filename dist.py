"""
Distributed helpers shared by sft.py and grpo.py: process-group setup and FSDP2 sharding
(training checkpoints live in checkpoint.py).

- init(): under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) start a process group,
  nccl on GPU, gloo on CPU, with an explicit timeout (SRPO_PG_TIMEOUT_MIN, default 30 min: a
  rank stuck in a collective -- e.g. another rank died mid-rollout -- fails instead of hanging);
  otherwise a single process with no process group at all.
- shard_model(): FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, every
  vision block, then the root module. A no-op in a single process, so the same training code runs
  with and without torchrun.
"""
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def init() -> Dist:
    """Process group from torchrun's environment, else a single process (no process group)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(minutes=float(os.environ.get("SRPO_PG_TIMEOUT_MIN", "30")))
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None, timeout=timeout)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        dist.barrier()


def close(ok: bool = True):
    """Wait for every process, then tear the process group down (no rank leaves mid-collective).
    ok=False (this rank is failing): no barrier -- it would match a barrier the other ranks wait
    in mid-run and let them carry on; tearing down makes their next collective fail instead."""
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def exit_worker():
    """The last line of a torchrun worker: exit without Python's interpreter teardown, where gloo's
    threads sometimes abort an already finished process ('terminate called without an active
    exception', exit -6; seen ~1 in 15 runs on a loaded 2-core machine). Call after close(), once
    everything is saved. A no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum / mean / max over processes; returns t. Identity in a single process."""
    if not is_distributed():
        return t
    if op == "sum":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    elif op == "mean":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    elif op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        raise ValueError(f"all_reduce: unknown op {op!r} (sum, mean, max)")
    return t


def shard_model(model):
    """FSDP2: one unit per decoder layer and per vision block, then the root (embeddings, norm,
    lm_head, patch embed, merger). Gradients are averaged over processes by the reduce-scatter.
    No-op in a single process."""
    if not is_distributed():
        return model
    from torch.distributed.fsdp import fully_shard
    for block in model.visual.blocks:
        fully_shard(block)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model
