"""eval.py: benchmark loaders on hand-made files in each published format, metric aggregation
against hand-computed values, the training-curve PNG, and a tiny random model end to end."""
import base64
import io
import json
import math
import os
import struct
import zlib

import pytest
from PIL import Image

import eval as ev
import reward


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
    recs = ev.load_mathvista(str(tmp_path / "testmini.json"), str(tmp_path / "cache"))
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
        ev.load_mathvista(str(tmp_path / "a.json"), str(tmp_path / "cache"))
    (tmp_path / "b.json").write_text(json.dumps({"7": {"question": "q", "image": "images/none.jpg", "answer": "3"}}))
    with pytest.raises(ValueError, match=r"b\.json:\['7'\].*images/none\.jpg.*not found"):
        ev.load_mathvista(str(tmp_path / "b.json"), str(tmp_path / "cache"))
    (tmp_path / "c.json").write_text(json.dumps([{"question": "q", "image": "images/1.jpg"}]))
    with pytest.raises(ValueError, match=r"c\.json:\[0\]: missing field 'answer'"):
        ev.load_mathvista(str(tmp_path / "c.json"), str(tmp_path / "cache"))


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
    recs = ev.load_mathverse(str(tmp_path / "testmini.json"), str(tmp_path / "cache"))
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
    recs = ev.load_mathvision(str(tmp_path / "test.jsonl"), str(tmp_path / "cache"))
    assert [r["answer"] for r in recs] == ["C", "12"]
    assert "(C) star" in recs[0]["question"] and recs[0]["options"] == ["circle", "square", "star"]
    assert recs[1]["question"] == "How many dots?"
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(rows[0], answer="F")) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answer 'F' is not a letter of the 3 options"):
        ev.load_mathvision(str(tmp_path / "bad.jsonl"), str(tmp_path / "cache"))


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
    recs = ev.load_mmmu_pro(str(tmp_path / "mmmu.jsonl"), str(tmp_path / "cache"))
    imgs, text = user_parts(recs[0])
    assert len(imgs) == 2 and open(imgs[0], "rb").read() == raw1 and open(imgs[1], "rb").read() == raw2
    assert recs[0]["options"] == ["the first", "the second", "neither's"] and "(C) neither's" in text
    assert recs[0]["answer"] == "B" and recs[1]["answer"] == "D"
    imgs1, _ = user_parts(recs[1])
    assert imgs1 == [imgs[0]]  # same bytes, one cached file
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(rows[0], options="['a', 'b'")) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'options' is not a list literal"):
        ev.load_mmmu_pro(str(tmp_path / "bad.jsonl"), str(tmp_path / "cache"))


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
            ev.load_mathvista(path, str(tmp_path / "cache"))
        return
    pq.write_table(pa.Table.from_pylist([row]), path)
    (rec,) = ev.load_mathvista(path, str(tmp_path / "cache"))
    assert rec["answer"] == "3" and open(user_parts(rec)[0][0], "rb").read() == row["decoded_image"]["bytes"]


def test_loaded_records_encode(tmp_path):
    """The loaders' records go through data.py's prompt/encode path (the schema really fits)."""
    import data
    png(tmp_path / "images/1.jpg", size=(84, 56))
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "1", "question": "Q?", "options": ["x", "y"],
                                                     "image": "images/1.jpg", "answer": "A"}) + "\n")
    (rec,) = ev.load_mathvision(str(tmp_path / "test.jsonl"), str(tmp_path / "cache"))
    tok = data.train_tokenizer(["Which is it? (A) x (B) y Choices"] * 20, str(tmp_path / "tok"), vocab_size=300)
    enc = data.encode_messages(data.prompt_messages(rec, data.SYSTEM_PROMPT_REFLECT), tok, "/nonexistent",
                               add_generation_prompt=True)
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56x84 px -> 4x6 patches of 14 px
    assert (enc["input_ids"] == tok.image_pad_id).sum() == 6  # 2x2 merge -> 6 tokens
    text = tok.decode(enc["input_ids"])
    assert "(A) x\n(B) y" in text and text.endswith("<|im_start|>assistant\n") and "reflect" in text


# -----------------------------------------------------------------------------
# metrics


def test_pass_at_k():
    assert ev.pass_at_k(4, 0, 1) == 0.0 and ev.pass_at_k(4, 4, 2) == 1.0
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert ev.pass_at_k(5, 2, 4) == 1.0  # fewer than k wrong samples


