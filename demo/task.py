"""
The built-in task: a procedurally generated visual counting / arithmetic world.

An image is a grid of cells (image_size // 28 per side, 4x4 at the default 112 px). Each cell
is exactly one 28x28 px region, i.e. one merged Qwen2.5-VL visual token (14 px patches, 2x2
merge), and holds at most one shape: a colour (red green blue yellow) x a kind of shape
(circle square triangle). The question asks for an integer that needs the image and a few
steps of reasoning:

    count_all          How many shapes are there?
    count_color        How many red shapes are there?
    count_shape        How many circles are there?
    count_color_shape  How many blue squares are there?
    sum_shapes         How many circles and triangles are there in total?
    diff_colors        How many more red shapes than blue shapes are there?

The worked solution first lists the whole scene (perceive), then reasons over that list only
(select, count, add). It is short and regular, so a tiny model can imitate it and its errors
come from perception / counting, which a reflection can catch:

    <think>shapes: 1 red circle, 2 red square, 3 green square, 4 blue triangle. red: 1 circle,
    2 square. red 2</think>
    <answer>2</answer>

Lists follow a fixed order (colours as in COLORS, shapes as in SHAPES), never the place in the
image. Why the scene list, the fixed order and the grey background: a tiny model trained from
scratch learns "what is in the image" (one question for every image) long before it learns to
look up "the red ones" (a query that depends on the text), and with the question-specific
lookup alone it never used the image at all in a 5-minute run. The list turns every question
into the easy perception plus text-only reasoning. The background is the image processor's
mean colour, so an empty cell is an all-zero input: with a white background the vision tower
inflated that constant and its output stopped varying between images.

The difficulty knob sets the number of objects per image. Every record is drawn from its own
seed (seed, split, index), so a record does not depend on how many others are generated; test
records that repeat a train (scene, question) pair are skipped, so the splits are disjoint.

teacher_reflection() is the rule-based teacher of stage-1 reflection data. It knows the true
scene, and its reflection is a check the policy can learn to run on its own: walk the scene list
one item at a time, mark what the question counts with a running count, then compare with the
first answer. The second attempt is just the counts the check found (count_text):

    <reflection>check: 1 red circle red 1, 2 red square red 2, 3 green square no, 4 blue
    triangle no. red 2. answer is 2, not 3.</reflection>
    <think>red 2</think>
    <answer>2</answer>

Why a walk: the base model lists the scene right 9 times in 10 but errs picking "the red ones"
out of its list (a filtered copy); one item at a time, each step is a local yes/no.

    python -m demo.task --out runs/task --n-train 16000 --n-test 300 --n-val 300 --difficulty 2

Splits: train, test and val (validation: choose settings on it or on train, never on test).
Test and val records come from their own seeds and skip any (scene, question) of an earlier
split, so the three are disjoint; val is drawn last, so adding it changed neither train nor test.
"""
import argparse
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw
from tqdm import tqdm

from support.data import SYSTEM_PROMPT_SINGLE

CELL = 28  # px per grid cell = one merged visual token (14 px patch x 2x2 merge)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
BACKGROUND = (123, 117, 104)  # = the image processor's mean colour: an empty patch normalises to all zeros
KINDS = ("count_all", "count_color", "count_shape", "count_color_shape", "sum_shapes", "diff_colors")
# difficulty -> (min, max) number of objects in the image
N_OBJECTS = {1: (2, 4), 2: (3, 7), 3: (5, 10), 4: (7, 13)}


@dataclass
class TaskConfig:
    n_train: int = 16000
    n_test: int = 300
    n_val: int = 300           # validation split (val.jsonl): choose settings on it, never on test
    difficulty: int = 2        # 1..4: number of objects per image, see N_OBJECTS
    seed: int = 0
    image_size: int = 112      # multiple of 28: data.preprocess_image keeps it as is
    kinds: tuple = field(default=KINDS)
    walk: bool = False         # worked solutions check the scene list item by item (think_text)


# -----------------------------------------------------------------------------
# scenes, questions, answers

