"""Benchmark loaders: the published file formats -> project records, read from local files.

    mathvista   testmini.json (dict pid -> record, or list) or the HF testmini parquet
    mathverse   testmini.json (list) or parquet
    mathvision  test.jsonl or parquet
    mmmu_pro    jsonl/json or parquet (standard: question + image_1..7, vision: image)

Each loader converts a row to the project record schema: one user message with the image(s) and
the question (with lettered options, when it has them), "answer" = the option's letter or the
value, "options" = the option texts. Parquet needs pyarrow or pandas (not in requirements);
embedded image bytes are written once to a cache directory.

Nothing here guesses: a field of the wrong type (options as a number, a string or a dict), more
than 26 options, an answer that is not exactly one option letter, a duplicate id, an empty file
or bytes that are not UTF-8 are errors naming the file, the row (line / index / key) and the
field. (`choices: "ABC"` is not three options, and "AB" is not an option letter.)
"""
import ast
import base64
import hashlib
import json
import math
import os

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- reading rows

def read_rows(path):
    """Rows of a .json (list, or dict of records), .jsonl or .parquet file, as (where, dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if path.endswith(".parquet"):
        rows = read_parquet(path)
        out = [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    elif path.endswith(".jsonl"):
        out = read_jsonl_rows(path)
    else:
        out = read_json_rows(path)
    if not out:
        raise ValueError(f"{path}: no records (empty benchmark file)")
    for where, r in out:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object (a record), got {type(r).__name__}")
    return out


def read_parquet(path):
    try:
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow or pandas (pip install pyarrow); "
                             f"or convert the file to JSON/JSONL") from None
        return pd.read_parquet(path).to_dict("records")


def read_jsonl_rows(path):
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return out


def read_json_rows(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(d, dict):  # MathVista testmini.json: {pid: record}
        return [(f"{path}:[{k!r}]", dict(v, pid=v.get("pid", k)) if isinstance(v, dict) else v) for k, v in d.items()]
    if isinstance(d, list):
        return [(f"{path}:[{i}]", r) for i, r in enumerate(d)]
    raise ValueError(f"{path}: expected a JSON list or object of records, got {type(d).__name__}")


# ----------------------------------------------------------------------------- typed fields

def field(row, name, where):
    """A required field: present, not None, not an empty string."""
    if row.get(name) is None or (isinstance(row[name], str) and not row[name].strip()):
        raise ValueError(f"{where}: missing field {name!r} (record has: {sorted(row)})")
    return row[name]


def text_field(row, name, where):
    """A required field that is text (a number is read as its text, e.g. answer 3 -> "3")."""
    v = field(row, name, where)
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):   # Python's json reads NaN / Infinity; str() would make "nan"
        raise ValueError(f"{where}: field {name!r}: NaN / Infinity is not a JSON number; write a string")
    return str(v).strip()


def option_list(value, where, name):
    """Options/choices: a list of texts (None or [] = no options). A string, a number or a dict is an
    error: "ABC" is not three options, and a dict has no order the question fixed."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array from pandas
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field {name!r} must be a list of options, got {type(value).__name__} "
                         f"{str(value)[:60]!r}")
    for j, o in enumerate(value):
        if isinstance(o, bool) or not isinstance(o, (str, int, float)):
            raise ValueError(f"{where}: field {name!r}[{j}] must be text, got {type(o).__name__}")
    if len(value) > len(LETTERS):
        raise ValueError(f"{where}: field {name!r} has {len(value)} options, more than the {len(LETTERS)} letters A-Z")
    return [str(o).strip() for o in value]


def option_letter(answer, n_options, where):
    """The answer of a multiple-choice row must be exactly one of the first n letters."""
    if answer not in list(LETTERS[:n_options]):  # a list: "AB" is not in it, unlike in the string "AB..."
        raise ValueError(f"{where}: answer {answer!r} is not a letter of the {n_options} options")
    return answer


def check_unique_ids(recs, path):
    seen = {}
    for r in recs:
        if r["id"] in seen:
            raise ValueError(f"{r['source']}: duplicate id {r['id']!r} (first at {seen[r['id']]}) in {path}")
        seen[r["id"]] = r["source"]
    return recs


# ----------------------------------------------------------------------------- images

