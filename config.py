"""
Command line -> dataclass config, shared by sft.py, grpo.py and reflect_data.py.

    cfg = parse_config(SFTConfig, argv, description="...", choices={"teacher": ["rule", "openai"]})

Every field becomes a flag spelled both --a_b and --a-b, typed by its annotation (int, float,
str; string annotations from `from __future__ import annotations` work too). Bools: `--flag`
alone is True, else `--flag 1|0|true|false|yes|no|on|off` (any case); other values are an
argparse error naming the flag. --help shows each field's trailing `# comment` in the dataclass
source (plus comment-only lines indented under it) and its default.
"""
import argparse
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


def parse_config(cls, argv=None, description="", choices=None):
    """Parse argv (default sys.argv[1:]) into an instance of dataclass `cls`."""
    types, helps, choices = typing.get_type_hints(cls), field_comments(cls), choices or {}
    ap = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        required = f.default is MISSING and f.default_factory is MISSING  # a field without a default
        default = None if required else f.default if f.default is not MISSING else f.default_factory()
        kw = dict(dest=f.name, default=default, required=required, choices=choices.get(f.name),
                  help=(helps.get(f.name, "").replace("%", "%%") + " (default: %(default)r)").lstrip())
        if types[f.name] is bool:
            ap.add_argument(*names, type=str2bool, nargs="?", const=True, metavar="0|1", **kw)
        else:
            ap.add_argument(*names, type=types[f.name], **kw)
    return cls(**vars(ap.parse_args(argv)))
