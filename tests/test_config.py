"""config.parse_config: dataclass fields -> --a_b / --a-b flags, typed by annotation, bools with a
bare-flag form, help from the field comments, choices; and the three scripts that use it."""
import dataclasses

import pytest

from support import config
import grpo
import reflect_data
import sft


@dataclasses.dataclass
class Cfg:
    name: str = "x"              # the run's name, 100% made up
    n_steps: int = 3             # how many steps
    lr: float = 0.5
    use_cache: bool = False      # keep the cache
    on: bool = True
    mode: str = "a # not a comment"  # a | b
    long_one: int = 7            # first line
                                 # second line
    # section header, not part of long_one's help
    after: str = ""


def test_defaults_and_both_spellings():
    assert config.parse_config(Cfg, []) == Cfg()
    a = config.parse_config(Cfg, ["--n_steps", "5", "--use_cache", "1", "--long-one", "2"])
    b = config.parse_config(Cfg, ["--n-steps", "5", "--use-cache", "1", "--long_one", "2"])
    assert a == b == Cfg(n_steps=5, use_cache=True, long_one=2)


def test_types():
    c = config.parse_config(Cfg, ["--n_steps", "12", "--lr", "1e-3", "--name", "007", "--mode=b"])
    assert c.n_steps == 12 and type(c.n_steps) is int
    assert c.lr == 1e-3 and type(c.lr) is float
    assert c.name == "007" and c.mode == "b"  # strings stay strings
    for bad in (["--n_steps", "1.5"], ["--lr", "abc"]):
        with pytest.raises(SystemExit):
            config.parse_config(Cfg, bad)


@pytest.mark.parametrize("argv,want", [
    ([], False), (["--use_cache"], True), (["--use-cache"], True),
    (["--use_cache", "1"], True), (["--use_cache", "0"], False), (["--use_cache=0"], False),
    (["--use_cache", "TRUE"], True), (["--use_cache", "False"], False), (["--use_cache", "yes"], True),
    (["--use_cache", "No"], False), (["--use_cache", "on"], True), (["--use_cache", "OFF"], False),
    (["--use_cache", "--n_steps", "4"], True),  # bare flag followed by another flag
])
def test_bool_forms(argv, want):
    assert config.parse_config(Cfg, argv).use_cache is want


def test_bool_false_and_invalid(capsys):
    assert config.parse_config(Cfg, ["--on", "0"]).on is False and config.parse_config(Cfg, ["--on"]).on is True
    for bad in ("2", "maybe", ""):
        with pytest.raises(SystemExit):
            config.parse_config(Cfg, ["--use_cache", bad])
        assert "--use_cache" in capsys.readouterr().err  # the error names the flag


def test_help_from_comments(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(Cfg, ["--help"], description="demo tool")
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "demo tool" in out
    assert "the run's name, 100% made up (default: 'x')" in out   # % survives argparse's formatting
    assert "how many steps (default: 3)" in out and "keep the cache (default: False)" in out
    assert "a | b (default: 'a # not a comment')" in out          # '#' inside the string is not a comment
    assert "first line second line (default: 7)" in out           # indented continuation line joined
    assert "section header" not in out
    assert "--n_steps N_STEPS, --n-steps N_STEPS" in out


def test_choices():
    assert config.parse_config(Cfg, ["--mode", "b"], choices={"mode": ["a", "b"]}).mode == "b"
    with pytest.raises(SystemExit):
        config.parse_config(Cfg, ["--mode", "c"], choices={"mode": ["a", "b"]})


def test_string_annotations():
    ns = {}
    exec("from __future__ import annotations\nimport dataclasses\n"
         "@dataclasses.dataclass\nclass C:\n    k: int = 1\n    f: float = 0.0\n    b: bool = False\n", ns)
    c = config.parse_config(ns["C"], ["--k", "4", "--f", "2", "--b"])  # no source file: no help, still parses
    assert c.k == 4 and type(c.k) is int and c.f == 2.0 and type(c.f) is float and c.b is True


def test_scripts_use_it(capsys):
    assert sft.parse_args([]) == sft.SFTConfig()
    s = sft.parse_args(["--freeze-vision", "--micro-batch-size", "2", "--lr", "1e-4"])
    assert s.freeze_vision is True and s.micro_batch_size == 2 and s.lr == 1e-4
    g = grpo.parse_args(["--grad_checkpoint", "--freeze_vision", "off", "--beta", "0.04"])
    assert g.grad_checkpoint is True and g.freeze_vision is False and g.beta == 0.04
    with pytest.raises(ValueError, match="group_size"):  # grpo still runs check_config
        grpo.parse_args(["--group_size", "1"])
    r = reflect_data.parse_args(["--teacher", "local", "--teacher-max-tokens", "64"])
    assert r.teacher == "local" and r.teacher_max_tokens == 64
    with pytest.raises(SystemExit):
        reflect_data.parse_args(["--teacher", "gpt"])
    with pytest.raises(SystemExit):
        reflect_data.parse_args(["--help"])
    assert "openai: per request (default: 120.0)" in " ".join(capsys.readouterr().out.split())


@dataclasses.dataclass
class ListCfg:
    model: list[str] = dataclasses.field(default_factory=list)   # checkpoints
    metric: list[str] = dataclasses.field(default_factory=lambda: ["a:f"])
    steps: int = 3
    batch_size: int = 8


def test_list_fields():
    assert config.parse_config(ListCfg, []) == ListCfg()
    c = config.parse_config(ListCfg, ["--model", "x", "y", "--metric", "b:g", "--metric", "c:h", "--steps", "4"])
    assert c.model == ["x", "y"] and c.metric == ["b:g", "c:h"] and c.steps == 4  # given values replace the default
    assert ListCfg().metric == ["a:f"]  # the default list was not appended to


def test_abbreviations_refused(capsys):
    """`--step 3` must not silently set --steps (a typo would change the run)."""
    with pytest.raises(SystemExit):
        config.parse_config(ListCfg, ["--step", "3"])
    assert "unrecognized arguments: --step 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.parse_args(["--epoch", "2"])
    with pytest.raises(SystemExit):
        grpo.parse_args(["--step", "3"])


def test_minimum_named(capsys):
    assert config.parse_config(ListCfg, ["--batch_size", "1"], minimum={"batch_size": 1}).batch_size == 1
    for argv in (["--batch_size", "0"], ["--batch-size", "-4"]):
        with pytest.raises(SystemExit):
            config.parse_config(ListCfg, argv, minimum={"batch_size": 1})
        assert "argument --batch_size: must be >= 1" in capsys.readouterr().err


def test_load_function():
    assert config.load_function("os.path:join", "--metric") is __import__("os").path.join
    for spec, msg in (("nocolon", "expected MODULE:FUNCTION"), ("no_such_mod_xyz:f", "cannot import module"),
                      ("os:no_such_function", "has no function 'no_such_function'"), ("os:sep", "has no function 'sep'")):
        with pytest.raises(SystemExit, match=rf"--flag '{spec}': .*{msg}"):
            config.load_function(spec, "--flag")
