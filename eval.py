"""Evaluate checkpoints: what does reflection buy?

For each checkpoint x dataset, generate one (greedy, the default) or n (sampled, pass@k)
responses per question, score each with reward.py and report:

    first  accuracy of the first <answer>       final  accuracy of the last <answer>
    w2r r2r r2w w2w   reflection cases (wrong->right, ...)   single / none   one answer / no answer
    format  fraction in the prompt's format      len  mean response length in tokens
    scene_acc  (built-in task only) fraction whose first "shapes: ..." list is the exact scene

as a table on stdout (n = questions; case columns count responses, n per question when sampling),
metrics.json + one predictions JSONL per (checkpoint, dataset) in --out.

Datasets: project JSONL files (--data, e.g. the built-in task's test.jsonl) and benchmarks
read from local files in their published formats (--bench NAME=PATH), nothing downloaded:

    mathvista   testmini.json (dict pid -> record, or list) or the HF testmini parquet
    mathverse   testmini.json (list) or parquet
    mathvision  test.jsonl or parquet
    mmmu_pro    jsonl/json or parquet (standard: question + image_1..7, vision: image)

Each loader converts to the project record schema (a user message with the image(s) and the
question with lettered options, "answer" = letter or value). Parquet needs pyarrow or pandas
(not in requirements); embedded image bytes are written to --out/bench_images.

    python eval.py --model runs/base runs/srpo --data runs/task/test.jsonl --prompt reflect --out runs/eval
    python eval.py --plot runs/sft/log.jsonl runs/grpo/log.jsonl --out runs/curves.png
"""
import argparse
import ast
import base64
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CASES = ["w2r", "r2r", "r2w", "w2w", "single", "none"]

# -----------------------------------------------------------------------------
# benchmark loaders: published format -> project records


def read_rows(path):
    """Rows of a .json (list, or dict of records), .jsonl or .parquet file, as (where, dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise SystemExit(f"{path}: reading parquet needs pyarrow or pandas (pip install pyarrow); "
                                 f"or convert the file to JSON/JSONL") from None
            rows = pd.read_parquet(path).to_dict("records")
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    if path.endswith(".jsonl"):
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        return out
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(d, dict):  # MathVista testmini.json: {pid: record}
        return [(f"{path}:[{k!r}]", dict(v, pid=v.get("pid", k))) for k, v in d.items()]
    if isinstance(d, list):
        return [(f"{path}:[{i}]", r) for i, r in enumerate(d)]
    raise ValueError(f"{path}: expected a JSON list or object of records, got {type(d).__name__}")


def field(row, name, where):
    if row.get(name) is None or (isinstance(row[name], str) and not row[name].strip()):
        raise ValueError(f"{where}: missing field {name!r} (record has: {sorted(row)})")
    return row[name]


def resolve_image(value, base_dir, cache_dir, where):
    """An image given as a path (relative to the data file), {"bytes", "path"}, raw or base64 bytes
    -> an absolute path of an existing file. Embedded bytes are written once to cache_dir."""
    if isinstance(value, dict):
        if not value.get("bytes") and not value.get("path"):
            raise ValueError(f"{where}: image has neither bytes nor path")
        is_bytes = bool(value.get("bytes"))
        value = value["bytes"] if is_bytes else value["path"]
    else:  # a bare string is a path, unless it is base64 of a JPEG / PNG
        is_bytes = not isinstance(value, str) or value.startswith(("/9j/", "iVBOR"))
    if not is_bytes:
        for cand in (os.path.join(base_dir, value), os.path.join(base_dir, "images", value)):
            if os.path.isfile(cand):
                return os.path.abspath(cand)
        raise ValueError(f"{where}: image file {value!r} not found (looked in {base_dir} and {base_dir}/images)")
    data = base64.b64decode(value) if isinstance(value, str) else bytes(value)
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, hashlib.sha1(data).hexdigest()[:16] + ".img")
    if not os.path.exists(out):
        with open(out + ".tmp", "wb") as f:
            f.write(data)
        os.replace(out + ".tmp", out)
    return os.path.abspath(out)


def with_options(question, options):
    if not options:
        return question
    return question + "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def make_record(rid, images, text, answer, options=None, **extra):
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
    rec = {"id": str(rid), "messages": [{"role": "user", "content": content}], "answer": str(answer).strip(),
           "question": text, "image": images[0] if images else None}
    if options:
        rec["options"] = list(options)
    rec.update(extra)
    return rec


def load_mathvista(path, cache_dir):
    """MathVista testmini: question, choices, answer (the choice text for multi_choice),
    image ("images/1.jpg") or decoded_image (bytes), question_type, answer_type, precision, unit."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        q, ans = field(r, "question", where), str(field(r, "answer", where)).strip()
        img = r.get("decoded_image") or field(r, "image", where)
        image = resolve_image(img, base, cache_dir, where)
        choices = r.get("choices")
        choices = list(choices) if choices is not None and len(choices) else None
        qtype = r.get("question_type") or ("multi_choice" if choices else "free_form")
        if r.get("unit"):
            q += f" (Unit: {r['unit']})"
        if qtype == "multi_choice":
            if not choices:
                raise ValueError(f"{where}: question_type multi_choice but no 'choices'")
            texts = [str(c).strip() for c in choices]
            if ans not in texts:
                raise ValueError(f"{where}: answer {ans!r} is not one of the choices {texts}")
            ans = LETTERS[texts.index(ans)]
            q = with_options(q, texts) + "\nAnswer with the option's letter."
        else:
            atype, prec = r.get("answer_type"), r.get("precision")
            if atype == "integer":
                q += "\nAnswer with an integer."
            elif atype == "float" and prec is not None and not (isinstance(prec, float) and math.isnan(prec)):
                q += f"\nAnswer with a number with {int(prec)} decimal place(s)."
            elif atype == "list":
                q += "\nAnswer with a Python list."
        recs.append(make_record(r.get("pid", len(recs)), [image], q, ans, choices, source=where,
                                question_type=qtype, answer_type=r.get("answer_type")))
    return recs


