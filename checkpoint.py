"""
The run directory of sft.py and grpo.py: one layout, one set of rules for resuming.

    out/
      lock                 "pid host" of the run using out/: a second run on out/ fails at once
                           naming that pid; a lock left by a dead pid (kill -9) is taken over
      run_config.json      the run's config (fresh runs; also stored in checkpoint/train_state.json)
      log.jsonl            one strict-JSON line per step (non-finite numbers are written as null)
      tokenizer/           the run's tokenizer, installed once at the start: the source every save
                           copies from (never a checkpoint that a later save deletes)
      checkpoint/          the latest training state: the HF model (config.json, model.safetensors,
                           tokenizer.json, ...) + optimizer.safetensors + rng_rank{r}.{safetensors,json}
                           + train_state.json (step, optimizer hyper-parameters, extra: the config)
      config.json, model.safetensors, tokenizer.json, ...   at the end: the final HF model (export),
                           loadable by transformers; model.safetensors is copied last

Saving checkpoint/ (save, collective): everything goes to checkpoint.tmp/, train_state.json last
(its presence = complete); then checkpoint/ -> checkpoint.old/, checkpoint.tmp/ -> checkpoint/,
checkpoint.old/ deleted. A kill at any moment leaves a complete checkpoint/, or, between the two
renames, a complete checkpoint.tmp/ and checkpoint.old/: recover() renames the newest complete one
back to checkpoint/ before anything else happens, so a rerun resumes instead of starting over.
No pickle anywhere: tensors go to safetensors, scalars to JSON. Files are written with the
process umask (safetensors itself writes 0600; we chmod to what open() would have given).

Errors a user can fix (a missing input, a bad flag, a locked directory) are RunError: the scripts
print their one line (`cli`) instead of a traceback, and exit 1.
"""
import json
import math
import os
import random
import shutil
import socket
import sys

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import data
import dist
import model as model_lib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


class RunError(ValueError):
    """A problem the user fixes (input, flag, directory): shown as one line, exit status 1."""


class NonFiniteLoss(RunError):
    """A NaN / inf loss or gradient: the run stops before the optimizer step (exit status 1)."""


def cli(fn, *args):
    """Run fn(*args); a RunError becomes its message on stderr and exit status 1, no traceback."""
    try:
        return fn(*args)
    except RunError as e:
        sys.stdout.flush()
        sys.exit(str(e))


# ----------------------------------------------------------------------------- JSON files

def append_log(path, record):
    """One strict-JSON line (data.append_jsonl: a single write + fsync)."""
    data.append_jsonl(path, data.finite_json(record))


