"""The layout a reader relies on: the seven stage files and one demo command at the top level,
imports pointing one way (stage files -> support/, demo -> stages), short stage functions, and
comments that state lasting facts (no dates, run times of day or tracker numbers)."""
import ast
import glob
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("model", "sampler", "reward", "reflect_data", "sft", "grpo", "eval")
# the support modules that use a stage: the memory plan builds model.py's network (python -m
# support.memory), the HTML report re-scores every response with reward.py (each component shown)
SUPPORT_KNOWS_THE_MODEL = {"memory": {"model"}, "report": {"reward"}}


def imports(path):
    tree = ast.parse(open(path).read())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            mods.add(n.module)
            mods |= {f"{n.module}.{a.name}" for a in n.names}   # from support import data -> support.data
    return mods


def test_top_level_is_the_seven_stages_and_the_demo_command():
    top = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert top == set(STAGES) | {"pipeline"}, sorted(top)
    assert os.path.isfile(os.path.join(ROOT, "support", "__init__.py"))
    assert os.path.isfile(os.path.join(ROOT, "demo", "task.py"))


def test_imports_point_one_way():
    for path in glob.glob(os.path.join(ROOT, "support", "*.py")):
        name = os.path.basename(path)[:-3]
        stage_imports = {m for m in imports(path) if m.split(".")[0] in STAGES + ("pipeline",)}
        assert stage_imports <= SUPPORT_KNOWS_THE_MODEL.get(name, set()), (path, stage_imports)
        assert not any(m.split(".")[0] == "demo" for m in imports(path)), path
    for name in STAGES:
        mods = imports(os.path.join(ROOT, f"{name}.py"))
        assert not any(m.split(".")[0] in ("demo", "task", "pipeline") for m in mods), (name, mods)


def test_stage_functions_fit_on_a_screen():
    for name in STAGES:
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert n.end_lineno - n.lineno + 1 <= 80, f"{name}.py:{n.lineno} {n.name}"


def prose(path):
    """(line, text) of every comment and docstring of a Python file."""
    src = open(path).read()
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
           if t.type == tokenize.COMMENT]
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(n):
            out.append((getattr(n, "lineno", 1), ast.get_docstring(n)))
    return out


def test_comments_state_lasting_facts():
    month = r"(Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    bad = re.compile(r"\b\d{1,2} " + month + r"\b|" + r"\b" + month + r" \d{1,2}\b|\d\d:\d\d UTC|"
                     r"\b20[0-9]{2}-[01][0-9]-[0-3][0-9]\b|\bissues? #?\d+|" + "SRPO" + r"\.md|" + "\\.\\./" + "shared")
    files = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) if "/." not in p]
    assert len(files) > 30
    for path in files:
        for line, text in prose(path):
            m = bad.search(text)
            assert m is None, f"{os.path.relpath(path, ROOT)}:{line}: {m.group(0)!r}"


def test_readme_is_short():
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 200