def load_mathverse(path, cache_dir):
    """MathVerse testmini: question (choices already in the text) or question_for_eval, answer
    (letter for multi-choice), image (file name; empty for the text-only version)."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        q = r.get("question") or field(r, "question_for_eval", where)
        ans = field(r, "answer", where)
        img = r.get("image")
        images = [resolve_image(img, base, cache_dir, where)] if img else []
        rid = r.get("sample_index", len(recs))
        recs.append(make_record(rid, images, q, ans, source=where, question_type=r.get("question_type"),
                                problem_version=r.get("problem_version")))
    return recs


def load_mathvision(path, cache_dir):
    """MathVision: question, options (list, empty for free-form), answer (letter when options),
    image ("images/1.jpg") or decoded_image."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        q, ans = field(r, "question", where), field(r, "answer", where)
        img = r.get("decoded_image") or field(r, "image", where)
        options = list(r.get("options") or [])
        if options and str(ans).strip() not in LETTERS[:len(options)]:
            raise ValueError(f"{where}: answer {ans!r} is not a letter of the {len(options)} options")
        images = [resolve_image(img, base, cache_dir, where)]
        recs.append(make_record(r.get("id", len(recs)), images, with_options(q, options), ans, options,
                                source=where, subject=r.get("subject"), level=r.get("level")))
    return recs