def two_pass(a1, a2):
    return (f"<think>count the shapes one by one</think>\n<answer>{a1}</answer>\n<reflection>check the "
            f"count again</reflection>\n<think>count again carefully</think>\n<answer>{a2}</answer>")


def test_aggregate_known_predictions():
    """Fixed responses with known cases -> metrics equal the hand-computed ones."""
    records = [{"id": str(i), "answer": a} for i, a in enumerate(["3", "5", "B", "7", "1/2", "4"])]
    gens = [
        two_pass("2", "3"),                                        # w2r, format ok
        two_pass("5", "5"),                                        # r2r, format ok
        two_pass("(B)", "C"),                                      # r2w, format ok
        two_pass("8", "9"),                                        # w2w, format ok
        "<think>half</think><answer>\\frac{1}{2}</answer>",        # single, correct
        "I think it is 4",                                         # none
    ]
    lengths = [40, 30, 20, 10, 8, 6]
    gens = [dict(text=t, length=n, finish="stop" if n != 6 else "length") for t, n in zip(gens, lengths)]
    cfg = ev.EvalConfig(prompt="reflect")
    preds = ev.score_predictions(records, gens, cfg, count_tokens=lambda s: len(s.split()),
                                  reward_cfg=reward.RewardConfig(preset="code"))  # the values below are the code preset's
    assert [p["case"] for p in preds] == ["w2r", "r2r", "r2w", "w2w", "single", "none"]
    assert [p["first_correct"] for p in preds] == [False, True, True, False, True, False]
    assert [p["final_correct"] for p in preds] == [True, True, False, False, True, False]
    assert preds[0]["first_answer"] == "2" and preds[0]["final_answer"] == "3"
    m = ev.aggregate(preds, n=1)
    assert m["n_questions"] == 6 and m["n_samples"] == 6
    assert m["first_acc"] == pytest.approx(3 / 6) and m["final_acc"] == pytest.approx(3 / 6)
    assert (m["w2r"], m["r2r"], m["r2w"], m["w2w"], m["single"], m["none"]) == (1, 1, 1, 1, 1, 1)
    assert m["format"] == pytest.approx(4 / 6)
    assert m["mean_len"] == pytest.approx(114 / 6) and m["truncated"] == pytest.approx(1 / 6)
    # reward: two-pass ones 0.5 format + accuracy (1, .75, .25, 0) + 0.1 * length term. Word counts:
    # S = 6 (first think) + 1 (first answer) = 7, L = 15 words, T = 14, Tmax = 17.5;
    # single correct 0.5; none 0
    r_len = math.exp(-((15 - 14) / (17.5 - 14)) ** 2)
    assert m["mean_reward"] == pytest.approx((0.5 * 4 + 2.0 + 0.4 * r_len + 0.5) / 6)
    assert [p["reward"] for p in preds][4:] == [0.5, 0.0]
    # the single prompt judges format against <think><answer>: only response 4 complies
    preds_s = ev.score_predictions(records, gens, ev.EvalConfig(prompt="single"), count_tokens=lambda s: len(s.split()))
    assert [p["format_ok"] for p in preds_s] == [False, False, False, False, True, False]
    table = ev.format_table([dict(checkpoint="ck", dataset="test", metrics=m)])
    assert "ck" in table and "0.500" in table and "0.667" in table


def test_options_and_bad_answers(capsys):
    """Benchmark records carry options: the option's text counts as its letter. A record whose
    answer reward.py cannot read is skipped and reported, never scored."""
    recs = [{"id": "m1", "answer": "B", "options": ["30°", "45°"]}, {"id": "m2", "answer": "???"}]
    good, bad = ev.check_answers("mathvista", recs)
    assert [r["id"] for r in good] == ["m1"] and len(bad) == 1 and bad[0].startswith("m2:")
    assert "1 record(s) with an unparsable answer" in capsys.readouterr().err
    gens = [dict(text="<think>it is 45</think><answer>45°</answer>", length=5, finish="stop")]
    (p,) = ev.score_predictions(good, gens, ev.EvalConfig(prompt="single"), count_tokens=len)
    assert p["final_correct"] and p["case"] == "single" and p["format_ok"]


