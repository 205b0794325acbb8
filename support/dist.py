"""
Distributed helpers shared by sft.py and grpo.py: process-group setup and FSDP2 sharding
(training checkpoints live in checkpoint.py).

- init(): under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) start a process group,
  nccl on GPU, gloo on CPU, with an explicit timeout (SRPO_PG_TIMEOUT_MIN, default 30 min: a
  rank stuck in a collective -- e.g. another rank died mid-rollout -- fails instead of hanging);
  otherwise a single process with no process group at all.
- shard_model(): FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, every
  vision block, the token embedding and the output head, then the root module. With
  param_dtype=bfloat16 (a bf16 run) FSDP2's MixedPrecisionPolicy is the ONE precision mechanism:
  fp32 master weights and optimizer state stay sharded, every forward (training, reference, the
  sampler's) runs on bf16 all-gathered copies, gradients are reduced in fp32; no torch.autocast.
  In fp32 a single process is left as it is (no process group), so the same training code runs
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
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None, timeout=pg_timeout())
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def pg_timeout() -> timedelta:
    """How long a collective may wait before the process group fails it: SRPO_PG_TIMEOUT_MIN
    minutes, default 30. Explicit because the default (NCCL's 10 min watchdog) is shorter than
    legitimate waits of a 7B run -- rank 0 writing the HF export of a checkpoint while the others
    wait in a barrier, one rank's long rollout -- and because a rank stuck in a collective after
    another rank died should fail with an error, not hang until the job's wall-clock limit."""
    return timedelta(minutes=float(os.environ.get("SRPO_PG_TIMEOUT_MIN", "30")))


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


def precision_dtype(precision: str, device) -> torch.dtype:
    """--precision auto | fp32 | bf16 -> the dtype forwards run in (auto: bf16 on CUDA, fp32 on CPU,
    where bf16 matmuls are slow and the fp32 tests compare against exact references)."""
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"dist.py: precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _single_process_group(device):
    """A process group of one (an in-memory store, no port): FSDP2 needs one, and a one-process
    bf16 run uses FSDP2's mixed precision like an N-process run instead of a second code path."""
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=pg_timeout())


def shard_model(model, param_dtype: torch.dtype = torch.float32):
    """FSDP2: one unit per decoder layer and per vision block, one for the token embedding and
    one for the output head, then the root (final norm, patch embed, merger). Gradients are
    averaged over processes by the reduce-scatter.

    The embedding and the head are the largest single tensors (152k x 3584 each at 7B): in the
    root they would stay gathered for the whole forward and backward; as their own units each is
    gathered only around its use. Tied weights (small Qwen2.5-VL: lm_head.weight IS
    embed_tokens.weight) must live in ONE unit, so the two modules are sharded together.

    param_dtype=bfloat16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on every unit
    (a one-process run gets a one-process group for it). fp32: no-op in a single process.
    The model's parameters stay fp32 (the master weights the optimizer updates)."""
    mixed = param_dtype != torch.float32
    if mixed and param_dtype != torch.bfloat16:
        raise ValueError(f"dist.shard_model: param_dtype must be float32 or bfloat16, got {param_dtype}")
    if not is_distributed() and not mixed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if mixed:
        _single_process_group(model.embed_tokens.weight.device)
    # reduce_dtype fp32: summing bf16 gradients over 8 ranks would round each partial sum to 8 bits
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)) if mixed else {}
    for block in model.visual.blocks:
        fully_shard(block, **kw)
    for layer in model.layers:
        fully_shard(layer, **kw)
    if model.lm_head.weight is model.embed_tokens.weight:
        fully_shard([model.embed_tokens, model.lm_head], **kw)
    else:
        fully_shard(model.embed_tokens, **kw)
        fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def set_grad_sync(model, sync: bool):
    """FSDP2: reduce-scatter gradients after this backward (True) or keep accumulating them
    unsharded (False: every micro-batch of an optimizer step but the last, which saves one
    reduce-scatter per micro-batch). No-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