def random_scene(rng, difficulty, image_size):
    """Scene: dict(size, grid, objects=[dict(color, shape, row, col)] in reading order)."""
    grid = image_size // CELL
    lo, hi = N_OBJECTS[difficulty]
    n = rng.randint(lo, min(hi, grid * grid))
    cells = sorted(rng.sample(range(grid * grid), n))
    objects = [dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), row=c // grid, col=c % grid)
               for c in cells]
    return dict(size=image_size, grid=grid, objects=objects)


def random_question(rng, scene, kinds):
    """Pick a question kind and its parameters. Returns (kind, params)."""
    kind = rng.choice(kinds)
    colors, shapes = list(COLORS), list(SHAPES)
    if scene["objects"] and rng.random() < 0.7:  # mostly ask about what is there: fewer zero answers
        o = rng.choice(scene["objects"])
        colors, shapes = [o["color"]], [o["shape"]]
    if kind == "count_all":
        return kind, {}
    if kind == "count_color":
        return kind, dict(color=rng.choice(colors))
    if kind == "count_shape":
        return kind, dict(shape=rng.choice(shapes))
    if kind == "count_color_shape":
        return kind, dict(color=rng.choice(colors), shape=rng.choice(shapes))
    if kind == "sum_shapes":
        a = rng.choice(shapes)
        b = rng.choice([s for s in SHAPES if s != a])
        a, b = sorted((a, b), key=SHAPES.index)
        return kind, dict(shape_a=a, shape_b=b)
    if kind == "diff_colors":
        a = rng.choice(colors)
        b = rng.choice([c for c in COLORS if c != a])
        if count(scene, color=a) < count(scene, color=b):  # ask so that the answer is >= 0
            a, b = b, a
        return kind, dict(color_a=a, color_b=b)
    raise ValueError(f"unknown question kind {kind!r}; known: {KINDS}")


def question_text(kind, p):
    if kind == "count_all":
        return "How many shapes are there?"
    if kind == "count_color":
        return f"How many {p['color']} shapes are there?"
    if kind == "count_shape":
        return f"How many {PLURAL[p['shape']]} are there?"
    if kind == "count_color_shape":
        return f"How many {p['color']} {PLURAL[p['shape']]} are there?"
    if kind == "sum_shapes":
        return f"How many {PLURAL[p['shape_a']]} and {PLURAL[p['shape_b']]} are there in total?"
    if kind == "diff_colors":
        return f"How many more {p['color_a']} shapes than {p['color_b']} shapes are there?"
    raise ValueError(f"unknown question kind {kind!r}")


def select(scene, color=None, shape=None):
    return [o for o in scene["objects"]
            if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]


def count(scene, color=None, shape=None):
    return len(select(scene, color, shape))


def answer_of(kind, p, scene):
    if kind == "count_all":
        return count(scene)
    if kind == "count_color":
        return count(scene, color=p["color"])
    if kind == "count_shape":
        return count(scene, shape=p["shape"])
    if kind == "count_color_shape":
        return count(scene, color=p["color"], shape=p["shape"])
    if kind == "sum_shapes":
        return count(scene, shape=p["shape_a"]) + count(scene, shape=p["shape_b"])
    if kind == "diff_colors":
        return count(scene, color=p["color_a"]) - count(scene, color=p["color_b"])
    raise ValueError(f"unknown question kind {kind!r}")


# -----------------------------------------------------------------------------
# worked solutions: a list of facts, each "name value"; lists enumerate in a fixed order
# (colours as in COLORS, shapes as in SHAPES), not by place: an item then depends on what is in
# the image, never on where, which a tiny model learns much sooner

def enumeration(name, items):
    """'red: 1 circle, 2 square' -- numbered, so the count is the last number."""
    if not items:
        return f"{name}: none."
    return f"{name}: " + ", ".join(f"{i + 1} {it}" for i, it in enumerate(items)) + "."