def load_mmmu_pro(path, cache_dir):
    """MMMU-Pro: options as a Python-list string, answer letter; standard config: question +
    image_1..image_7 ({"bytes", "path"} or paths); vision config: image (screenshot), no question."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        opts = field(r, "options", where)
        if isinstance(opts, str):
            try:
                opts = ast.literal_eval(opts)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: field 'options' is not a list literal: {opts[:80]!r}") from None
        opts = [str(o) for o in opts]
        ans = str(field(r, "answer", where)).strip()
        if ans not in LETTERS[:len(opts)]:
            raise ValueError(f"{where}: answer {ans!r} is not a letter of the {len(opts)} options")
        if r.get("question"):  # standard
            keys = [k for k in (f"image_{i}" for i in range(1, 8)) if r.get(k)] or (["image"] if r.get("image") else [])
            images = [resolve_image(r[k], base, cache_dir, f"{where} field {k}") for k in keys]
            text = with_options(r["question"], opts) + "\nAnswer with the option's letter."
        else:  # vision: question and options are in the screenshot
            images = [resolve_image(field(r, "image", where), base, cache_dir, where)]
            text = "Answer the multiple-choice question in the image with the option's letter."
        if not images:
            raise ValueError(f"{where}: no image (image_1..image_7 / image)")
        recs.append(make_record(r.get("id", len(recs)), images, text, ans, opts, source=where,
                                subject=r.get("subject")))
    return recs


LOADERS = {"mathvista": load_mathvista, "mathverse": load_mathverse,
           "mathvision": load_mathvision, "mmmu_pro": load_mmmu_pro}

# -----------------------------------------------------------------------------
# generation and scoring


@dataclass
class EvalConfig:
    prompt: str = "reflect"       # system prompt: "reflect" (two-pass SRPO format) or "single"
    max_new_tokens: int = 256
    batch_size: int = 8
    n: int = 1                    # samples per question (pass@k); 1 = greedy unless temperature > 0
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    limit: int = 0                # first `limit` records per dataset (0 = all)
    shuffle_images: bool = False  # blind control: each question gets the next record's image(s)


def generate_responses(model, tok, records, image_root, cfg):
    """-> list of n * len(records) dicts(text, length, finish), prompt-major."""
    import torch
    from tqdm import tqdm
    import data
    import sampler
    sys_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.prompt == "reflect" else data.SYSTEM_PROMPT_SINGLE
    greedy = cfg.temperature <= 0
    scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if not greedy else 1.0,
                                top_p=cfg.top_p, greedy=greedy, n=cfg.n, seed=cfg.seed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    eos = set(tok.eos_ids)
    out = []
    for i in tqdm(range(0, len(records), cfg.batch_size), desc="generate", leave=False):
        chunk = records[i:i + cfg.batch_size]
        enc = [data.encode_messages(data.prompt_messages(r, sys_prompt), tok, image_root,
                                    add_generation_prompt=True, where=r.get("source", f"record {r.get('id')}"))
               for r in chunk]
        batch = data.collate(enc, tok.pad_id, left_pad=True)
        batch = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        res = sampler.generate(model, batch, tok.eos_ids, scfg)
        for row in range(res["tokens"].shape[0]):
            ids = res["tokens"][row, :int(res["lengths"][row])].tolist()
            while ids and ids[-1] in eos:
                ids.pop()
            out.append(dict(text=tok.decode(ids), length=len(ids), finish=res["finish_reasons"][row]))
    return out


def score_predictions(records, gens, cfg, count_tokens, reward_cfg=None):
    """records (P), gens (P*n prompt-major) -> per-sample prediction dicts, scored with reward.py."""
    import reward
    import task
    rcfg = reward_cfg or reward.RewardConfig()
    n = len(gens) // max(len(records), 1)
    assert n * len(records) == len(gens), f"{len(gens)} responses for {len(records)} records"
    texts = [g["text"] for g in gens]
    gts = [records[i // n]["answer"] for i in range(len(gens))]
    opts = [records[i // n].get("options") for i in range(len(gens))]
    srpo = reward.score_batch(texts, gts, mode="srpo", count_tokens=count_tokens, cfg=rcfg, options=opts)
    preds = []
    for i, (g, s) in enumerate(zip(gens, srpo)):
        p = reward.parse_response(g["text"])
        # format compliance is judged against the format the prompt asked for
        format_ok = p.is_two_pass_format if cfg.prompt == "reflect" else p.is_single_pass_format
        rec = records[i // n]
        preds.append(dict(id=rec["id"], sample=i % n, answer=rec["answer"], response=g["text"],
                          first_answer=(p.answers[0] if p.is_two_pass else p.answers[-1]) if p.answers else None,
                          final_answer=p.answers[-1] if p.answers else None,
                          first_correct=bool(s.first_correct), final_correct=bool(s.final_correct),
                          case=s.case, format_ok=format_ok, reward=float(s.total),
                          length=g["length"], finish=g["finish"]))
        if isinstance(rec.get("scene"), dict):  # built-in task: is the first scene list exactly right?
            preds[-1]["scene_ok"] = task.first_scene_list(g["text"]) == task.scene_list(rec["scene"])
    return preds


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(preds, n):
    """Per-sample predictions (prompt-major, n per prompt) -> metrics dict."""
    N = len(preds)
    m = dict(n_questions=N // n, n_samples=N,
             first_acc=sum(p["first_correct"] for p in preds) / N,
             final_acc=sum(p["final_correct"] for p in preds) / N,
             format=sum(p["format_ok"] for p in preds) / N,
             mean_len=sum(p["length"] for p in preds) / N,
             mean_reward=sum(p["reward"] for p in preds) / N,
             truncated=sum(p["finish"] == "length" for p in preds) / N)
    scene = [p["scene_ok"] for p in preds if "scene_ok" in p]
    if scene:  # built-in task: share of responses whose first scene list is exactly right
        m["scene_acc"] = sum(scene) / len(scene)
    for c in CASES:
        m[c] = sum(p["case"] == c for p in preds)
    if n > 1:
        correct = [sum(p["final_correct"] for p in preds[i:i + n]) for i in range(0, N, n)]
        for k in sorted({1, n}):
            m[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    return m


def format_table(rows):
    """rows: list of dict(checkpoint, dataset, metrics) -> aligned text table."""
    extra = sorted({k for r in rows for k in r["metrics"] if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    extra += ["scene_acc"] if any("scene_acc" in r["metrics"] for r in rows) else []
    head = ["checkpoint", "dataset", "n", "first", "final", *CASES, "format", "len", *extra]
    lines = [head]
    for r in rows:
        m = r["metrics"]
        lines.append([r["checkpoint"], r["dataset"], str(m["n_questions"]), f"{m['first_acc']:.3f}",
                      f"{m['final_acc']:.3f}", *(str(m[c]) for c in CASES), f"{m['format']:.3f}",
                      f"{m['mean_len']:.1f}", *(f"{m.get(k, float('nan')):.3f}" for k in extra)])
    w = [max(len(l[j]) for l in lines) for j in range(len(head))]
    fmt = lambda l: "  ".join(s.ljust(w[j]) if j < 2 else s.rjust(w[j]) for j, s in enumerate(l))
    return "\n".join([fmt(lines[0]), "  ".join("-" * x for x in w)] + [fmt(l) for l in lines[1:]])


def load_datasets(data_paths, benches, cache_dir, limit):
    """-> list of (name, records, image_root)."""
    import data
    out = []
    for path in data_paths:
        name = os.path.splitext(os.path.basename(path))[0]
        recs = [dict(r, source=f"{path} (id {r.get('id')})") for r in data.read_jsonl(path)]
        out.append((name, recs, os.path.dirname(os.path.abspath(path))))
    for spec in benches:
        name, _, path = spec.partition("=")
        if name not in LOADERS or not path:
            raise SystemExit(f"--bench {spec!r}: expected NAME=PATH with NAME in {sorted(LOADERS)}")
        recs = LOADERS[name](path, os.path.join(cache_dir, name))
        out.append((name, recs, os.path.dirname(os.path.abspath(path))))
    return [(n, r[:limit] if limit else r, root) for n, r, root in out]


def with_next_images(records):
    """Blind control: record i keeps its question but gets the image(s) of record i+1 (cyclic). A
    model that reads the image falls toward chance; one that answers from the text alone does not."""
    def images(r):
        return [p for m in r["messages"] if isinstance(m.get("content"), list) for p in m["content"]
                if isinstance(p, dict) and p.get("type") == "image"]
    out = []
    for i, r in enumerate(records):
        r = json.loads(json.dumps(r))  # deep copy
        nxt = records[(i + 1) % len(records)]
        mine, theirs = images(r), images(nxt)
        if len(mine) != len(theirs):
            raise ValueError(f"--shuffle-images: record {r.get('id')} has {len(mine)} image(s), "
                             f"the next record {nxt.get('id')} has {len(theirs)}")
        for part, other in zip(mine, theirs):
            part["image"] = other["image"]
        out.append(r)
    return out


def check_answers(name, records):
    """Drop (and report) records whose ground truth reward.py cannot parse: never a free reward."""
    import answers
    good, bad = [], []
    for r in records:
        field(r, "answer", r.get("source", f"{name}: record {r.get('id')}"))
        try:
            answers.check_ground_truth(r["answer"], r.get("options"))
            good.append(r)
        except answers.BadGroundTruth as e:
            bad.append(f"{r.get('id')}: {e}")
    if bad:
        print(f"[eval] {name}: {len(bad)} record(s) with an unparsable answer skipped, e.g. {bad[:3]}", file=sys.stderr)
    return good, bad


def evaluate(ckpts, datasets, cfg, out_dir, device="cpu"):
    """Every checkpoint on every (name, records, image_root) dataset; writes out_dir/metrics.json and
    out_dir/predictions/<checkpoint>__<dataset>.jsonl; returns the table rows."""
    import torch
    import data
    import model as qwen
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = [os.path.basename(os.path.normpath(c)) for c in ckpts]
    names = names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]
    os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
    checked = [(n, *check_answers(n, recs), root) for n, recs, root in datasets]
    if cfg.shuffle_images:
        checked = [(n, with_next_images(recs), bad, root) for n, recs, bad, root in checked]
    rows = []
    for ckpt, cname in zip(ckpts, names):
        tok = data.Tokenizer.from_dir(ckpt)
        m = qwen.from_pretrained(ckpt, device=device, dtype=dtype).eval()
        count_tokens = lambda s: len(tok.encode(s))
        for dname, recs, bad, root in checked:
            if not recs:
                print(f"[eval] {dname}: no records to evaluate", file=sys.stderr)
                continue
            t0 = time.time()
            gens = generate_responses(m, tok, recs, root, cfg)
            preds = score_predictions(recs, gens, cfg, count_tokens)
            metrics = dict(aggregate(preds, cfg.n), skipped_bad_answer=len(bad), seconds=round(time.time() - t0, 1))
            safe = f"{cname}__{dname}".replace("/", "_").replace(":", "_")
            with open(os.path.join(out_dir, "predictions", safe + ".jsonl"), "w", encoding="utf-8") as f:
                for p in preds:
                    f.write(json.dumps(p, ensure_ascii=False) + "\n")
            rows.append(dict(checkpoint=cname, path=os.path.abspath(ckpt), dataset=dname, metrics=metrics))
            print(f"[eval] {cname} on {dname}: final_acc {metrics['final_acc']:.3f} ({metrics['seconds']} s)", file=sys.stderr)
        del m
    with open(os.path.join(out_dir, "metrics.json") + ".tmp", "w") as f:
        json.dump(dict(config=asdict(cfg), results=rows), f, indent=1)
    os.replace(os.path.join(out_dir, "metrics.json") + ".tmp", os.path.join(out_dir, "metrics.json"))
    return rows

# -----------------------------------------------------------------------------
# training curves from JSONL logs, drawn with Pillow

# grpo.py / sft.py log fields, in panel order (others via --keys)
PLOT_KEYS = ["reward", "test_reward", "acc_final", "test_acc_final", "acc_first", "test_acc_first",
             "resp_len", "kl_ref", "kl_old", "loss"]
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_log(path):
    """-> {key: [(step, value)]} of the numeric fields (nested dicts flattened as a/b)."""
    import data
    series = {}
    for i, row in enumerate(data.read_jsonl(path)):
        flat = {}
        stack = [("", row)]
        while stack:
            pre, d = stack.pop()
            for k, v in d.items():
                if isinstance(v, dict):
                    stack.append((pre + k + "/", v))
                elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    flat[pre + k] = float(v)
        step = flat.pop("step", i)
        for k, v in flat.items():
            series.setdefault(k, []).append((step, v))
    return series


def plot_logs(paths, out_png, keys=None, w=480, h=300):
    """One panel per key (default: the PLOT_KEYS present, else the first 8 numeric fields),
    one coloured line per log."""
    from PIL import Image, ImageDraw
    logs = [read_log(p) for p in paths]
    have = sorted({k for s in logs for k in s})
    chosen = keys or [k for k in PLOT_KEYS if k in have] or have[:8]
    missing = [k for k in chosen if k not in have]
    if missing or not chosen:
        raise SystemExit(f"{paths}: no numeric field {missing or ''} to plot (fields: {have})")
    cols = 2 if len(chosen) > 1 else 1
    nrow = (len(chosen) + cols - 1) // cols
    img = Image.new("RGB", (cols * w, nrow * h + 24), "white")
    d = ImageDraw.Draw(img)
    for j, p in enumerate(paths):  # legend
        d.text((10 + 240 * j, 6), os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p),
               fill=COLORS[j % len(COLORS)])
    for idx, key in enumerate(chosen):
        x0, y0 = (idx % cols) * w + 60, (idx // cols) * h + 24 + 24  # plot area origin (top left)
        pw, ph = w - 80, h - 64
        pts = [(s, v) for s in logs for s, v in s.get(key, [])]
        xs, ys = [a for a, _ in pts], [b for _, b in pts]
        xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
        if xhi == xlo:  # a single step / a constant: centre it
            xlo, xhi = xlo - 1, xhi + 1
        if yhi == ylo:
            ylo, yhi = ylo - 0.5 * max(abs(ylo), 1), yhi + 0.5 * max(abs(yhi), 1)
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        d.text((x0 + pw // 2 - 4 * len(key), y0 - 16), key, fill="black")
        d.text((x0 - 56, y0 - 4), f"{yhi:.3g}", fill="black")
        d.text((x0 - 56, y0 + ph - 8), f"{ylo:.3g}", fill="black")
        d.text((x0, y0 + ph + 4), f"{xlo:g}", fill="black")
        d.text((x0 + pw - 30, y0 + ph + 4), f"{xhi:g}", fill="black")
        d.text((x0 + pw // 2 - 12, y0 + ph + 4), "step", fill="black")
        for j, s in enumerate(logs):
            line = [(x0 + (a - xlo) / (xhi - xlo) * pw, y0 + ph - (b - ylo) / (yhi - ylo) * ph) for a, b in s.get(key, [])]
            if len(line) > 1:
                d.line(line, fill=COLORS[j % len(COLORS)], width=2)
            elif line:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=COLORS[j % len(COLORS)])
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    img.save(out_png, format="PNG")
    return chosen

# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", help="checkpoint directories (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--data", nargs="*", default=[], help="project JSONL files (e.g. the built-in test.jsonl)")
    ap.add_argument("--bench", nargs="*", default=[], help=f"NAME=PATH, NAME in {sorted(LOADERS)}")
    ap.add_argument("--plot", nargs="+", help="training JSONL logs: draw curves to --out (a .png)")
    ap.add_argument("--keys", nargs="+", help=f"--plot: fields to draw (default: those of {PLOT_KEYS} present)")
    ap.add_argument("--out", required=True, help="output directory (eval) or PNG file (--plot)")
    ap.add_argument("--prompt", choices=["single", "reflect"], default="reflect")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n", type=int, default=1, help="samples per question (pass@k needs --temperature > 0)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N records per dataset (0 = all)")
    ap.add_argument("--shuffle-images", action="store_true",
                    help="blind control: each question is asked with the next record's image")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    a = ap.parse_args(argv)
    if a.plot:
        keys = plot_logs(a.plot, a.out, a.keys)
        print(f"[eval] wrote {a.out} ({', '.join(keys)})")
        return
    if not a.model or not (a.data or a.bench):
        ap.error("give --model CKPT [...] and --data / --bench (or --plot LOG ...)")
    if a.n > 1 and a.temperature <= 0:
        ap.error("--n > 1 needs --temperature > 0 (greedy samples are identical)")
    for c in a.model:  # fail before any work, not after the first checkpoint's
        if not (os.path.isfile(os.path.join(c, "config.json")) and os.path.isfile(os.path.join(c, "tokenizer.json"))):
            raise SystemExit(f"--model {c}: not a checkpoint directory (needs config.json and tokenizer.json)")
    cfg = EvalConfig(prompt=a.prompt, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, n=a.n,
                     temperature=a.temperature, top_p=a.top_p, seed=a.seed, limit=a.limit,
                     shuffle_images=a.shuffle_images)
    datasets = load_datasets(a.data, a.bench, os.path.join(a.out, "bench_images"), a.limit)
    rows = evaluate(a.model, datasets, cfg, a.out, a.device)
    print(format_table(rows))


def _cuda():
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
