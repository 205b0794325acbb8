"""
The edge every script shares with its user (sft.py, grpo.py, eval.py, reflect_data.py):

    if __name__ == "__main__":
        cli.main(PROG, lambda: train(parse_args()))

1. main: an error the user can fix is one line `script.py: message` on stderr and exit status 1,
   never a traceback: ValueError (the project's RunError and the data errors that name file:line),
   OSError (the path; on a full disk also the free space there), and any error raised inside
   `reading` (a file that will not load, named). Preempted (SIGTERM / SIGINT, training.py) prints
   where the checkpoint is and exits 128 + the signal number (143 / 130: what schedulers read as
   "terminated"); a Ctrl-C elsewhere (KeyboardInterrupt) exits 130 in one line. Anything else is a bug and keeps its traceback; SRPO_DEBUG=1 shows the traceback
   of every error.
2. check_paths: outputs never touch inputs. --out equal to, inside, or containing an input (after
   resolving symlinks) is refused before anything is written: a save into the model being trained
   from, or an input under the run directory that a save replaces, would destroy it.
3. reading: errors while loading a checkpoint or tokenizer name the file (tokenizers and
   safetensors raise bare parser errors such as "EOF while parsing ... line 243").
No torch here: eval.py imports this before deciding on a device.
"""
import contextlib
import errno
import json
import os
import sys
import traceback

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class Preempted(Exception):
    """SIGTERM / SIGINT stopped a training run after a checkpoint was written: exit 128 + signum."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- 1. one line per error

def _chain(e):
    """e, its causes / contexts, and the per-rank failures of a torch.distributed.checkpoint error."""
    seen, todo = [], [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is s for s in seen):
            continue
        seen.append(x)
        todo += [x.__cause__, x.__context__]
        for failure in (getattr(x, "failures", None) or {}).values():   # CheckpointException: {rank: (exc, tb)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return seen


def is_disk_full(e) -> bool:
    return any((isinstance(x, OSError) and x.errno in DISK_FULL) or any(t in str(x) for t in DISK_FULL_TEXT)
               for x in _chain(e))


def free_space(path) -> str:
    """'1.2 GB free' on the file system holding path (its nearest existing parent)."""
    import shutil
    p = os.path.abspath(path or ".")
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return (f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}") + " free"
        free /= 1024


def disk_full_message(path, e=None) -> str:
    """'no space left on the device writing PATH (N MB free there): free some space, then rerun'."""
    name = next((x.filename2 or x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None) \
        if e else None                                                 # shutil's copies: filename2 is the target
    where = name or path
    return (f"no space left on the device writing {where} ({free_space(where)} there): free some space "
            f"or use another --out, then rerun the same command")


def message(prog, e) -> str:
    """The one line shown for e, prefixed with prog once."""
    text = describe(e)
    return text if text.startswith(prog + ":") else f"{prog}: {text}"


def describe(e) -> str:
    """e as one line of text: a full disk with the free space, an OSError with its path."""
    if is_disk_full(e) and "no space left on the device" not in str(e):   # (not already checkpoint.save's line)
        text = disk_full_message(getattr(e, "filename", None) or _file_in_traceback(e, exists=False) or "", e)
    elif isinstance(e, OSError) and e.filename and e.strerror:
        other = f" -> {e.filename2}" if e.filename2 else ""
        text = f"{e.filename}{other}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
        f = _file_in_traceback(e) if isinstance(e, (UnicodeError, OSError)) and os.sep not in text else None
        text = f"{f}: {text}" if f else text
    return " ".join(text.split("\n")) if text.count("\n") < 3 else text.strip()


def _file_in_traceback(e, exists=True):
    """The file being read or written where e was raised (an open file object, or a PIL image's
    filename, in the innermost frame that has one), for errors whose message names none (a bad
    UTF-8 byte; a full disk at flush). exists=False: also a file removed since (a cleaned-up tmp)."""
    tb, frames = e.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for v in frame.f_locals.values():
            name = getattr(v, "name", None) if hasattr(v, "read") else getattr(v, "filename", None)
            if isinstance(name, str) and (os.path.isfile(name) or not exists and os.path.isdir(os.path.dirname(name) or ".")):
                return name
    return None


def main(prog, fn):
    """Run fn() as a script's main (see the module docstring); returns its result."""
    try:
        return fn()
    except Preempted as e:
        _leave(str(e), 128 + e.signum, quiet=os.environ.get("RANK", "0") != "0")
    except KeyboardInterrupt:                                          # Ctrl-C outside a training loop
        if os.environ.get("SRPO_DEBUG") == "1":
            traceback.print_exc()
        _leave(f"{prog}: interrupted (what was written so far is kept; rerun the same command to go on)", 130,
               quiet=os.environ.get("RANK", "0") != "0")
    except (ValueError, OSError) as e:
        if os.environ.get("SRPO_DEBUG") == "1":
            traceback.print_exc()
        _leave(message(prog, e), 1)