def list_items(body):
    """The inverse of enumeration's body: '1 circle, 2 square' -> ['circle', 'square'] ('none' -> [])."""
    items = [re.sub(r"^\d+\s*", "", it.strip()) for it in body.split(",")]
    return [it for it in items if it and it != "none"]


def by_color(colors):
    return sorted(colors, key=list(COLORS).index)


def by_shape(shapes):
    return sorted(shapes, key=SHAPES.index)


def scene_list(scene):
    """Every object as 'colour shape', sorted by colour, then shape."""
    objs = sorted(scene["objects"], key=lambda o: (list(COLORS).index(o["color"]), SHAPES.index(o["shape"])))
    return [f"{o['color']} {o['shape']}" for o in objs]


def first_scene_list(text):
    """The items of the first 'shapes: 1 red circle, 2 blue square.' list of a response, or None
    (compare with scene_list(scene): the response saw the scene right when they are equal)."""
    m = re.search(r"shapes:\s*([^.<]*)\.", text or "")
    return list_items(m[1]) if m else None


def facts(record):
    """The true facts an attempt should state: (lists {name: [items]}, counts {name: int}).
    Every kind first lists the whole scene ("shapes"), then the question's own list and counts."""
    kind, p, scene = record["kind"], record["params"], record["scene"]
    lists = {"shapes": scene_list(scene)}
    if kind == "count_all":
        return lists, {"shapes": count(scene)}
    if kind == "count_color":
        c = p["color"]
        return {**lists, c: by_shape(o["shape"] for o in select(scene, color=c))}, {c: count(scene, color=c)}
    if kind == "count_shape":
        s = PLURAL[p["shape"]]
        return ({**lists, s: by_color(o["color"] for o in select(scene, shape=p["shape"]))},
                {s: count(scene, shape=p["shape"])})
    if kind == "count_color_shape":
        c, s = p["color"], p["shape"]
        return ({**lists, c: by_shape(o["shape"] for o in select(scene, color=c))},
                {f"{c} {PLURAL[s]}": count(scene, color=c, shape=s)})
    if kind == "sum_shapes":
        a, b = p["shape_a"], p["shape_b"]
        return lists, {PLURAL[a]: count(scene, shape=a), PLURAL[b]: count(scene, shape=b)}
    if kind == "diff_colors":
        a, b = p["color_a"], p["color_b"]
        return lists, {a: count(scene, color=a), b: count(scene, color=b)}
    raise ValueError(f"unknown question kind {kind!r}")


def arithmetic(record):
    """The one arithmetic step of the kind, as text ('3+1=4'), or None."""
    _, counts = facts(record)
    x, y = counts.values() if len(counts) == 2 else (None, None)
    if record["kind"] == "sum_shapes":
        return f"{x}+{y}={x + y}"
    if record["kind"] == "diff_colors":
        return f"{x}-{y}={x - y}"
    return None


def count_text(record):
    """The counts the question needs, then its arithmetic step: 'red 2' / 'circles 1, triangles 2. 1+2=3'."""
    _, counts = facts(record)
    text = ", ".join(f"{k} {v}" for k, v in counts.items())
    step = arithmetic(record)
    return f"{text}. {step}" if step else text


def think_text(record, walk=False):
    """The scene list, the question's list (if any), then the counts and the arithmetic step.
    walk=True: the scene list, then the teacher's item-by-item check (check_walk) in place of the
    question's list. Measured (docs/LOG.md): a base trained on it answers 0.64 vs 0.38,
    but lists the scene exactly for 16% of test images vs 83%."""
    lists, _ = facts(record)
    if walk:
        parts = [enumeration("shapes", lists["shapes"]), check_walk(record)]  # check_walk: None for count_all
    else:
        parts = [enumeration(name, items) for name, items in lists.items()]
    return " ".join(p for p in parts if p) + " " + count_text(record)


def solution(record, walk=False):
    """The worked single-pass solution: '<think>...</think>\\n<answer>N</answer>'."""
    return f"<think>{think_text(record, walk)}</think>\n<answer>{record['answer']}</answer>"


