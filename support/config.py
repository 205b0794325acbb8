"""
Command line -> dataclass config, shared by sft.py, grpo.py, reflect_data.py and eval.py.

    cfg = parse_config(SFTConfig, argv, description="...", choices={"teacher": ["rule", "openai"]},
                       minimum={"batch_size": 1, "limit": 0})

Every field becomes a flag spelled both --a_b and --a-b, typed by its annotation (int, float,
str, list[str]; string annotations from `from __future__ import annotations` work too). Bools:
`--flag` alone is True, else `--flag 1|0|true|false|yes|no|on|off` (any case); other values are
an argparse error naming the flag. A list[str] field takes one or more values and may be
repeated (`--metric a:f --metric b:g` == `--metric a:f b:g`); given values replace its default.
`minimum` bounds numeric flags from below (`--batch_size 0` is an error naming the flag).
Abbreviations are refused: `--step 3` is not `--steps 3` (a typo must not silently set another
field). --help shows each field's trailing `# comment` in the dataclass source (plus
comment-only lines indented under it) and its default.
"""
import argparse
import importlib
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import MISSING, fields

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def str2bool(s: str) -> bool:
    if s.lower() in TRUE + FALSE:
        return s.lower() in TRUE
    raise argparse.ArgumentTypeError(f"expected one of {'|'.join(TRUE + FALSE)}, got {s!r}")


def field_comments(cls) -> dict:
    """{field: its trailing # comment (+ comment-only lines indented deeper below it)}."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (e.g. defined in a REPL): no help text
        return {}
    comments = {t.start[0]: t.string.lstrip("#").strip()  # line number -> comment, string-literal safe
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    out, name, indent = {}, None, 0
    for i, line in enumerate(src.splitlines(), start=1):
        m = re.match(r"(\s+)(\w+)\s*:", line)
        if m:  # a field line
            name, indent = m.group(2), len(m.group(1))
            out[name] = comments.get(i, "")
        elif name and i in comments and line.strip().startswith("#") and len(line) - len(line.lstrip()) > indent:
            out[name] = (out[name] + " " + comments[i]).strip()  # continuation of the field's comment
        else:
            name = None
    return out


def is_str_list(annotation):
    return typing.get_origin(annotation) is list and typing.get_args(annotation) in ((str,), ())


def parse_config(cls, argv=None, description="", choices=None, minimum=None):
    """Parse argv (default sys.argv[1:]) into an instance of dataclass `cls`."""
    types, helps, choices, minimum = typing.get_type_hints(cls), field_comments(cls), choices or {}, minimum or {}
    ap = argparse.ArgumentParser(description=description, allow_abbrev=False)
    lists = []
    for f in fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        required = f.default is MISSING and f.default_factory is MISSING  # a field without a default
        default = None if required else f.default if f.default is not MISSING else f.default_factory()
        kw = dict(dest=f.name, default=default, required=required, choices=choices.get(f.name),
                  help=(helps.get(f.name, "") + f" (default: {default!r})").lstrip().replace("%", "%%"))
        if f.name in minimum:
            kw["help"] += f" (at least {minimum[f.name]})"
        if types[f.name] is bool:
            ap.add_argument(*names, type=str2bool, nargs="?", const=True, metavar="0|1", **kw)
        elif is_str_list(types[f.name]):
            # argparse's "extend" appends to the default list: start from None, fill in the default below
            lists.append((f.name, default))
            ap.add_argument(*names, type=str, nargs="+", action="extend", **{**kw, "default": None})
        else:
            ap.add_argument(*names, type=types[f.name], **kw)
    args = vars(ap.parse_args(argv))
    for name, default in lists:
        if args[name] is None:
            args[name] = list(default) if default is not None else None
    for name, low in minimum.items():
        if args[name] is not None and args[name] < low:
            ap.error(f"argument --{name}: must be >= {low}, got {args[name]}")
    return cls(**args)


def load_function(spec, flag):
    """'MODULE:FUNCTION' (given on the command line) -> the function, imported by name. This is how
    task-specific code (a metric, a teacher) reaches general scripts without them importing it.
    Errors name the flag."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SystemExit(f"{flag} {spec!r}: expected MODULE:FUNCTION, e.g. demo.task:scene_list_ok")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"{flag} {spec!r}: cannot import module {module!r} ({e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise SystemExit(f"{flag} {spec!r}: module {module!r} has no function {name!r}")
    return fn