def _leave(text, status, quiet=False):
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()                                                    # the message starts a line of its own
    sys.stdout.flush()
    if not quiet:
        print(text, file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:     # torchrun worker: skip gloo's teardown (dist.exit_worker)
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


# ----------------------------------------------------------------------------- 2. outputs never touch inputs

def check_paths(prog, outputs: dict, inputs, out_dirs=("--out",)):
    """outputs: {flag: path}, inputs: {flag: path} or [(flag, path)] ("" / None skipped). Refuses, naming both flags, an output
    that is, lies inside, or contains an input, symlinks resolved; and an output in out_dirs
    (a run directory) that names an existing file."""
    for oflag, out in outputs.items():
        if not out:
            continue
        if oflag in out_dirs and os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{prog}: {oflag} {out} is an existing file, not a directory; choose a directory")
        o = os.path.realpath(out)
        for iflag, path in (inputs.items() if isinstance(inputs, dict) else inputs):
            if not path:
                continue
            p = os.path.realpath(path)
            if o == p:
                how = "is"
            elif o.startswith(p.rstrip(os.sep) + os.sep):
                how = "is inside"
            elif p.startswith(o.rstrip(os.sep) + os.sep):
                how = "contains"
            else:
                continue
            raise ValueError(f"{prog}: {oflag} {out} {how} {iflag} {path}: the run would overwrite its own "
                             f"input; choose another {oflag} (or copy the input elsewhere)")


# ----------------------------------------------------------------------------- 3. load errors name the file

CHECKPOINT_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "train_state.json", "model.safetensors.index.json")


def broken_file(path):
    """The first file of checkpoint directory `path` that does not parse ('FILE: why'), or None:
    its JSON files, then the headers of its safetensors files."""
    if not os.path.isdir(path):
        return None
    for name in CHECKPOINT_JSON:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    json.load(fh)
            except ValueError as e:
                where = f"line {e.lineno} column {e.colno}: " if isinstance(e, json.JSONDecodeError) else ""
                return f"{f}: {where}not valid JSON ({getattr(e, 'msg', e)}; truncated or corrupted?)"
    for root in (path, os.path.join(path, "train")):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if name.endswith(".safetensors"):
                try:
                    from safetensors import safe_open
                    with safe_open(os.path.join(root, name), framework="pt") as fh:
                        fh.keys()
                except Exception as e:   # SafetensorError: a truncated or corrupted file
                    return f"{os.path.join(root, name)}: not a readable safetensors file ({e})"
    return None


@contextlib.contextmanager
def reading(prog, flag, path):
    """Loading from `path` (the value of `flag`): an error raised inside becomes a ValueError that
    names the broken file (broken_file) or, failing that, path; errors that already name a file
    (ValueError, OSError) pass unchanged."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, Preempted):
        raise
    except (ValueError, OSError) as e:
        bad = None if path and path in str(e) else broken_file(path)
        if bad:
            raise ValueError(f"{prog}: {flag} {path}: {bad}") from e
        raise
    except BaseException as e:   # tokenizers / safetensors / torch.distributed.checkpoint (a BaseException) errors
        bad = broken_file(path)
        raise ValueError(f"{prog}: {flag} {path}: " + (bad or f"cannot load: {type(e).__name__}: {e}")) from e
