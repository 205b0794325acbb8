"""benchmarks.py: each loader on hand-made files in its published format; wrongly typed or
ambiguous fields, duplicate ids, empty and non-UTF-8 files are errors naming file, row and field."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from support import benchmarks as bm


def png(path, size=(56, 56), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def png_bytes(color=(10, 200, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def user_parts(rec):
    (msg,) = rec["messages"]
    assert msg["role"] == "user"
    return [p["image"] for p in msg["content"] if p["type"] == "image"], msg["content"][-1]["text"]


# -----------------------------------------------------------------------------
# loaders


def test_mathvista_testmini_json(tmp_path):
    png(tmp_path / "images/1.jpg")
    png(tmp_path / "images/2.png")
    d = {
        "1": {"question": "What is the angle?", "image": "images/1.jpg", "choices": ["30°", "45°", "60°"],
              "unit": None, "precision": None, "answer": "45°", "question_type": "multi_choice",
              "answer_type": "text", "pid": "1"},
        "2": {"question": "How long is the bar?", "image": "images/2.png", "choices": None, "unit": "cm",
              "precision": 1.0, "answer": "1.5", "question_type": "free_form", "answer_type": "float", "pid": "2"},
    }
    (tmp_path / "testmini.json").write_text(json.dumps(d))
    recs = bm.load_mathvista(str(tmp_path / "testmini.json"), str(tmp_path / "cache"))
    assert [r["id"] for r in recs] == ["1", "2"]
    assert recs[0]["answer"] == "B"  # the choice text "45°" -> its letter
    imgs, text = user_parts(recs[0])
    assert imgs == [str(tmp_path / "images/1.jpg")]
    assert "What is the angle?" in text and "(A) 30°" in text and "(B) 45°" in text and "(C) 60°" in text
    assert recs[1]["answer"] == "1.5" and "(Unit: cm)" in recs[1]["question"] and "1 decimal" in recs[1]["question"]
    assert "options" not in recs[1]


def test_mathvista_errors_name_file_and_record(tmp_path):
    png(tmp_path / "images/1.jpg")
    bad = [{"question": "q", "image": "images/1.jpg", "choices": ["a", "b"], "answer": "c", "question_type": "multi_choice"}]
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"a\.json:\[0\].*'c' is not one of the choices"):
        bm.load_mathvista(str(tmp_path / "a.json"), str(tmp_path / "cache"))
    (tmp_path / "b.json").write_text(json.dumps({"7": {"question": "q", "image": "images/none.jpg", "answer": "3"}}))
    with pytest.raises(ValueError, match=r"b\.json:\['7'\].*images/none\.jpg.*not found"):
        bm.load_mathvista(str(tmp_path / "b.json"), str(tmp_path / "cache"))
    (tmp_path / "c.json").write_text(json.dumps([{"question": "q", "image": "images/1.jpg"}]))
    with pytest.raises(ValueError, match=r"c\.json:\[0\]: missing field 'answer'"):
        bm.load_mathvista(str(tmp_path / "c.json"), str(tmp_path / "cache"))


def test_mathverse_testmini(tmp_path):
    png(tmp_path / "images/image_1.png")
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "As shown in the figure, find x.\nChoices:\nA:40°\nB:50°", "image": "image_1.png",
         "answer": "B", "question_type": "multi-choice", "question_for_eval": "find x. Choices: A:40° B:50°"},
        {"sample_index": "2", "problem_version": "Vision Only", "question": "",
         "question_for_eval": "What is the area?", "image": "image_1.png", "answer": "2\\sqrt{3}",
         "question_type": "free-form"},
        {"sample_index": "3", "problem_version": "Text Only", "question": "A square has side 2. Area?",
         "image": "", "answer": "4", "question_type": "free-form"},
    ]
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    recs = bm.load_mathverse(str(tmp_path / "testmini.json"), str(tmp_path / "cache"))
    assert [r["answer"] for r in recs] == ["B", "2\\sqrt{3}", "4"]
    imgs, text = user_parts(recs[0])
    assert imgs == [str(tmp_path / "images/image_1.png")] and text.startswith("As shown")  # found under images/
    assert user_parts(recs[1])[1] == "What is the area?"  # empty question -> question_for_eval
    assert user_parts(recs[2])[0] == []  # text-only version: no image


def test_mathvision_jsonl(tmp_path):
    png(tmp_path / "images/1.jpg")
    png(tmp_path / "images/2.jpg")
    rows = [{"id": "1", "question": "Which shape? <image1>", "options": ["circle", "square", "star"],
             "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2, "subject": "logic"},
            {"id": "2", "question": "How many dots?", "options": [], "image": "images/2.jpg", "answer": "12",
             "level": 1, "subject": "counting"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = bm.load_mathvision(str(tmp_path / "test.jsonl"), str(tmp_path / "cache"))
    assert [r["answer"] for r in recs] == ["C", "12"]
    assert "(C) star" in recs[0]["question"] and recs[0]["options"] == ["circle", "square", "star"]
    assert recs[1]["question"] == "How many dots?"
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(rows[0], answer="F")) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answer 'F' is not a letter of the 3 options"):
        bm.load_mathvision(str(tmp_path / "bad.jsonl"), str(tmp_path / "cache"))


def test_mmmu_pro_embedded_bytes(tmp_path):
    raw1, raw2 = png_bytes((10, 200, 10)), png_bytes((0, 0, 250))
    rows = [{"id": "validation_Art_1", "question": "Compare <image 1> and <image 2>. Which is older?",
             "options": "['the first', 'the second', \"neither's\"]", "answer": "B",
             "image_1": {"bytes": base64.b64encode(raw1).decode(), "path": "a.png"},
             "image_2": {"bytes": base64.b64encode(raw2).decode(), "path": "b.png"},
             "image_3": None, "subject": "Art"},
            {"id": "v_2", "image": {"bytes": base64.b64encode(raw1).decode(), "path": None},
             "options": "['1', '2', '3', '4']", "answer": "D", "subject": "Math"}]  # vision config
    (tmp_path / "mmmu.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = bm.load_mmmu_pro(str(tmp_path / "mmmu.jsonl"), str(tmp_path / "cache"))
    imgs, text = user_parts(recs[0])
    assert len(imgs) == 2 and open(imgs[0], "rb").read() == raw1 and open(imgs[1], "rb").read() == raw2
    assert recs[0]["options"] == ["the first", "the second", "neither's"] and "(C) neither's" in text
    assert recs[0]["answer"] == "B" and recs[1]["answer"] == "D"
    imgs1, _ = user_parts(recs[1])
    assert imgs1 == [imgs[0]]  # same bytes, one cached file
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(rows[0], options="['a', 'b'")) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'options' is not a list literal"):
        bm.load_mmmu_pro(str(tmp_path / "bad.jsonl"), str(tmp_path / "cache"))


def test_parquet(tmp_path):
    """The HF parquet form (image as {"bytes", "path"} struct) when pyarrow exists, else a clear error."""
    path = str(tmp_path / "testmini-00000-of-00001.parquet")
    row = {"pid": "5", "question": "Count.", "image": "images/5.jpg", "choices": None, "answer": "3",
           "question_type": "free_form", "answer_type": "integer", "precision": None, "unit": None,
           "decoded_image": {"bytes": png_bytes(), "path": "5.jpg"}}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        open(path, "wb").write(b"PAR1")
        with pytest.raises(SystemExit, match="parquet needs pyarrow or pandas"):
            bm.load_mathvista(path, str(tmp_path / "cache"))
        return
    pq.write_table(pa.Table.from_pylist([row]), path)
    (rec,) = bm.load_mathvista(path, str(tmp_path / "cache"))
    assert rec["answer"] == "3" and open(user_parts(rec)[0][0], "rb").read() == row["decoded_image"]["bytes"]


def test_loaded_records_encode(tmp_path):
    """The loaders' records go through data.py's prompt/encode path (the schema really fits)."""
    from support import data
    png(tmp_path / "images/1.jpg", size=(84, 56))
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "1", "question": "Q?", "options": ["x", "y"],
                                                     "image": "images/1.jpg", "answer": "A"}) + "\n")
    (rec,) = bm.load_mathvision(str(tmp_path / "test.jsonl"), str(tmp_path / "cache"))
    tok = data.train_tokenizer(["Which is it? (A) x (B) y Choices"] * 20, str(tmp_path / "tok"), vocab_size=300)
    enc = data.encode_messages(data.prompt_messages(rec, data.SYSTEM_PROMPT_REFLECT), tok, "/nonexistent",
                               add_generation_prompt=True)
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56x84 px -> 4x6 patches of 14 px
    assert (enc["input_ids"] == tok.image_pad_id).sum() == 6  # 2x2 merge -> 6 tokens
    text = tok.decode(enc["input_ids"])
    assert "(A) x\n(B) y" in text and text.endswith("<|im_start|>assistant\n") and "reflect" in text


# -----------------------------------------------------------------------------
# wrongly typed fields, ambiguous answers, duplicates, empty and non-UTF-8 files


def mathvision_row(**kw):
    return {"id": "1", "question": "Which?", "options": ["x", "y", "z"], "image": "images/1.jpg", "answer": "B", **kw}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("options,msg", [
    (3, r"field 'options' must be a list of options, got int"),
    ("ABC", r"field 'options' must be a list of options, got str 'ABC'"),  # not three options A, B, C
    ({"A": "x", "B": "y"}, r"field 'options' must be a list of options, got dict"),
    ([f"o{i}" for i in range(27)], r"field 'options' has 27 options, more than the 26 letters"),
    (["x", ["y"]], r"field 'options'\[1\] must be text, got list"),
])
def test_mathvision_wrongly_typed_options(tmp_path, options, msg):
    png(tmp_path / "images/1.jpg")
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(), mathvision_row(id="2", options=options)])
    with pytest.raises(ValueError, match=r"t\.jsonl:2: " + msg):
        bm.load_mathvision(path, str(tmp_path / "cache"))


def test_mathvista_choices_as_string_or_int(tmp_path):
    png(tmp_path / "images/1.jpg")
    row = {"question": "q", "image": "images/1.jpg", "answer": "A", "question_type": "multi_choice"}
    for choices, kind in (("ABC", "str"), (3, "int")):
        (tmp_path / "v.json").write_text(json.dumps([dict(row, choices=choices)]))
        with pytest.raises(ValueError, match=rf"v\.json:\[0\]: field 'choices' must be a list of options, got {kind}"):
            bm.load_mathvista(str(tmp_path / "v.json"), str(tmp_path / "cache"))


def test_answer_must_be_exactly_one_letter(tmp_path):
    """'AB' is a substring of 'ABC' but not an option letter; a lower-case or empty answer neither."""
    png(tmp_path / "images/1.jpg")
    for ans in ("AB", "ABC", "b"):
        path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(answer=ans)])
        with pytest.raises(ValueError, match=rf"t\.jsonl:1: answer '{ans}' is not a letter of the 3 options"):
            bm.load_mathvision(path, str(tmp_path / "cache"))
    rows = [{"id": "m", "question": "q", "options": "['a', 'b', 'c']", "answer": "AB", "image": "images/1.jpg"}]
    with pytest.raises(ValueError, match=r"m\.jsonl:1: answer 'AB' is not a letter of the 3 options"):
        bm.load_mmmu_pro(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "cache"))


def test_question_and_answer_types(tmp_path):
    png(tmp_path / "images/1.jpg")
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(question=["Which?"])])
    with pytest.raises(ValueError, match=r"t\.jsonl:1: field 'question' must be a string, got list"):
        bm.load_mathvision(path, str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(options=[], answer={"v": 3})])
    with pytest.raises(ValueError, match=r"t\.jsonl:1: field 'answer' must be a string, got dict"):
        bm.load_mathvision(path, str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(options=[], answer=12)])
    assert bm.load_mathvision(path, str(tmp_path / "cache"))[0]["answer"] == "12"  # a number is its text
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(image=7)])
    with pytest.raises(ValueError, match=r"t\.jsonl:1: image must be a path, bytes or .*got int"):
        bm.load_mathvision(path, str(tmp_path / "cache"))


def test_duplicate_ids_and_empty_files(tmp_path):
    png(tmp_path / "images/1.jpg")
    path = write_jsonl(tmp_path / "t.jsonl", [mathvision_row(), mathvision_row(id="2"), mathvision_row()])
    with pytest.raises(ValueError, match=r"t\.jsonl:3: duplicate id '1' \(first at .*t\.jsonl:1\)"):
        bm.load_mathvision(path, str(tmp_path / "cache"))
    (tmp_path / "v.json").write_text(json.dumps({"5": {"question": "q", "image": "images/1.jpg", "answer": "1"},
                                                 "6": {"question": "q", "image": "images/1.jpg", "answer": "2",
                                                       "pid": "5"}}))
    with pytest.raises(ValueError, match=r"duplicate id '5'"):
        bm.load_mathvista(str(tmp_path / "v.json"), str(tmp_path / "cache"))
    for name, text in (("e.jsonl", "\n\n"), ("e.json", "[]"), ("f.json", "{}")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no records \(empty benchmark file\)"):
            bm.load_mathvision(str(tmp_path / name), str(tmp_path / "cache"))


def test_non_utf8_and_non_object_rows(tmp_path):
    png(tmp_path / "images/1.jpg")
    good = json.dumps(mathvision_row()).encode()
    (tmp_path / "t.jsonl").write_bytes(good + b"\n" + good.replace(b"Which?", b"Which\xff?") + b"\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not valid UTF-8"):
        bm.load_mathvision(str(tmp_path / "t.jsonl"), str(tmp_path / "cache"))
    (tmp_path / "v.json").write_bytes(b'[\n {"question": "caf\xe9", "image": "images/1.jpg", "answer": "1"}\n]')
    with pytest.raises(ValueError, match=r"v\.json:2: not valid UTF-8"):
        bm.load_mathvista(str(tmp_path / "v.json"), str(tmp_path / "cache"))
    (tmp_path / "l.json").write_text('[["not", "a", "record"]]')
    with pytest.raises(ValueError, match=r"l\.json:\[0\]: expected a JSON object \(a record\), got list"):
        bm.load_mathvista(str(tmp_path / "l.json"), str(tmp_path / "cache"))