# -----------------------------------------------------------------------------
# rule-based teacher: its reflection is a check the policy can run itself, one list item at a
# time, instead of a verdict it could only guess (the filtered list is where a tiny model errs)

def counted(record):
    """What the question counts: [(name, test(colour, shape))], one or two names ([] for count_all)."""
    kind, p = record["kind"], record["params"]
    if kind == "count_color":
        return [(p["color"], lambda c, s: c == p["color"])]
    if kind == "count_shape":
        return [(PLURAL[p["shape"]], lambda c, s: s == p["shape"])]
    if kind == "count_color_shape":
        return [(f"{p['color']} {PLURAL[p['shape']]}", lambda c, s: c == p["color"] and s == p["shape"])]
    if kind == "sum_shapes":
        return [(PLURAL[p[k]], lambda c, s, k=k: s == p[k]) for k in ("shape_a", "shape_b")]
    if kind == "diff_colors":
        return [(p[k], lambda c, s, k=k: c == p[k]) for k in ("color_a", "color_b")]
    return []


def check_walk(record):
    """Walk the scene list, each item marked with the name it counts for and that name's running
    count, or 'no': 'check: 1 red circle red 1, 2 red square red 2, 3 blue circle no.'
    None for count_all (the list's last number is already the count)."""
    tests = counted(record)
    if not tests:
        return None
    running, parts = Counter(), []
    for i, item in enumerate(scene_list(record["scene"])):
        color, shape = item.split()
        name = next((n for n, test in tests if test(color, shape)), None)
        if name is None:
            parts.append(f"{i + 1} {item} no")
        else:
            running[name] += 1
            parts.append(f"{i + 1} {item} {name} {running[name]}")
    return "check: " + ", ".join(parts) + "."


def to_int(s):
    m = re.search(r"-?\d+", s or "")
    return int(m.group()) if m else None


def list_diff(true_items, got_items):
    """'missed 1 red square, extra 1 blue circle' (empty when the multisets agree)."""
    t, g = Counter(true_items), Counter(got_items)
    parts = [f"missed {n} {it}" for it, n in (t - g).items()] + [f"extra {n} {it}" for it, n in (g - t).items()]
    return ", ".join(parts)


def teacher_reflection(record, attempt_think, attempt_answer):
    """A critique of an attempt, using the true scene: a wrong scene list is named, then the
    question is checked item by item over the (true) list, then the counts and the verdict.

    Wrong:    'check: 1 red circle red 1, 2 red square red 2, 3 blue circle no. red 2. answer is 2, not 3.'
    Correct:  'check: 1 red circle red 1, 2 red square red 2, 3 blue circle no. red 2. answer 2 is right.'
    Misseen:  'shapes: missed 1 red square. check: ...'
    The attempt is read loosely: a malformed one still gets the whole check and the true answer.
    """
    notes = []
    m = re.search(r"shapes:\s*([^.:<]*)", (attempt_think or "").lower())
    if m:
        d = list_diff(scene_list(record["scene"]), list_items(m[1]))
        if d:
            notes.append(f"shapes: {d}.")
    walk = check_walk(record)
    if walk:
        notes.append(walk)
    notes.append(count_text(record) + ".")
    gt, got = int(record["answer"]), to_int(attempt_answer)
    if got == gt:
        notes.append(f"answer {gt} is right.")
    else:
        notes.append(f"answer is {gt}, not {got}." if got is not None else f"no answer given; answer is {gt}.")
    return " ".join(notes)


# -----------------------------------------------------------------------------
# drawing

# ----------------------------------------------------------------------------- hooks the general scripts take by name
# eval.py --metric demo.task:scene_list_ok, grpo.py --extra_metrics demo.task:rollout_metrics, sft.py
# --tokenizer_corpus TASK/tokenizer_corpus.jsonl: the general code never imports this file.

def scene_list_ok(record, response_text):
    """eval.py metric: is the response's first scene list exactly the image's scene? None for a
    record that is not from this task."""
    if not isinstance(record.get("scene"), dict):
        return None
    return first_scene_list(response_text) == scene_list(record["scene"])


