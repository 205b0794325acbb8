"""Bad records are found before any work (data.validate_records), never when first drawn: each
hostile variant below is refused at start naming file:line and field, or dropped and counted with
skip_bad; outputs are strict JSON. The stages' own use of the check: test_grpo.py, test_sft.py,
test_eval.py, test_reflect_data.py."""
import io
import json
import os
import re
import struct
import zlib

import pytest
from PIL import Image

from support import data

QUESTION = "How many red shapes are there?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return data.train_tokenizer([data.SYSTEM_PROMPT_REFLECT, QUESTION] * 20, str(d), vocab_size=300)


def record(i, image="img/ok.png", question=QUESTION, **kw):
    return {"id": f"q{i}", "answer": "3", "question": question, **kw, "messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]}


def png_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def lying_png(w, h):
    """A small valid PNG whose header claims w x h pixels (a decompression bomb needs no more: PIL
    sizes its buffer from the header)."""
    b = bytearray(png_bytes((8, 8)))
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


# name -> (image files to write {relpath: bytes}, the bad record's JSON line, the reason expected)
VARIANTS = {
    "zero-byte image": ({"img/zero.png": b""}, json.dumps(record(1, "img/zero.png")),
                        r"^messages\[0\]\.content\[0\]\.image: cannot read image .*zero\.png: UnidentifiedImageError"),
    "truncated png": ({"img/cut.png": png_bytes()[:900]}, json.dumps(record(1, "img/cut.png")),
                      r"^messages\[0\]\.content\[0\]\.image: cannot read image .*cut\.png"),
    "truncated jpeg": ({"img/cut.jpg": jpeg_bytes()[:700]}, json.dumps(record(1, "img/cut.jpg")),
                       r"^messages\[0\]\.content\[0\]\.image: cannot read image .*cut\.jpg: OSError: image file is truncated"),
    "not an image": ({"img/text.png": b"\x89PNG\r\n\x1a\n not a png"}, json.dumps(record(1, "img/text.png")),
                     r"^messages\[0\]\.content\[0\]\.image: cannot read image .*text\.png"),
    "missing image": ({}, json.dumps(record(1, "img/nope.png")),
                      r"^messages\[0\]\.content\[0\]\.image: image file not found: .*nope\.png"),
    "image without a path": ({}, json.dumps({**record(1), "messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}]}),
        r"^messages\[0\]\.content\[0\]\.image: must be an image path string, got NoneType"),
    "bomb over PIL's limit": ({"img/bomb.png": lying_png(100_000, 100_000)}, json.dumps(record(1, "img/bomb.png")),
                              r"^messages\[0\]\.content\[0\]\.image: cannot read image .*bomb\.png: DecompressionBombError"),
    "bomb over the pixel cap": ({"img/big.png": lying_png(9000, 9000)}, json.dumps(record(1, "img/big.png")),
                                r"^messages\[0\]\.content\[0\]\.image: image .*big\.png is 9000x9000 = 81,000,000 "
                                r"pixels, over the cap of 67,108,864"),
    "1x300 strip": ({"img/strip.png": png_bytes((300, 1))}, json.dumps(record(1, "img/strip.png")),
                    r"^messages\[0\]\.content\[0\]\.image: image img/strip\.png: image aspect ratio must be <= 200"),
    "control token in the question text": ({}, json.dumps(record(1, question=QUESTION + "<|im_end|>")),
                                           r"^field 'question' contains the control token '<\|im_end\|>'"),
    "control token in a message": ({}, json.dumps({**record(1), "messages": [{"role": "user", "content": [
        {"type": "image", "image": "img/ok.png"}, {"type": "text", "text": "<|image_pad|> " + QUESTION}]}]}),
        r"^messages\[0\]\.content\[1\]\.text: text contains the control token '<\|image_pad\|>'"),
    "made-up control token": ({}, json.dumps({**record(1), "messages": [{"role": "user", "content": "a <|x|> b"}]}),
                              r"^messages\[0\]\.content: text contains the control token '<\|x\|>'"),
    "messages not a list": ({}, json.dumps({**record(1), "messages": "hello"}),
                            r"^field 'messages' missing or not a list"),
    "message not an object": ({}, json.dumps({**record(1), "messages": ["hello"]}),
                              r"^messages\[0\] must be an object, got str"),
    "no user turn": ({}, json.dumps({**record(1), "messages": [{"role": "system", "content": "s"}]}),
                     r"^'messages' has no user turn"),
    "3.6M-character question": ({}, json.dumps({**record(1, question="q"), "messages": [
        {"role": "user", "content": "How many? " * 360_000}]}),
        r"^field 'messages': 3,60\d,\d{3} characters of text, over the cap of 1,048,576"),
    "question over the token cap": ({}, json.dumps({**record(1, question="q"), "messages": [
        {"role": "user", "content": (QUESTION + " ") * 3300}]}),
        r"^field 'messages': \d+ tokens \(text and images\), over the cap of 16384"),
    "NaN answer": ({}, json.dumps(record(1)).replace('"answer": "3"', '"answer": NaN'),
                   r"^field 'answer': NaN / Infinity is not a JSON number"),
    "Infinity deep in a record": ({}, json.dumps(record(1, scene={"objects": [{"x": 1}, {"x": 2}]})).replace(
        '"x": 2', '"x": -Infinity'), r"^field 'scene\.objects\[1\]\.x': NaN / Infinity"),
    "1e400 answer": ({}, json.dumps(record(1)).replace('"answer": "3"', '"answer": 1e400'),
                     r"^field 'answer': NaN / Infinity"),
    "no answer": ({}, json.dumps({k: v for k, v in record(1).items() if k != "answer"}), r"^field 'answer' missing"),
    "unreadable answer": ({}, json.dumps(record(1)).replace('"answer": "3"', '"answer": ""'), r"^field 'answer'"),
    "lone surrogate": ({}, json.dumps(record(1, question="q")).replace('"text": "q"', '"text": "a \\ud800 b"'),
                       r"^messages\[0\]\.content\[1\]\.text: not valid Unicode \(a lone surrogate at character 3\)"),
    "video part": ({}, json.dumps({**record(1), "messages": [{"role": "user", "content": [
        {"type": "video", "video": "v.mp4"}, {"type": "text", "text": QUESTION}]}]}),
        r"^messages\[0\]\.content\[0\]: a video part; only images are supported"),
    "options of the wrong type": ({}, json.dumps(record(1, options=5)), r"^field 'options' must be a list of strings"),
    "invalid JSON": ({}, '{"id": "q1", "messages": [}', r"^invalid JSON"),
    "not an object": ({}, '["q1"]', r"^expected a JSON object, got list"),
}


def write_set(d, files, bad_line):
    """train.jsonl: good record q0, the bad line, good record q2; images relative to d."""
    os.makedirs(d / "img", exist_ok=True)
    (d / "img" / "ok.png").write_bytes(png_bytes())
    for rel, b in files.items():
        (d / rel).write_bytes(b)
    p = d / "train.jsonl"
    p.write_text("\n".join([json.dumps(record(0)), bad_line, json.dumps(record(2))]) + "\n")
    return str(p)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bad_record_refused_at_start_or_skipped(tok, tmp_path, capsys, name):
    """data.load_records (grpo.py's loader, on the prompt grpo.py encodes): the bad record is refused
    at load with one line naming file:line and the field; with skip_bad it is dropped and counted,
    and every record kept encodes as a step would encode it."""
    files, line, want = VARIANTS[name]
    path = write_set(tmp_path, files, line)
    with pytest.raises(data.BadRecords) as e:
        data.load_records(path, tok, data.SYSTEM_PROMPT_REFLECT)
    (where, reason), = e.value.bad
    assert where == f"{path}:2" and re.search(want, reason), reason
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and "\n" not in msg and "--skip_bad_records" in msg
    recs = data.load_records(path, tok, data.SYSTEM_PROMPT_REFLECT, skip_bad=True, prog="grpo.py")
    assert [r["id"] for r in recs] == ["q0", "q2"]
    assert f"grpo.py: {path}: skipped 1 bad record(s) of 3 (--skip_bad_records): {path}:2: " in capsys.readouterr().err
    for r in recs:
        data.encode_prompt(r, tok, data.SYSTEM_PROMPT_REFLECT)


def test_many_bad_records_listed_first_20_and_counted(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({**record(i), "messages": "hello"} if i % 2 else record(i)) + "\n" for i in range(60)))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png_bytes())
    with pytest.raises(data.BadRecords) as e:
        data.load_records(str(p))
    lines = str(e.value).split("\n")
    assert lines[0] == f"{p}: 30 bad records of 60 (fix them, or pass --skip_bad_records to drop them):"
    assert [l.strip().split(": ")[0] for l in lines[1:21]] == [f"{p}:{i}" for i in range(2, 41, 2)]
    assert lines[21].strip() == "... and 10 more" and len(lines) == 22 and len(e.value.bad) == 30
    # all bad: refused even with skip_bad, nothing to work on
    p.write_text(json.dumps({**record(0), "messages": "hello"}) + "\n")
    with pytest.raises(data.BadRecords, match="no usable record"):
        data.load_records(str(p), skip_bad=True)


def test_token_count_is_encode_messages_count(tok, tmp_path):
    """validate_records counts tokens as encode_messages does (text pieces + image tokens): the cap
    at exactly that count passes, one less refuses, for several image sizes and the system prompt."""
    os.makedirs(tmp_path / "img")
    for i, size in enumerate([(64, 48), (300, 200), (57, 1000)]):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(size))
        rec = record(i, f"img/{i}.png")
        pairs = [(f"t.jsonl:{i + 1}", rec)]
        n = len(data.encode_prompt(dict(rec, _where="x", _root=str(tmp_path)), tok, data.SYSTEM_PROMPT_REFLECT)["input_ids"])
        kw = dict(messages=lambda r, w: data.prompt_messages(r, data.SYSTEM_PROMPT_REFLECT, w), image_root=str(tmp_path),
                  add_generation_prompt=True)
        assert data.validate_records(pairs, "t.jsonl", tok, max_tokens=n, **kw)[0] == pairs
        with pytest.raises(data.BadRecords, match=rf"{n} tokens \(text and images\), over the cap of {n - 1}"):
            data.validate_records(pairs, "t.jsonl", tok, max_tokens=n - 1, **kw)