def truncate_log(path, step):
    """Keep only the records of steps <= step (a resumed run rewrites what came after)."""
    if os.path.exists(path):
        keep = [r for r in data.read_jsonl(path, allow_torn_tail=True) if r.get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(data.finite_json(r), allow_nan=False) + "\n" for r in keep)
        os.replace(path + ".tmp", path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_modes(directory):
    """chmod the files of directory to 0666 & ~umask (safetensors' save_file writes 0600)."""
    mode = 0o666 & ~_umask()
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            os.chmod(p, mode)


# ----------------------------------------------------------------------------- the run directory

def check_out_dir(prog, out, inputs):
    """--out must not be (or lie inside) an input directory: the final export writes model files
    into out/ itself and would overwrite the model being trained from. inputs: {flag: path}."""
    o = os.path.realpath(out)
    for flag, path in inputs.items():
        if not path:
            continue
        p = os.path.realpath(path)
        if o == p or o.startswith(p.rstrip(os.sep) + os.sep):
            raise RunError(f"{prog}: --out {out} is {'' if o == p else 'inside '}{flag} {path}: "
                           f"the run would overwrite its own input; choose another --out")


def require(prog, path, what, how):
    """A missing input in one line: which file, and the command that makes it."""
    if not os.path.exists(path):
        raise RunError(f"{prog}: {path} not found ({what}): {how}")


def lock_run_dir(prog, out):
    """Take out/lock for this process. A live holder: RunError naming its pid. A dead holder
    (same host, pid gone): taken over. Released by release_lock (and at exit)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "lock")
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid_s, _, host = f.read().strip().partition(" ")
                pid = int(pid_s)
            except (OSError, ValueError):
                pid, host = None, ""                                     # torn / vanished: stale
            if pid is not None and (host != socket.gethostname() or _alive(pid)) and pid != os.getpid():
                where = f"pid {pid}" + (f" on {host}" if host != socket.gethostname() else "")
                raise RunError(f"{prog}: {out} is in use by {where} (lock file {path}); wait for it to "
                               f"finish, stop it, or use another --out") from None
            try:
                os.remove(path)                                          # a dead run's lock: take it over
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        import atexit
        atexit.register(release_lock, out)
        return path
    raise RunError(f"{prog}: could not take the lock {path} (another run keeps taking it)")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(out):
    path = os.path.join(out, "lock")
    try:
        with open(path) as f:
            if f.read().split(" ")[0] == str(os.getpid()):
                os.remove(path)
    except OSError:
        pass


def install_tokenizer(prog, src, out):
    """Copy the tokenizer files of src into out/tokenizer/ (atomically) and return that path.
    Every save copies the tokenizer from there."""
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise RunError(f"{prog}: {src} has no tokenizer.json (not a complete checkpoint)")
    dst = os.path.join(out, "tokenizer")
    if os.path.abspath(src) == os.path.abspath(dst):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def check_special_tokens(prog, path, tok):
    """config.json's vision token ids must be the tokenizer's: the model treats image_token_id
    positions as image slots and the sampler never draws image/video ids, so a wrong id there
    can, e.g., make a format tag like <reflection> impossible to sample."""
    mc = model_lib.read_config(path)
    want = dict(image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id,
                vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)
    for field, tid in want.items():
        got = getattr(mc, field)
        if got != tid:
            raise RunError(f"{prog}: {os.path.join(path, 'config.json')}: {field} = {got} is "
                           f"{tok.tok.id_to_token(got)!r} in the tokenizer, which has "
                           f"{tok.tok.id_to_token(tid)!r} at id {tid}; fix config.json")


def check_resume_config(prog, ckpt, old: dict, new: dict, free=()):
    """Resuming with another training config would silently mix two runs: refuse, naming fields.
    `free` fields (memory / logging knobs, the run length) may change."""
    changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k in old and k not in free and old[k] != v]
    if changed:
        raise RunError(f"{prog}: {ckpt} was written with another config ({'; '.join(changed)}); "
                       f"resume with the same settings or use a new --out")


def export_final(ckpt, out):
    """Copy the HF files of the final checkpoint into out/ itself, each atomically,
    model.safetensors last (its presence means the export is complete)."""
    names = [n for n in os.listdir(ckpt) if n.endswith((".json", ".safetensors", ".jinja"))
             and n not in ("optimizer.safetensors", "train_state.json") and not n.startswith("rng_rank")]
    for name in sorted(names, key=lambda n: n == "model.safetensors"):
        shutil.copyfile(os.path.join(ckpt, name), os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


# ----------------------------------------------------------------------------- training checkpoints

def is_complete(path):
    return os.path.isfile(os.path.join(path, "train_state.json"))


def saved_step(path):
    with open(os.path.join(path, "train_state.json")) as f:
        return int(json.load(f)["step"])


def recover(path):
    """Rank 0, before resuming: a kill between save's two renames leaves no `path` but a complete
    path.tmp (the new state) and path.old (the previous one): rename the newest complete one back.
    Deletes nothing. Returns True if `path` is a complete checkpoint afterwards."""
    if not os.path.exists(path):
        found = [p for p in (path + ".tmp", path + ".old") if is_complete(p)]
        if found:
            os.rename(max(found, key=saved_step), path)
    return is_complete(path)


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


def save(path, model, optimizer, step: int, extra: dict | None = None, tokenizer_dir: str | None = None,
         rng: bool = True):
    """Collective (all ranks call it). Writes the checkpoint directory `path` atomically (see the
    module docstring). `extra`: any JSON-able dict (config, data position). tokenizer_dir: copied
    in; it must hold tokenizer.json (a checkpoint without its tokenizer is not loadable)."""
    rank = tdist.get_rank() if dist.is_distributed() else 0
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    if rank == 0 and tokenizer_dir is not None and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise RunError(f"checkpoint.save: {tokenizer_dir} has no tokenizer.json; refusing to write "
                       f"{path} without its tokenizer")
    # 1. gather full weights and optimizer state to rank 0 (cpu); other ranks get empty dicts
    model_sd = get_model_state_dict(model, options=_full_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    # 2. rank 0 writes the weights (HF format) and the optimizer tensors
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
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    del model_sd, optim_sd
    dist.barrier()
    # 3. every rank adds its RNG states
    if rng:
        tensors, meta = _rng_state()
        save_file(tensors, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
        with open(os.path.join(tmp, f"rng_rank{rank}.json"), "w") as f:
            json.dump(meta, f)
    dist.barrier()
    # 4. rank 0: train_state.json last (= complete), modes, then publish with two renames
    if rank == 0:
        state = {"step": int(step), "world_size": tdist.get_world_size() if dist.is_distributed() else 1,
                 "param_groups": groups, "extra": extra or {}}
        data.write_json_atomic(os.path.join(tmp, "train_state.json"), state)
        fix_modes(tmp)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(path, model, optimizer, rng: bool = True) -> tuple[int, dict]:
    """Collective. Restores the optimizer state (into the possibly sharded `model`'s optimizer)
    and this rank's RNG states; returns (step, extra). The weights are NOT loaded here: build the
    model with model.from_pretrained(path) before sharding it."""
    rank = tdist.get_rank() if dist.is_distributed() else 0
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
        raise RunError(f"{path}/optimizer.safetensors: state for {len(unknown)} parameter(s) the model does not "
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


# ----------------------------------------------------------------------------- starting a run

def open_run(prog, out, inputs: dict, is_main: bool):
    """The start of sft.py and grpo.py, before anything is written: --out checked against the
    inputs ({flag: path}), out/ locked and an interrupted save recovered (rank 0), then every
    rank agrees. Returns (out/checkpoint, resume: whether it holds a complete state)."""
    check_out_dir(prog, out, inputs)
    ckpt = os.path.join(out, "checkpoint")
    if is_main:
        lock_run_dir(prog, out)
        recover(ckpt)
    dist.barrier()
    return ckpt, is_complete(ckpt)


def stop_non_finite(prog, step, what, ckpt, saved, is_main):
    """Log and raise NonFiniteLoss: the run stops before the optimizer step of `step`, naming the
    last good checkpoint (step `saved`, 0 = none yet), which is left untouched."""
    where = f"{os.path.abspath(ckpt)} (step {saved}), left untouched" if saved else "none: none was written yet"
    msg = (f"{prog}: step {step}: non-finite {what}. Stopped before the optimizer step. Last good checkpoint: "
           f"{where}. Lower --lr, check the data or the initial weights, or resume from it.")
    if is_main:
        append_log(os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl"), {"step": step, "error": msg})
    raise NonFiniteLoss(msg)


def start_log(out, resume: bool, step: int, config: dict):
    """Rank 0: a resumed run drops the log records after its checkpoint's step (the killed run's
    lost steps); a fresh run starts an empty log and writes out/run_config.json."""
    log_path = os.path.join(out, "log.jsonl")
    if resume:
        truncate_log(log_path, step)
    else:
        if os.path.exists(log_path):
            os.remove(log_path)
        data.write_json_atomic(os.path.join(out, "run_config.json"), config)
    return log_path