def test_aggregate_pass_at_k():
    records = [{"id": "a", "answer": "3"}, {"id": "b", "answer": "6"}]
    texts = [two_pass("3", "3"), two_pass("1", "3"), two_pass("1", "2"), two_pass("1", "2"),   # 2 of 4 right
             two_pass("6", "5"), two_pass("6", "5"), two_pass("6", "5"), two_pass("0", "5")]   # 0 of 4 right
    gens = [dict(text=t, length=10, finish="stop") for t in texts]
    preds = ev.score_predictions(records, gens, ev.EvalConfig(n=4), count_tokens=lambda s: len(s.split()))
    assert [p["sample"] for p in preds] == [0, 1, 2, 3] * 2 and [p["id"] for p in preds] == ["a"] * 4 + ["b"] * 4
    m = ev.aggregate(preds, n=4)
    assert m["n_questions"] == 2 and m["final_acc"] == pytest.approx(2 / 8) and m["first_acc"] == pytest.approx(4 / 8)
    assert (m["w2r"], m["r2r"], m["r2w"], m["w2w"]) == (1, 1, 3, 3)
    assert m["pass@1"] == pytest.approx((0.5 + 0) / 2) and m["pass@4"] == pytest.approx((1 + 0) / 2)


# -----------------------------------------------------------------------------
# plot


def png_size(path):
    b = open(path, "rb").read()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    assert zlib.crc32(b[12:29]) == struct.unpack(">I", b[29:33])[0]  # IHDR chunk CRC
    return struct.unpack(">II", b[16:24])


def test_plot_png(tmp_path):
    sft, grpo = tmp_path / "sft" / "log.jsonl", tmp_path / "grpo" / "log.jsonl"
    os.makedirs(sft.parent), os.makedirs(grpo.parent)
    sft.write_text("".join(json.dumps({"step": s, "loss": 3.0 / (s + 1), "lr": 1e-4}) + "\n" for s in range(20)))
    grpo.write_text("".join(json.dumps({"step": s, "reward": 0.5 + 0.05 * s, "acc_final": 0.1 * s, "resp_len": 100 - s,
                                        "kl_ref": 0.001 * s, "case_w2r": s, "note": "x"}) + "\n" for s in range(10))
                    + json.dumps({"step": 10, "eval": True, "test_reward": 0.7}) + "\n")
    out = tmp_path / "plots" / "curves.png"
    ev.main(["--plot", str(sft), str(grpo), "--out", str(out)])
    w, h = png_size(out)
    img = Image.open(out).convert("RGB")
    # 6 panels (reward, test_reward, acc_final, resp_len, kl_ref, loss) in 2 columns
    assert img.size == (w, h) == (960, 3 * 300 + 24)
    colors = set(img.getdata())
    assert ev.COLORS[0] in colors and ev.COLORS[1] in colors  # both logs drew lines


# -----------------------------------------------------------------------------
# end to end: a tiny random model through eval.py on built-in task records


@pytest.mark.slow
def test_eval_end_to_end_tiny_model(tmp_path, capsys):
    import torch
    import data
    import model as qwen
    import task
    train, test = task.make_task(str(tmp_path / "task"), task.TaskConfig(n_train=8, n_test=4, difficulty=1, seed=0))
    recs = data.read_jsonl(test)
    tok = data.train_tokenizer([data.render_chat(r["messages"]) for r in data.read_jsonl(train)],
                               str(tmp_path / "tok"), vocab_size=400)
    torch.manual_seed(0)
    cfg = qwen.tiny_config(tok.vocab_size, tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.eos_ids)
    qwen.save_pretrained(qwen.Qwen2_5_VL(cfg), str(tmp_path / "ck"), tokenizer_dir=str(tmp_path / "tok"))
    png(tmp_path / "mv" / "images/1.jpg", size=(70, 50))
    (tmp_path / "mv" / "test.jsonl").write_text(json.dumps({"id": "1", "question": "Which?", "options": ["a", "b"],
                                                            "image": "images/1.jpg", "answer": "B"}) + "\n")
    out = tmp_path / "eval"
    ev.main(["--model", str(tmp_path / "ck"), "--data", test, "--bench", f"mathvision={tmp_path}/mv/test.jsonl",
             "--out", str(out), "--max-new-tokens", "12", "--batch-size", "3"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["checkpoint", "dataset", "n", "first", "final"]
    assert table[2].split()[:3] == ["ck", "test", str(len(recs))] and table[3].split()[:3] == ["ck", "mathvision", "1"]
    res = json.loads((out / "metrics.json").read_text())["results"]
    assert [(r["dataset"], r["metrics"]["n_questions"]) for r in res] == [("test", len(recs)), ("mathvision", 1)]
    assert (out / "predictions" / "ck__mathvision.jsonl").exists()
    preds = [json.loads(l) for l in open(out / "predictions" / "ck__test.jsonl")]
    assert [p["id"] for p in preds] == [r["id"] for r in recs]
    assert all(0 < p["length"] <= 12 for p in preds)
    # greedy: eval's responses are the sampler's, decoded in order (same batch composition)
    import sampler
    m = qwen.from_pretrained(str(tmp_path / "ck"))
    enc = [data.encode_messages(data.prompt_messages(r, data.SYSTEM_PROMPT_REFLECT), tok, os.path.dirname(test),
                                add_generation_prompt=True) for r in recs[:3]]
    g = sampler.generate(m, data.collate(enc, tok.pad_id, left_pad=True), tok.eos_ids,
                         sampler.SampleConfig(max_new_tokens=12, greedy=True, seed=0))
    for row in range(3):
        ids = g["tokens"][row, :int(g["lengths"][row])].tolist()
        while ids and ids[-1] in tok.eos_ids:
            ids.pop()
        assert preds[row]["response"] == tok.decode(ids) and preds[row]["length"] == len(ids)


def test_plot_keys(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "a": s, "b": -s}) + "\n" for s in range(3)))
    ev.main(["--plot", str(log), "--keys", "b", "--out", str(tmp_path / "p.png")])
    assert png_size(tmp_path / "p.png") == (480, 300 + 24)
    with pytest.raises(SystemExit, match=r"no numeric field \['c'\]"):
        ev.main(["--plot", str(log), "--keys", "c", "--out", str(tmp_path / "q.png")])