def test_each_image_checked_once(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png_bytes())
    seen = []
    real = data.check_image_file
    monkeypatch.setattr(data, "check_image_file", lambda p, m: seen.append(p) or real(p, m))
    pairs = [(f"t.jsonl:{i}", record(i)) for i in range(5)]
    assert len(data.validate_records(pairs, str(tmp_path / "t.jsonl"))[0]) == 5 and len(seen) == 1


def test_load_image_refuses_over_the_pixel_cap(tmp_path):
    """The run's own image loader applies the same cap before decoding (a file swapped after the check)."""
    (tmp_path / "big.png").write_bytes(lying_png(9000, 9000))
    with pytest.raises(ValueError, match=r"t\.jsonl:4: cannot read image .*big\.png: .*9000x9000 pixels, over the cap"):
        data.load_image(str(tmp_path / "big.png"), "t.jsonl:4")


def test_outputs_are_strict_json(tmp_path):
    """append_jsonl (reflect_data.py's samples) refuses NaN / Infinity instead of writing a line that
    is not JSON; write_json_atomic writes them as null."""
    p = str(tmp_path / "o.jsonl")
    data.append_jsonl(p, {"a": 1.5})
    with pytest.raises(ValueError, match="not JSON compliant"):
        data.append_jsonl(p, {"a": float("nan")})
    data.write_json_atomic(str(tmp_path / "m.json"), {"a": float("inf")})
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert [json.loads(l, **strict) for l in open(p)] == [{"a": 1.5}]
    assert json.loads(open(tmp_path / "m.json").read(), **strict) == {"a": None}


def test_benchmark_nan_answer_refused():
    """eval.py --bench: a published file's NaN answer is refused naming the row, not read as the text "nan"."""
    from support import benchmarks
    with pytest.raises(ValueError, match=r"b\.jsonl:3: field 'answer': NaN / Infinity is not a JSON number"):
        benchmarks.text_field(json.loads('{"answer": NaN}'), "answer", "b.jsonl:3")
    assert benchmarks.text_field({"answer": 2.5}, "answer", "b.jsonl:3") == "2.5"
