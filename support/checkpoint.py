"""
The run directory of sft.py and grpo.py: one layout, one set of rules for resuming.

    out/
      lock                 "pid host dev:inode" of the run using out/: a second run on out/ fails at
                           once naming that pid; a lock left by a dead pid (kill -9), or copied
                           along with the directory (another dev:inode), is taken over
      run_config.json      the run's config (fresh runs; also stored in checkpoint/train_state.json)
      log.jsonl            one strict-JSON line per step (non-finite numbers are written as null)
      tokenizer/           the run's tokenizer, installed once at the start: the source every save
                           copies from (never a checkpoint that a later save deletes)
      checkpoint/          the latest training state: the HF model (config.json, model.safetensors,
                           tokenizer.json, ...: what eval.py and transformers load) + train/ (the
                           sharded fp32 weights and optimizer state, see below) + rng_rank{r}.{safetensors,
                           json} + train_state.json (step, optimizer hyper-parameters, extra: the config)
      config.json, model.safetensors, tokenizer.json, ...   at the end: the final HF model (export),
                           loadable by transformers; model.safetensors is copied last

Saving checkpoint/ (save, collective): everything goes to checkpoint.tmp/, train_state.json last
(its presence = complete); then checkpoint/ -> checkpoint.old/, checkpoint.tmp/ -> checkpoint/,
checkpoint.old/ deleted. A kill at any moment leaves a complete checkpoint/, or, between the two
renames, a complete checkpoint.tmp/ and checkpoint.old/: recover() renames the newest complete one
back to checkpoint/ before anything else happens, so a rerun resumes instead of starting over.
checkpoint/train/ is torch.distributed.checkpoint (DCP) in its safetensors format: each rank writes
its own shards of the weights and the optimizer moments (shard-0000{r}-*.safetensors, the shard's
offsets in the file's header), so no rank ever holds the whole optimizer (~57 GB at 7B); a resume
reads each tensor's slice its rank owns now, so 8 ranks can resume what 4 wrote, or 1 what 2 wrote.
The HF export still gathers the weights (not the optimizer) on rank 0.
No pickle anywhere: tensors go to safetensors, scalars to JSON. Files are written with the
process umask (safetensors itself writes 0600; we chmod to what open() would have given).

Errors a user can fix (a missing input, a bad flag, a locked directory) are RunError: the scripts
print their one line (cli.main) instead of a traceback, and exit 1. A save that fails (a full disk)
removes its checkpoint.tmp/ and leaves the previous checkpoint/ as it was.
Resuming is keyed by content, not paths: train_state.json's extra holds a fingerprint of the
run's data files (bytes, sha256, records; data_fingerprint) and a resume on changed data is
refused, naming the file and what changed; the run directory's own path is nowhere compared, so a
run directory moved or copied elsewhere resumes.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import socket
import sys
import warnings

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from support import cli as cli_lib
from support import data
from support import dist
from support import hf_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


class RunError(ValueError):
    """A problem the user fixes (input, flag, directory): shown as one line, exit status 1."""


class NonFiniteLoss(RunError):
    """A NaN / inf loss or gradient: the run stops before the optimizer step (exit status 1)."""


def cli(fn, *args):
    """Run fn(*args) as a script's main: cli.main (one line per error the user can fix, exit 1)."""
    return cli_lib.main(os.path.basename(sys.argv[0]), lambda: fn(*args))


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
    """--out must not be, lie inside, or contain an input (symlinks resolved): the final export
    writes model files into out/ itself, and every save replaces out/checkpoint/ (an --init
    RUN/checkpoint with --out RUN). An existing file is no --out either. inputs: {flag: path}."""
    try:
        cli_lib.check_paths(prog, {"--out": out}, inputs)
    except ValueError as e:
        raise RunError(str(e)) from None


def require(prog, path, what, how):
    """A missing input in one line: which file, and the command that makes it."""
    if not os.path.exists(path):
        raise RunError(f"{prog}: {path} not found ({what}): {how}")