def resolve_image(value, base_dir, cache_dir, where):
    """An image given as a path (relative to the data file), {"bytes", "path"}, raw or base64 bytes
    -> an absolute path of an existing file. Embedded bytes are written once to cache_dir."""
    if isinstance(value, dict):
        if not value.get("bytes") and not value.get("path"):
            raise ValueError(f"{where}: image has neither bytes nor path")
        is_bytes = bool(value.get("bytes"))
        value = value["bytes"] if is_bytes else value["path"]
    elif isinstance(value, str):  # a bare string is a path, unless it is base64 of a JPEG / PNG
        is_bytes = value.startswith(("/9j/", "iVBOR"))
    elif isinstance(value, (bytes, bytearray)):
        is_bytes = True
    else:
        raise ValueError(f"{where}: image must be a path, bytes or {{'bytes', 'path'}}, got {type(value).__name__}")
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


# ----------------------------------------------------------------------------- records

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
        q, ans = text_field(r, "question", where), text_field(r, "answer", where)
        img = r.get("decoded_image") or field(r, "image", where)
        image = resolve_image(img, base, cache_dir, where)
        choices = option_list(r.get("choices"), where, "choices") or None
        qtype = r.get("question_type") or ("multi_choice" if choices else "free_form")
        if r.get("unit"):
            q += f" (Unit: {r['unit']})"
        if qtype == "multi_choice":
            if not choices:
                raise ValueError(f"{where}: question_type multi_choice but no 'choices'")
            if ans not in choices:
                raise ValueError(f"{where}: answer {ans!r} is not one of the choices {choices}")
            ans = LETTERS[choices.index(ans)]
            q = with_options(q, choices) + "\nAnswer with the option's letter."
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
    return check_unique_ids(recs, path)


def load_mathverse(path, cache_dir):
    """MathVerse testmini: question (choices already in the text) or question_for_eval, answer
    (letter for multi-choice), image (file name; empty for the text-only version)."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        q = text_field(r, "question", where) if r.get("question") else text_field(r, "question_for_eval", where)
        ans = text_field(r, "answer", where)
        img = r.get("image")
        images = [resolve_image(img, base, cache_dir, where)] if img else []
        rid = r.get("sample_index", len(recs))
        recs.append(make_record(rid, images, q, ans, source=where, question_type=r.get("question_type"),
                                problem_version=r.get("problem_version")))
    return check_unique_ids(recs, path)


def load_mathvision(path, cache_dir):
    """MathVision: question, options (list, empty for free-form), answer (letter when options),
    image ("images/1.jpg") or decoded_image."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        q, ans = text_field(r, "question", where), text_field(r, "answer", where)
        img = r.get("decoded_image") or field(r, "image", where)
        options = option_list(r.get("options"), where, "options")
        if options:
            option_letter(ans, len(options), where)
        images = [resolve_image(img, base, cache_dir, where)]
        recs.append(make_record(r.get("id", len(recs)), images, with_options(q, options), ans, options,
                                source=where, subject=r.get("subject"), level=r.get("level")))
    return check_unique_ids(recs, path)


def load_mmmu_pro(path, cache_dir):
    """MMMU-Pro: options as a Python-list string, answer letter; standard config: question +
    image_1..image_7 ({"bytes", "path"} or paths); vision config: image (screenshot), no question."""
    recs, base = [], os.path.dirname(os.path.abspath(path))
    for where, r in read_rows(path):
        opts = field(r, "options", where)
        if isinstance(opts, str):  # the published form: "['a', 'b']"
            try:
                opts = ast.literal_eval(opts)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: field 'options' is not a list literal: {opts[:80]!r}") from None
        opts = option_list(opts, where, "options")
        if not opts:
            raise ValueError(f"{where}: field 'options' is empty")
        ans = option_letter(text_field(r, "answer", where), len(opts), where)
        if r.get("question"):  # standard
            question = text_field(r, "question", where)
            keys = [k for k in (f"image_{i}" for i in range(1, 8)) if r.get(k)] or (["image"] if r.get("image") else [])
            images = [resolve_image(r[k], base, cache_dir, f"{where} field {k}") for k in keys]
            text = with_options(question, opts) + "\nAnswer with the option's letter."
        else:  # vision: question and options are in the screenshot
            images = [resolve_image(field(r, "image", where), base, cache_dir, where)]
            text = "Answer the multiple-choice question in the image with the option's letter."
        if not images:
            raise ValueError(f"{where}: no image (image_1..image_7 / image)")
        recs.append(make_record(r.get("id", len(recs)), images, text, ans, opts, source=where,
                                subject=r.get("subject")))
    return check_unique_ids(recs, path)


LOADERS = {"mathvista": load_mathvista, "mathverse": load_mathverse,
           "mathvision": load_mathvision, "mmmu_pro": load_mmmu_pro}
