"""
Distributed helpers shared by sft.py and grpo.py: process-group setup, FSDP2 sharding, and
atomic training-state checkpoints.

- init(): under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) start a process group,
  nccl on GPU, gloo on CPU; otherwise a single process with no process group at all.
- shard_model(): FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, every
  vision block, then the root module. A no-op in a single process, so the same training code runs
  with and without torchrun.
- save_train_state() / load_train_state(): a checkpoint is one directory
      config.json, model.safetensors, tokenizer.json ...   HF format (model.save_pretrained)
      optimizer.safetensors                                 optimizer tensors, key "<param fqn>/<name>"
      train_state.json                                      step, optimizer hyper-parameters, extra
      rng_rank<r>.safetensors + rng_rank<r>.json            every rank's RNG states
  written to "<dir>.tmp" and renamed into place only when complete, so a kill at any moment leaves
  either the old checkpoint or the new one, never half of one. No pickle anywhere: tensors go to
  safetensors, scalars to JSON. The weights are gathered to rank 0 as one full state dict
  (get_model_state_dict(full_state_dict=True, cpu_offload=True)); to resume, build the model from
  the checkpoint directory with model.from_pretrained *before* shard_model, then call
  load_train_state for the optimizer, step, RNG and extra.
"""
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import model as model_lib


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
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        dist.barrier()


def close():
    """Wait for every process, then tear the process group down (no rank leaves mid-collective)."""
    if dist.is_available() and dist.is_initialized():
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


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> tuple[dict, dict]:
    """(tensors, json) with the torch / cuda / numpy / python RNG states of this process."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_train_state(path, model, optimizer, step: int, extra: dict | None = None,
                     tokenizer_dir: str | None = None, rng: bool = True):
    """Collective (all ranks call it). Writes the checkpoint directory `path` atomically:
    everything goes to path + ".tmp", which is renamed to `path` when complete (an older `path`
    is replaced). `extra` is any JSON-able dict (data position, config, metrics...)."""
    rank = dist.get_rank() if is_distributed() else 0
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    # 1. gather full weights and optimizer state to rank 0 (cpu); other ranks get empty dicts
    model_sd = get_model_state_dict(model, options=_full_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    # 2. rank 0 writes the weights (HF format), the optimizer tensors and the JSON state
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model_lib.save_pretrained(model, tmp, tokenizer_dir=tokenizer_dir, state_dict=model_sd)
        tensors = {}
        for fqn, state in optim_sd["state"].items():
            for name, value in state.items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                tensors[f"{fqn}/{name}"] = value.detach().cpu().contiguous()
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in optim_sd["param_groups"]]
        state = {"step": int(step), "world_size": dist.get_world_size() if is_distributed() else 1,
                 "param_groups": groups, "extra": extra or {}}
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    del model_sd, optim_sd
    barrier()
    # 3. every rank adds its RNG states
    if rng:
        tensors, meta = _rng_state()
        save_file(tensors, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
        with open(os.path.join(tmp, f"rng_rank{rank}.json"), "w") as f:
            json.dump(meta, f)
    barrier()
    # 4. publish: rename tmp -> path (an existing path is moved aside first, then deleted)
    if rank == 0:
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_train_state(path, model, optimizer, rng: bool = True) -> tuple[int, dict]:
    """Collective. Restores the optimizer state (into the possibly sharded `model`'s optimizer),
    and this rank's RNG states; returns (step, extra). The weights are NOT loaded here: build the
    model with model.from_pretrained(path) before sharding it."""
    rank = dist.get_rank() if is_distributed() else 0
    where = os.path.join(path, "train_state.json")
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no train_state.json, not a training checkpoint")
    with open(where) as f:
        state = json.load(f)
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    optim_state = {}
    for key, value in flat.items():
        fqn, name = key.rsplit("/", 1)
        optim_state.setdefault(fqn, {})[name] = value
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(optim_state) - names)
    if unknown:
        raise ValueError(f"{path}/optimizer.safetensors: state for {len(unknown)} parameter(s) the model does not "
                         f"train, first {unknown[0]!r} (different model, or --freeze_vision changed?)")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    # strict=False: parameters that never had a gradient (unused so far) have no state, as in a fresh optimizer
    set_optimizer_state_dict(model, optimizer, {"state": optim_state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    for g in optimizer.param_groups:  # the full-state-dict path hands tuples back as lists
        g.update({k: tuple(v) for k, v in g.items() if k == "betas" and isinstance(v, list)})
    rng_file = os.path.join(path, f"rng_rank{rank}.safetensors")
    if rng and os.path.exists(rng_file):
        with open(os.path.join(path, f"rng_rank{rank}.json")) as f:
            _set_rng_state(load_file(rng_file), json.load(f))
    return state["step"], state["extra"]