def lock_run_dir(prog, out):
    """Take out/lock for this process. A live holder: RunError naming its pid. A dead holder
    (same host, pid gone): taken over. Released by release_lock (and at exit)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "lock")
    me = f"{os.getpid()} {socket.gethostname()} {_dir_id(out)}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid_s, _, host = f.read().strip().partition(" ")
                host, _, dir_id = host.partition(" ")
                pid = int(pid_s)
            except (OSError, ValueError):
                pid, host, dir_id = None, "", ""                         # torn / vanished: stale
            copied = bool(dir_id) and dir_id != _dir_id(out)             # cp -r of a running run: not its lock
            if pid is not None and not copied and (host != socket.gethostname() or _alive(pid)) and pid != os.getpid():
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


def _dir_id(path):
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


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


def install_tokenizer(prog, src, out, max_pixels: int = 0):
    """Copy the tokenizer files of src into out/tokenizer/ (atomically) and return that path,
    with the run's preprocessor_config.json: src's image settings, max_pixels > 0 overriding
    (hf_checkpoint.image_config). Every save copies both from there, so transformers' processor loaded
    from any checkpoint or export of the run sizes images as the run did."""
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise RunError(f"{prog}: {src} has no tokenizer.json (not a complete checkpoint)")
    dst = os.path.join(out, "tokenizer")
    if os.path.abspath(src) == os.path.abspath(dst):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        hf_checkpoint.write_image_config(tmp, image_config(prog, src, max_pixels))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)                         # a full disk keeps no partial copy
        raise
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def image_config(prog, path, max_pixels: int = 0):
    """hf_checkpoint.image_config (the checkpoint's preprocessor_config.json, --max_pixels overriding),
    its errors as RunError."""
    try:
        return hf_checkpoint.image_config(path, max_pixels)
    except ValueError as e:
        raise RunError(f"{prog}: {e}") from None


def check_special_tokens(prog, path, tok, mc):
    """config.json's vision token ids (mc: its model.ModelConfig) must be the tokenizer's: the
    model treats image_token_id positions as image slots and the sampler never draws image/video
    ids, so a wrong id there can, e.g., make a format tag like <reflection> impossible to sample."""
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
             and os.path.isfile(os.path.join(ckpt, n)) and n != "train_state.json" and not n.startswith("rng_rank")]
    for name in sorted(names, key=lambda n: n == "model.safetensors"):
        tmp = os.path.join(out, name + ".tmp")
        try:
            shutil.copyfile(os.path.join(ckpt, name), tmp)
        except BaseException:
            if os.path.exists(tmp):                                    # a full disk keeps no partial file
                os.remove(tmp)
            raise
        os.replace(tmp, os.path.join(out, name))


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


TRAIN_DIR = "train"   # checkpoint/train/: the DCP shards


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _sharded_state(model, optimizer) -> dict:
    """{"model": weights, "optim": {fqn: {exp_avg, exp_avg_sq, step}}}: this rank's shards (DTensors
    under FSDP2, whole tensors in a plain single process). A tied lm_head.weight is left out (it is
    embed_tokens.weight; safetensors refuses two names for one storage). A never-stepped optimizer
    contributes nothing: get_optimizer_state_dict would give it state with a zero-gradient step,
    and the next real step would then bias-correct as step 2."""
    msd = get_model_state_dict(model)
    if model.config.text.tie_word_embeddings:
        msd.pop("lm_head.weight", None)
    return {"model": msd, "optim": get_optimizer_state_dict(model, optimizer)["state"] if optimizer.state else {}}


def _no_dist():
    return not (tdist.is_available() and tdist.is_initialized())


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns on every call without a process group that it assumes a single process: that is
    what we mean here (a plain one-process run), so the warning is silenced, only inside DCP calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
    try:
        _save(path, tmp, rank, model, optimizer, step, extra, tokenizer_dir, rng)
    except BaseException as e:
        if rank == 0:                                                  # a full disk keeps no partial checkpoint.tmp/
            shutil.rmtree(tmp, ignore_errors=True)
        os_error = next((x for x in cli_lib._chain(e) if isinstance(x, OSError)), None)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not (os_error or cli_lib.is_disk_full(e)):
            raise
        why = cli_lib.disk_full_message(tmp, e) if cli_lib.is_disk_full(e) else cli_lib.describe(os_error)
        kept = f"the previous checkpoint {path} (step {saved_step(path)}) is kept" if is_complete(path) else \
            "no earlier checkpoint exists"
        raise RunError(f"saving step {step}: {why}; {kept}") from e


def _save(path, tmp, rank, model, optimizer, step, extra, tokenizer_dir, rng):
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    # 1. every rank writes its shards of the fp32 weights and the optimizer state (DCP, collective)
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    with _single_process_dcp():
        dcp.save(_sharded_state(model, optimizer), no_dist=_no_dist(),
                 storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, TRAIN_DIR), save_distributed=True))
    # 2. the HF model: full weights gathered to rank 0 (cpu), other ranks get an empty dict
    model_sd = get_model_state_dict(model, options=_full_options())
    if rank == 0:
        hf_checkpoint.write_pretrained(model, tmp, tokenizer_dir=tokenizer_dir, state_dict=model_sd)
    del model_sd
    # 3. every rank adds its RNG states
    if rng:
        tensors, meta = _rng_state()
        save_file(tensors, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
        with open(os.path.join(tmp, f"rng_rank{rank}.json"), "w") as f:
            json.dump(meta, f, allow_nan=False)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    dist.barrier()
    # 4. rank 0: train_state.json last (= complete), modes, then publish with two renames
    if rank == 0:
        state = {"step": int(step), "world_size": tdist.get_world_size() if dist.is_distributed() else 1,
                 "param_groups": groups, "extra": extra or {}}
        data.write_json_atomic(os.path.join(tmp, "train_state.json"), state)
        fix_modes(tmp)
        fix_modes(os.path.join(tmp, TRAIN_DIR))
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _saved_keys(train_dir) -> set:
    """The tensor names in the DCP shards (their safetensors headers: no tensor is read)."""
    from safetensors import safe_open
    keys = set()
    for name in os.listdir(train_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(train_dir, name), framework="pt") as f:
                keys.update(f.keys())
    return keys


def load(path, model, optimizer, rng: bool = True) -> tuple[int, dict]:
    """Collective. Restores the fp32 weights and the optimizer state into the (possibly sharded)
    `model` and its `optimizer`, each rank reading only its own slices from checkpoint/train/
    (written by any number of ranks), and this rank's RNG states; returns (step, extra)."""
    rank = tdist.get_rank() if dist.is_distributed() else 0
    where = os.path.join(path, "train_state.json")
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no train_state.json, not a training checkpoint")
    with open(where) as f:
        state = json.load(f)
    train_dir = os.path.join(path, TRAIN_DIR)
    if not os.path.isdir(train_dir):
        raise RunError(f"{path}: no {TRAIN_DIR}/ (sharded training state); a checkpoint of an older version "
                       f"(optimizer.safetensors) cannot be resumed: start from its HF model with a new --out")
    saved = _saved_keys(train_dir)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted({k[len("optim."):].rsplit(".", 1)[0] for k in saved if k.startswith("optim.")} - trained)
    if unknown:
        raise RunError(f"{train_dir}: optimizer state for {len(unknown)} parameter(s) the model does not "
                       f"train, first {unknown[0]!r} (different model, or --freeze_vision changed?)")
    # destinations: this rank's shards. A fresh optimizer gets placeholder state to read into;
    # parameters that had no state when saved (never had a gradient) get none back.
    msd = get_model_state_dict(model)
    if model.config.text.tie_word_embeddings:
        msd.pop("lm_head.weight", None)
    missing = sorted(f"model.{k}" for k in msd if f"model.{k}" not in saved)
    if missing:
        raise RunError(f"{train_dir}: no weights for {len(missing)} tensor(s), first {missing[0][6:]!r} (another model?)")
    optim = get_optimizer_state_dict(model, optimizer)["state"]
    optim = {fqn: {k: v for k, v in st.items() if f"optim.{fqn}.{k}" in saved} for fqn, st in optim.items()}
    optim = {fqn: st for fqn, st in optim.items() if st}
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    with _single_process_dcp():
        dcp.load({"model": msd, "optim": optim}, storage_reader=HuggingFaceStorageReader(train_dir), no_dist=_no_dist())
    if model.config.text.tie_word_embeddings:
        msd["lm_head.weight"] = msd["embed_tokens.weight"]
    set_model_state_dict(model, msd)
    groups = [dict(g, params=list(pg["params"])) for g, pg in
              zip(state["param_groups"], get_optimizer_state_dict(model, optimizer)["param_groups"])]
    for g in groups:
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    # load_state_dict replaces the whole state: a parameter with none saved gets none, as when saved
    set_optimizer_state_dict(model, optimizer, {"state": optim, "param_groups": groups},
                             options=StateDictOptions(strict=False))
    rng_file = os.path.join(path, f"rng_rank{rank}.safetensors")
    if rng and os.path.exists(rng_file):
        with open(os.path.join(path, f"rng_rank{rank}.json")) as f:
            _set_rng_state(load_file(rng_file), json.load(f))
    return state["step"], state["extra"]