def test_shuffle_images_blind_control():
    """--shuffle-images: record i keeps its question and answer but gets record i+1's image
    (cyclic); the input records are not modified; a record with a different number of images
    than the next one is an error naming it."""
    def rec(i, n_img=1):
        return {"id": f"r{i}", "answer": str(i), "messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{i}_{k}.png"} for k in range(n_img)]
             + [{"type": "text", "text": f"q{i}"}]}]}
    recs = [rec(i) for i in range(3)]
    out = ev.with_next_images(recs)
    assert [user_parts(r) for r in out] == [(["img1_0.png"], "q0"), (["img2_0.png"], "q1"), (["img0_0.png"], "q2")]
    assert [r["answer"] for r in out] == ["0", "1", "2"]
    assert recs[0]["messages"][0]["content"][0]["image"] == "img0_0.png"
    with pytest.raises(ValueError, match="r1"):
        ev.with_next_images([rec(0), rec(1, n_img=2)])


def test_scene_acc_on_builtin_task_records():
    """Built-in task records (they carry a scene): a response counts as seeing the scene when its
    first 'shapes:' list names exactly the scene's objects in the task's order (red green blue
    yellow; circle square triangle). Records without a scene get no scene metric."""
    scene = {"size": 56, "grid": 2, "objects": [
        {"color": "blue", "shape": "circle", "row": 0, "col": 0},
        {"color": "red", "shape": "triangle", "row": 1, "col": 1},
        {"color": "red", "shape": "circle", "row": 0, "col": 1}]}
    rec = {"id": "t0", "answer": "2", "scene": scene}
    right = "<think>shapes: 1 red circle, 2 red triangle, 3 blue circle. red: 1 circle, 2 triangle. red 2</think>\n<answer>2</answer>"
    missed = "<think>shapes: 1 red circle, 2 blue circle. red: 1 circle. red 1</think>\n<answer>1</answer>"
    by_place = "<think>shapes: 1 blue circle, 2 red circle, 3 red triangle. red 2</think>\n<answer>2</answer>"
    gens = [dict(text=t, length=10, finish="stop") for t in (right, missed, by_place)]
    cfg = ev.EvalConfig(prompt="single", n=3)
    preds = ev.score_predictions([rec], gens, cfg, count_tokens=lambda s: len(s.split()))
    assert [p["scene_ok"] for p in preds] == [True, False, False]
    m = ev.aggregate(preds, 3)
    assert m["scene_acc"] == pytest.approx(1 / 3) and m["final_acc"] == pytest.approx(2 / 3)
    plain = ev.score_predictions([{"id": "x", "answer": "2"}], gens[:1], ev.EvalConfig(prompt="single"),
                                 count_tokens=lambda s: 1)
    assert "scene_ok" not in plain[0] and "scene_acc" not in ev.aggregate(plain, 1)
    assert "scene_acc" in ev.format_table([dict(checkpoint="c", dataset="d", metrics=m)])