def scene_objects(record, response_text):
    """eval.py metric: the share of the scene's objects that the response's first scene list names
    right (colour and shape; extra objects count against it: matched / max(true, listed)). None for
    a record that is not from this task. scene_list_ok is all-or-nothing over the 3-7 objects of an
    image, so it is roughly this share to the power of the number of objects: 0.97 per object is
    0.86 of whole lists at 5 objects, 0.83 per object is 0.39."""
    if not isinstance(record.get("scene"), dict):
        return None
    truth, said = Counter(scene_list(record["scene"])), Counter(first_scene_list(response_text) or [])
    return sum((truth & said).values()) / max(sum(truth.values()), sum(said.values()), 1)


def answer_follows_list(record, response_text):
    """eval.py metric: is the response's last answer the one its own first scene list implies (the
    question applied to the objects it listed)? None for a record that is not from this task or a
    response without a readable list. Low where the answer is not computed from the list: the base
    model lists the scene right for >= 0.95 of images and its list implies the right answer for
    0.99, yet its answer follows its list for less than half of them."""
    if not isinstance(record.get("scene"), dict):
        return None
    items = [it.split() for it in first_scene_list(response_text) or []]
    if not items or any(len(it) != 2 or it[0] not in COLORS or it[1] not in SHAPES for it in items):
        return None
    listed = dict(objects=[dict(color=c, shape=s) for c, s in items])
    answers = re.findall(r"<answer>(.*?)</answer>", response_text, re.S)
    return bool(answers) and to_int(answers[-1]) == answer_of(record["kind"], record["params"], listed)


def rollout_metrics(texts, records):
    """grpo.py extra metric: {name: (sum, count)} over a rollout batch (perception, which no
    reward checks)."""
    pairs = [(t, r["scene"]) for t, r in zip(texts, records) if isinstance(r.get("scene"), dict)]
    return {"scene_acc": (sum(first_scene_list(t) == scene_list(s) for t, s in pairs), len(pairs))}


def tokenizer_corpus(records):
    """Extra texts for the tiny tokenizer: the rule teacher's reflections on an empty, the reference
    and a miscounted attempt of each record, so stage-1 reflection text has whole-word tokens too."""
    texts = []
    for rec in records:
        think = think_text(rec)
        for attempt, answer in (("", ""), (think, rec["answer"]), (think.replace("1", "2"), "9")):
            texts.append(teacher_reflection(rec, attempt, answer))
    return texts