def read_optimizer_state(path) -> dict:
    """{"fqn/name": full tensor} of checkpoint `path`'s optimizer state (the shards of every rank
    put together), for inspection and tests; any process, no process group needed."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    reader = HuggingFaceStorageReader(os.path.join(path, TRAIN_DIR))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("optim.")}
    with _single_process_dcp():
        dcp.load(out, storage_reader=reader, no_dist=True)
    return {"/".join(k[len("optim."):].rsplit(".", 1)): v for k, v in out.items()}


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


def data_fingerprint(files: dict, records: dict) -> dict:
    """{flag: {"path", "bytes", "sha256", "records"}} of the run's data files ({flag: path}) and
    their record counts ({flag: n}): stored in every checkpoint, compared on resume."""
    out = {}
    for flag, path in files.items():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[flag] = {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest(),
                     "records": records.get(flag)}
    return out


def check_resume_data(prog, ckpt, old: dict, new: dict):
    """Resuming on other data would silently mix two runs (the step order is a function of the
    records): refuse, naming the file and what changed. A checkpoint without a fingerprint passes."""
    for flag, now in new.items():
        then = (old or {}).get(flag)
        if then and then.get("sha256") != now["sha256"]:
            what = [f"{k} {then.get(k)} -> {now[k]}" for k in ("records", "bytes") if then.get(k) != now[k]]
            what.append(f"sha256 {then.get('sha256', '?')[:12]} -> {now['sha256'][:12]}")
            raise RunError(f"{prog}: {flag} {now['path']} changed since {ckpt} was written ({', '.join(what)}); "
                           f"resume with the data it was trained on, or start a new --out")


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
