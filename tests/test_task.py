"""Tests for task.py: the procedural task and the rule-based teacher.

References are independent of task.py's own helpers: answers are recomputed by parsing the
question text and counting the scene here; images are checked by reading pixels."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from PIL import Image

from demo import task
from demo.task import TaskConfig, make_task, solution, teacher_reflection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
GREY = (123, 117, 104)  # background: Qwen's image mean (0.481, 0.458, 0.408) x 255, rounded
SMALL = TaskConfig(n_train=200, n_test=50, n_val=40, difficulty=3, seed=7)


def list_order(o):
    """Scene lists are sorted by colour (red green blue yellow), then shape (circle square triangle)."""
    return list(RGB).index(o["color"]), ["circle", "square", "triangle"].index(o["shape"])


def scene_text(objects):
    """'1 red circle, 2 blue square': the scene list a worked solution starts with."""
    return ", ".join(f"{i + 1} {o['color']} {o['shape']}" for i, o in enumerate(sorted(objects, key=list_order)))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("task"))
    train_path, test_path = make_task(out, SMALL)
    return out, read(train_path), read(test_path)


def recompute(question, objects):
    """Answer from the question text and the scene, written independently of task.py."""
    def n(color=None, shape=None):
        return sum(1 for o in objects if color in (None, o["color"]) and shape in (None, o["shape"]))
    sing = {"circles": "circle", "squares": "square", "triangles": "triangle"}
    if question == "How many shapes are there?":
        return n()
    if m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", question):
        return n(color=m[1]) - n(color=m[2])
    if m := re.fullmatch(r"How many (\w+) and (\w+) are there in total\?", question):
        return n(shape=sing[m[1]]) + n(shape=sing[m[2]])
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return n(color=m[1])
    if m := re.fullmatch(r"How many (\w+) (\w+) are there\?", question):
        return n(color=m[1], shape=sing[m[2]])
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return n(shape=sing[m[1]])
    raise AssertionError(f"unexpected question {question!r}")


def test_schema(small):
    out, train, test = small
    assert len(train) == SMALL.n_train and len(test) == SMALL.n_test
    from support.data import SYSTEM_PROMPT_SINGLE
    for r in train + test:
        for k in ("id", "messages", "answer", "question", "image", "kind", "difficulty", "scene"):
            assert k in r, k
        sys_m, user, asst = r["messages"]
        assert sys_m == {"role": "system", "content": SYSTEM_PROMPT_SINGLE}
        assert user["role"] == "user"
        assert user["content"] == [{"type": "image", "image": r["image"]}, {"type": "text", "text": r["question"]}]
        assert r["image"] == f"images/{r['id']}.png" and os.path.exists(os.path.join(out, r["image"]))
        assert asst["role"] == "assistant"
        m = re.fullmatch(r"<think>([^<]+)</think>\n<answer>(-?\d+)</answer>", asst["content"])
        assert m and m[2] == r["answer"], asst["content"]
        assert isinstance(r["answer"], str) and r["difficulty"] == SMALL.difficulty
    assert {r["kind"] for r in train} == set(task.KINDS)
    assert len({r["id"] for r in train + test}) == len(train) + len(test)


def test_answers_match_scene(small):
    _, train, test = small
    for r in train + test:
        assert int(r["answer"]) == recompute(r["question"], r["scene"]["objects"]) >= 0, r["id"]
    # difficulty 3 draws 5..10 objects
    assert all(5 <= len(r["scene"]["objects"]) <= 10 for r in train)
    assert len({r["answer"] for r in train}) >= 5  # not a constant answer


def test_images_render_scene(small):
    out, train, test = small
    for r in train[:40] + test[:10]:
        img = Image.open(os.path.join(out, r["image"])).convert("RGB")
        assert img.size == (112, 112)
        cells = {(o["row"], o["col"]): o for o in r["scene"]["objects"]}
        for row in range(4):
            for col in range(4):
                cx, cy = col * 28 + 14, row * 28 + 14
                o = cells.get((row, col))
                if o is None:
                    assert img.getpixel((cx, cy)) == GREY
                    continue
                c = RGB[o["color"]]
                assert img.getpixel((cx, cy)) == c
                # shape probes: top-left corner only in a square; lower-left in square and triangle
                tl, bl = img.getpixel((cx - 8, cy - 8)) == c, img.getpixel((cx - 8, cy + 7)) == c
                assert (tl, bl) == {"square": (True, True), "triangle": (False, True), "circle": (False, False)}[o["shape"]]
                # nothing spills into the neighbouring cells: cell border is background
                assert img.getpixel((col * 28, row * 28)) == GREY


def test_deterministic_and_disjoint(small, tmp_path):
    _, train, test = small
    train2, test2 = task.generate(SMALL)
    assert [json.dumps(r) for r in train] == [json.dumps(r) for r in train2]
    assert [json.dumps(r) for r in test] == [json.dumps(r) for r in test2]
    # a record depends only on (seed, split, index), not on how many are drawn
    fewer, _ = task.generate(replace(SMALL, n_train=20, n_test=5))
    assert [json.dumps(r) for r in fewer] == [json.dumps(r) for r in train[:20]]
    other, _ = task.generate(replace(SMALL, seed=8, n_train=20, n_test=5))
    assert [r["scene"] for r in other] != [r["scene"] for r in train[:20]]
    key = lambda r: json.dumps([r["scene"]["objects"], r["question"]])
    assert not {key(r) for r in train} & {key(r) for r in test}
    # disjoint even when collisions are likely (difficulty 1: 2..4 objects)
    tr, te = task.generate(TaskConfig(n_train=2000, n_test=300, difficulty=1, seed=0))
    assert not {key(r) for r in tr} & {key(r) for r in te} and len(te) == 300


def test_val_split(small, tmp_path):
    """val.jsonl: n_val records with their own ids and images, disjoint from train and test
    (as (scene, question) pairs), and adding it leaves train and test byte for byte as they were."""
    out, train, test = small
    val = read(os.path.join(out, "val.jsonl"))
    assert len(val) == SMALL.n_val == 40
    assert [r["id"] for r in val] == [f"val-{i:06d}" for i in range(40)]
    assert all(os.path.exists(os.path.join(out, r["image"])) for r in val)
    key = lambda r: json.dumps([r["scene"]["objects"], r["question"]])
    assert not {key(r) for r in val} & {key(r) for r in train + test} and len({key(r) for r in val}) == 40
    assert all(int(r["answer"]) == recompute(r["question"], r["scene"]["objects"]) for r in val)
    assert json.load(open(os.path.join(out, "manifest.json")))["n_val"] == 40
    # without a val split: no val.jsonl, and train / test identical to the files above
    bare = str(tmp_path / "bare")
    make_task(bare, replace(SMALL, n_val=0))
    assert not os.path.exists(os.path.join(bare, "val.jsonl"))
    for split in ("train", "test"):
        assert open(os.path.join(bare, f"{split}.jsonl")).read() == open(os.path.join(out, f"{split}.jsonl")).read()
    # a different task seed gives a different val split
    other = task.generate_val(replace(SMALL, seed=8), train, test)
    assert [r["scene"] for r in other] != [r["scene"] for r in val]


def test_solution_format_and_length(small):
    _, train, _ = small
    for r in train:
        assert solution(r) == r["messages"][2]["content"]
        # short: crude token count (format tags, words, numbers, punctuation): the scene list
        # (4 per object) and the question's list (3 per object it keeps) plus under 25
        n_tok = len(re.findall(r"</?[a-z]+>|\w+|[^\w\s]", solution(r)))
        assert n_tok < 7 * len(r["scene"]["objects"]) + 25, solution(r)
    r = next(r for r in train if r["kind"] == "count_color" and int(r["answer"]) >= 2
             and len({o["shape"] for o in r["scene"]["objects"] if o["color"] == r["question"].split()[2]}) >= 2)
    color = r["question"].split()[2]
    # the scene by colour (red green blue yellow) then shape (circle square triangle), not by place;
    # then the colour's shapes in the same fixed order
    scene = scene_text(r["scene"]["objects"])
    shapes = sorted((o["shape"] for o in r["scene"]["objects"] if o["color"] == color),
                    key=["circle", "square", "triangle"].index)
    listed = ", ".join(f"{i + 1} {s}" for i, s in enumerate(shapes))
    assert solution(r) == (f"<think>shapes: {scene}. {color}: {listed}. {color} {len(shapes)}</think>\n"
                           f"<answer>{r['answer']}</answer>")


def test_walk_solution():
    """TaskConfig(walk=True): the worked solution is the scene list, then the item-by-item check
    (checked against an independent walk below), then the counts; same scenes and answers."""
    cfg = replace(SMALL, n_train=60, n_test=5)
    plain, _ = task.generate(cfg)
    walked, _ = task.generate(replace(cfg, walk=True))
    for p, r in zip(plain, walked):
        assert (p["scene"], p["question"], p["answer"]) == (r["scene"], r["question"], r["answer"])
        gt = recompute(r["question"], r["scene"]["objects"])
        text = r["messages"][2]["content"]
        assert text == solution(r, walk=True) and text.endswith(f"</think>\n<answer>{gt}</answer>")
        scene = scene_text(r["scene"]["objects"])
        assert text.startswith(f"<think>shapes: {scene}. ")
        if r["kind"] == "count_all":
            assert text == f"<think>shapes: {scene}. shapes {gt}</think>\n<answer>{gt}</answer>"
        else:
            assert walk_items(text) == walk_items(teacher_reflection(r, "", "0"))
            if r["kind"] not in ("sum_shapes", "diff_colors"):
                assert re.search(r"\. [a-z ]+ (\d+)</think>", text)[1] == str(gt)


def think_of(text):
    return re.search(r"<think>(.*)</think>", text, re.S)[1]


def walk_items(refl):
    """'check: 1 red circle red 1, 2 blue square no.' -> [(colour, shape, mark)]."""
    body = re.search(r"check: (.*?)\.", refl)[1]
    return [re.fullmatch(r"\d+ (\w+) (\w+) (.+)", it.strip()).groups() for it in body.split(",")]


def test_teacher_checks_item_by_item(small):
    """The reflection walks every object once, in list order (colour, then shape), marks exactly
    the ones the question counts with a running count, and ends with the true answer."""
    _, train, _ = small
    seen = set()
    for r in train:
        gt = recompute(r["question"], r["scene"]["objects"])
        wrong = teacher_reflection(r, task.think_text(r), str(gt + 1))
        assert wrong.endswith(f"answer is {gt}, not {gt + 1}.")
        assert teacher_reflection(r, task.think_text(r), str(gt)).endswith(f"answer {gt} is right.")
        if r["kind"] == "count_all":
            assert wrong == f"shapes {gt}. answer is {gt}, not {gt + 1}."
            continue
        seen.add(r["kind"])
        items = walk_items(wrong)
        objs = sorted(r["scene"]["objects"], key=list_order)
        assert [(c, s) for c, s, _ in items] == [(o["color"], o["shape"]) for o in objs]
        final = {}
        for c, s, mark in items:
            if mark == "no":
                continue
            name, k = mark.rsplit(" ", 1)
            final[name] = final.get(name, 0) + 1
            assert int(k) == final[name], wrong                   # a running count
            assert name.split()[-1] in (c, s + "s"), wrong        # marks name the object's colour or shape
        # the marked counts give the answer: one name, or the two of a sum / difference
        vals = list(final.values()) + [0] * (2 - len(final))
        if r["kind"] in ("sum_shapes", "diff_colors"):
            counts = re.search(r"\. (\w+) (\d+), (\w+) (\d+)\. ", wrong).groups()
            a, b = int(counts[1]), int(counts[3])
            assert {counts[0]: a, counts[2]: b} == {k: final.get(k, 0) for k in (counts[0], counts[2])}
            assert (a + b if r["kind"] == "sum_shapes" else a - b) == gt
        else:
            assert vals[0] == gt and len(final) <= 1
    assert seen == {"count_color", "count_shape", "count_color_shape", "sum_shapes", "diff_colors"}


def test_teacher_names_misseen_scene_and_survives_malformed(small):
    _, train, _ = small
    r = next(r for r in train if r["kind"] == "count_color" and len(r["scene"]["objects"]) >= 3)
    think = task.think_text(r)
    listed = re.search(r"shapes: ([^.]*)\.", think)[1]
    dropped = re.sub(r"^\d+ ", "", listed.split(", ")[0])         # the attempt missed its first object
    misseen = think.replace(listed, ", ".join(listed.split(", ")[1:]))
    refl = teacher_reflection(r, misseen, r["answer"])
    assert refl.startswith(f"shapes: missed 1 {dropped}. check: ")
    assert teacher_reflection(r, think, r["answer"]).startswith("check: ")  # a right list is not mentioned
    # malformed attempts: still the whole check and the true answer, never a crash
    gt = r["answer"]
    for think, ans in [("", ""), ("<<garbage: , . 1+=", "x"), (None, None), ("shapes: 9 9 9", "\\boxed{7}")]:
        refl = teacher_reflection(r, think, ans)
        assert "check: " in refl and re.search(rf"answer is {gt}\b|answer {gt} is right", refl), refl


def test_make_task_idempotent_and_crash_safe(tmp_path, monkeypatch):
    out = str(tmp_path / "t")
    cfg = TaskConfig(n_train=30, n_test=10, seed=1)
    train_path, test_path = make_task(out, cfg)
    before = open(train_path).read(), os.path.getmtime(train_path)
    assert make_task(out, cfg) == (train_path, test_path)          # same config: nothing rewritten
    assert (open(train_path).read(), os.path.getmtime(train_path)) == before
    # a crash while writing the test split of a new config leaves no manifest behind
    real = task.write_atomic

    def crash(path, text):
        if path.endswith("test.jsonl"):
            raise KeyboardInterrupt("killed")
        real(path, text)
    monkeypatch.setattr(task, "write_atomic", crash)
    cfg2 = replace(cfg, n_train=40)
    with pytest.raises(KeyboardInterrupt):
        make_task(out, cfg2)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.setattr(task, "write_atomic", real)
    make_task(out, cfg2)                                           # rerun completes it
    assert len(read(train_path)) == 40 and len(read(test_path)) == 10
    assert json.load(open(os.path.join(out, "manifest.json")))["config"]["n_train"] == 40
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        make_task(str(tmp_path), TaskConfig(image_size=100))
    with pytest.raises(ValueError, match="difficulty"):
        make_task(str(tmp_path), TaskConfig(difficulty=9))


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    p = subprocess.run([sys.executable, "-m", "demo.task", "--out", out, "--n-train", "12", "--n-test", "4",
                        "--n-val", "3", "--difficulty", "1", "--image-size", "168"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    r = read(os.path.join(out, "train.jsonl"))
    assert len(r) == 12 and r[0]["scene"]["grid"] == 6
    assert len(read(os.path.join(out, "val.jsonl"))) == 3
    assert Image.open(os.path.join(out, r[0]["image"])).size == (168, 168)


def test_scene_metrics_whole_list_and_per_object_by_hand():
    """scene_list_ok is all-or-nothing; scene_objects counts the objects named right, extras against."""
    scene = dict(size=112, grid=4, objects=[dict(color="red", shape="circle", row=0, col=0),
                                            dict(color="blue", shape="square", row=0, col=1),
                                            dict(color="red", shape="triangle", row=1, col=0),
                                            dict(color="green", shape="square", row=2, col=2)])
    rec = dict(scene=scene)
    right = "<think>shapes: 1 red circle, 2 red triangle, 3 green square, 4 blue square. red 2</think>"
    one_off = "<think>shapes: 1 red circle, 2 red square, 3 green square, 4 blue square. red 2</think>"
    extra = "<think>shapes: 1 red circle, 2 red triangle, 3 green square, 4 blue square, 5 blue circle.</think>"
    assert task.scene_list_ok(rec, right) and task.scene_objects(rec, right) == 1.0
    assert not task.scene_list_ok(rec, one_off) and task.scene_objects(rec, one_off) == 3 / 4
    assert not task.scene_list_ok(rec, extra) and task.scene_objects(rec, extra) == 4 / 5
    assert task.scene_objects(rec, "no list at all") == 0.0
    assert task.scene_objects({"question": "not this task"}, right) is None
    # the answer the response's own list implies: "How many red shapes?" over its list
    rec.update(kind="count_color", params=dict(color="red"))
    assert task.answer_follows_list(rec, right + "\n<answer>2</answer>") is True
    assert task.answer_follows_list(rec, one_off + "\n<answer>2</answer>") is True     # its list has 2 red too
    assert task.answer_follows_list(rec, right + "\n<answer>3</answer>") is False
    assert task.answer_follows_list(rec, right) is False                                # no answer
    assert task.answer_follows_list(rec, "<think>shapes: 1 red blob.</think><answer>1</answer>") is None
    rec.update(kind="count_shape", params=dict(shape="square"))                         # last answer counts
    assert task.answer_follows_list(rec, one_off + "<answer>1</answer><reflection>x</reflection><answer>3</answer>")