def draw_scene(scene):
    """Render the scene: each object filled, centred in its 28x28 cell, white background."""
    size = scene["size"]
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene["objects"]:
        cx, cy = o["col"] * CELL + CELL // 2, o["row"] * CELL + CELL // 2
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([cx - 9, cy - 9, cx + 9, cy + 9], fill=fill)
        elif o["shape"] == "triangle":
            d.polygon([(cx, cy - 11), (cx - 11, cy + 9), (cx + 11, cy + 9)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}")
    return img


# -----------------------------------------------------------------------------
# records and the on-disk task

def make_record(split, i, cfg, rng):
    rid = f"{split}-{i:06d}"
    scene = random_scene(rng, cfg.difficulty, cfg.image_size)
    kind, params = random_question(rng, scene, list(cfg.kinds))
    q = question_text(kind, params)
    record = dict(id=rid, messages=None, answer=str(answer_of(kind, params, scene)), question=q,
                  image=f"images/{rid}.png", kind=kind, difficulty=cfg.difficulty, scene=scene, params=params)
    record["messages"] = [
        {"role": "system", "content": SYSTEM_PROMPT_SINGLE},
        {"role": "user", "content": [{"type": "image", "image": record["image"]}, {"type": "text", "text": q}]},
        {"role": "assistant", "content": solution(record, cfg.walk)},
    ]
    return record


def record_key(r):
    return json.dumps([r["scene"]["objects"], r["question"]])


def held_out(cfg, split, n, seen):
    """n records of a held-out split, drawn from the seeds (seed, split, j), skipping any
    (scene, question) already in `seen` (which grows), so the splits are disjoint."""
    out, j = [], 0
    while len(out) < n:
        r = make_record(split, len(out), cfg, random.Random(f"{cfg.seed}-{split}-{j}"))
        j += 1
        if record_key(r) not in seen:
            out.append(r)
            seen.add(record_key(r))
        if j > 100 * (n + 10):
            raise ValueError(f"cannot draw {n} {split} items disjoint from the other splits at difficulty {cfg.difficulty}")
    return out


def generate(cfg):
    """Train and test records, deterministic in cfg. Returns (train, test)."""
    train = [make_record("train", i, cfg, random.Random(f"{cfg.seed}-train-{i}")) for i in range(cfg.n_train)]
    return train, held_out(cfg, "test", cfg.n_test, {record_key(r) for r in train})


def generate_val(cfg, train, test):
    """The validation split: its own seeds, disjoint from train and test. Drawn after test, so
    adding it left train and test exactly as they were."""
    return held_out(cfg, "val", cfg.n_val, {record_key(r) for r in train + test})


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_task(out_dir, cfg=TaskConfig()):
    """Write out_dir/{train,test,val}.jsonl + images/ (val.jsonl only when cfg.n_val > 0). Idempotent: returns at once when
    out_dir/manifest.json records the same config. The manifest is removed first and written
    last, so a crash never leaves a half-written task looking complete."""
    if cfg.image_size % CELL or cfg.image_size < 2 * CELL:
        raise ValueError(f"TaskConfig.image_size={cfg.image_size} must be a multiple of {CELL} and >= {2 * CELL}")
    if cfg.difficulty not in N_OBJECTS:
        raise ValueError(f"TaskConfig.difficulty={cfg.difficulty} must be one of {sorted(N_OBJECTS)}")
    unknown = set(cfg.kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"TaskConfig.kinds has unknown kinds {sorted(unknown)}; known: {KINDS}")
    train_path, test_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")
    manifest_path = os.path.join(out_dir, "manifest.json")
    val_path = os.path.join(out_dir, "val.jsonl")
    files = ["train.jsonl", "test.jsonl", "tokenizer_corpus.jsonl"] + (["val.jsonl"] if cfg.n_val > 0 else [])
    want = dict(config={**asdict(cfg), "kinds": list(cfg.kinds)}, files=files)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get("config") == want["config"]:
                return train_path, test_path
        os.remove(manifest_path)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    train, test = generate(cfg)
    val = generate_val(cfg, train, test)
    for r in tqdm(train + test + val, desc="task images", unit="img"):
        draw_scene(r["scene"]).save(os.path.join(out_dir, r["image"]))
    splits = [(train_path, train), (test_path, test)] + ([(val_path, val)] if cfg.n_val > 0 else [])
    for path, records in splits:
        write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    write_atomic(os.path.join(out_dir, "tokenizer_corpus.jsonl"),
                 "".join(json.dumps(t, allow_nan=False) + "\n" for t in tokenizer_corpus(train)))
    want.update(n_train=len(train), n_test=len(test), n_val=len(val))
    write_atomic(manifest_path, json.dumps(want, indent=1, allow_nan=False))
    return train_path, test_path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    d = TaskConfig()
    ap.add_argument("--n-train", type=int, default=d.n_train)
    ap.add_argument("--n-test", type=int, default=d.n_test)
    ap.add_argument("--n-val", type=int, default=d.n_val, help="validation split size (0 = no val.jsonl)")
    ap.add_argument("--difficulty", type=int, default=d.difficulty)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--walk", action="store_true", help="worked solutions check the scene list item by item")
    a = ap.parse_args()
    cfg = TaskConfig(n_train=a.n_train, n_test=a.n_test, n_val=a.n_val, difficulty=a.difficulty, seed=a.seed,
                     image_size=a.image_size, kinds=tuple(a.kinds.split(",")), walk=a.walk)
    paths = make_task(a.out, cfg)
    print("wrote", *paths)
