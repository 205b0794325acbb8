"""eval.py: metric aggregation against hand-computed values, --metric functions passed in, the
command line's refusals (bad checkpoints, flags, devices), and a tiny random model end to end.
(The benchmark loaders' tests are in test_benchmarks.py.)"""
import json
import math
import os

import pytest

import eval as ev
from test_benchmarks import png, user_parts
import reward
from support.config import load_function


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
    gens = [ev.Response(text=t, length=n, finish="stop" if n != 6 else "length") for t, n in zip(gens, lengths)]
    cfg = ev.EvalConfig(prompt="reflect")
    preds = ev.score_predictions(records, gens, cfg, count_tokens=lambda s: len(s.split()),
                                  reward_cfg=reward.RewardConfig(preset="code"))  # the values below are the code preset's
    assert [p.case for p in preds] == ["w2r", "r2r", "r2w", "w2w", "single", "none"]
    assert [p.first_correct for p in preds] == [False, True, True, False, True, False]
    assert [p.final_correct for p in preds] == [True, True, False, False, True, False]
    assert preds[0].first_answer == "2" and preds[0].final_answer == "3"
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
    assert [p.reward for p in preds][4:] == [0.5, 0.0]
    # the single prompt judges format against <think><answer>: only response 4 complies
    preds_s = ev.score_predictions(records, gens, ev.EvalConfig(prompt="single"), count_tokens=lambda s: len(s.split()))
    assert [p.format_ok for p in preds_s] == [False, False, False, False, True, False]
    table = ev.format_table([dict(checkpoint="ck", dataset="test", metrics=m)])
    assert "ck" in table and "0.500" in table and "0.667" in table


def test_options_and_bad_answers(capsys):
    """Benchmark records carry options: the option's text counts as its letter. A record whose
    answer reward.py cannot read is skipped and reported, never scored."""
    recs = [{"id": "m1", "answer": "B", "options": ["30°", "45°"]}, {"id": "m2", "answer": "???"}]
    good, bad = ev.check_answers("mathvista", recs)
    assert [r["id"] for r in good] == ["m1"] and len(bad) == 1 and bad[0].startswith("m2:")
    assert "1 record(s) with an unparsable answer" in capsys.readouterr().err
    gens = [ev.Response(text="<think>it is 45</think><answer>45°</answer>", length=5, finish="stop")]
    (p,) = ev.score_predictions(good, gens, ev.EvalConfig(prompt="single"), count_tokens=len)
    assert p.final_correct and p.case == "single" and p.format_ok


def test_aggregate_pass_at_k():
    records = [{"id": "a", "answer": "3"}, {"id": "b", "answer": "6"}]
    texts = [two_pass("3", "3"), two_pass("1", "3"), two_pass("1", "2"), two_pass("1", "2"),   # 2 of 4 right
             two_pass("6", "5"), two_pass("6", "5"), two_pass("6", "5"), two_pass("0", "5")]   # 0 of 4 right
    gens = [ev.Response(text=t, length=10, finish="stop") for t in texts]
    preds = ev.score_predictions(records, gens, ev.EvalConfig(n=4), count_tokens=lambda s: len(s.split()))
    assert [p.sample for p in preds] == [0, 1, 2, 3] * 2 and [p.id for p in preds] == ["a"] * 4 + ["b"] * 4
    m = ev.aggregate(preds, n=4)
    assert m["n_questions"] == 2 and m["final_acc"] == pytest.approx(2 / 8) and m["first_acc"] == pytest.approx(4 / 8)
    assert (m["w2r"], m["r2r"], m["r2w"], m["w2w"]) == (1, 1, 3, 3)
    assert m["pass@1"] == pytest.approx((0.5 + 0) / 2) and m["pass@4"] == pytest.approx((1 + 0) / 2)


# -----------------------------------------------------------------------------
# end to end: a tiny random model through eval.py on built-in task records


@pytest.mark.slow
def test_eval_end_to_end_tiny_model(tmp_path, capsys):
    import torch
    from support import data
    import model as qwen
    from demo import task
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
    # greedy: eval's responses are the sampler's, decoded in order (same batch composition); the one
    # end-of-sequence rule: the final eos counts in the length and is not in the text
    import sampler
    m = qwen.from_pretrained(str(tmp_path / "ck"))
    enc = [data.encode_messages(data.prompt_messages(r, data.SYSTEM_PROMPT_REFLECT), tok, os.path.dirname(test),
                                add_generation_prompt=True) for r in recs[:3]]
    g = sampler.generate(m, data.collate(enc, tok.pad_id, left_pad=True), tok.eos_ids,
                         sampler.SampleConfig(max_new_tokens=12, greedy=True, seed=0))
    for row in range(3):
        ids = g["tokens"][row, :int(g["lengths"][row])].tolist()
        if g["finish_reasons"][row] == "stop":
            assert ids[-1] in tok.eos_ids
            ids.pop()
        assert preds[row]["response"] == tok.decode(ids) and preds[row]["length"] == int(g["lengths"][row])


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


def scene_list_ok(record, response):
    """What the lead's task.scene_list_ok adapter does (eval.py never imports task.py): None for a
    record without a scene, else whether the first scene list is exactly the scene's."""
    from demo import task
    if not isinstance(record.get("scene"), dict):
        return None
    return task.first_scene_list(response) == task.scene_list(record["scene"])


def test_scene_metric_on_builtin_task_records():
    """--metric MODULE:FUNCTION on built-in task records (they carry a scene): a response counts as
    seeing the scene when its first 'shapes:' list names exactly the scene's objects in the task's
    order (red green blue yellow; circle square triangle). Records without a scene get no scene
    metric. The metric is reported under the function's name."""
    metrics = [ev.Metric("scene_list_ok", load_function("test_eval:scene_list_ok", "--metric"))]
    scene = {"size": 56, "grid": 2, "objects": [
        {"color": "blue", "shape": "circle", "row": 0, "col": 0},
        {"color": "red", "shape": "triangle", "row": 1, "col": 1},
        {"color": "red", "shape": "circle", "row": 0, "col": 1}]}
    rec = {"id": "t0", "answer": "2", "scene": scene}
    right = "<think>shapes: 1 red circle, 2 red triangle, 3 blue circle. red: 1 circle, 2 triangle. red 2</think>\n<answer>2</answer>"
    missed = "<think>shapes: 1 red circle, 2 blue circle. red: 1 circle. red 1</think>\n<answer>1</answer>"
    by_place = "<think>shapes: 1 blue circle, 2 red circle, 3 red triangle. red 2</think>\n<answer>2</answer>"
    gens = [ev.Response(text=t, length=10, finish="stop") for t in (right, missed, by_place)]
    cfg = ev.EvalConfig(prompt="single", n=3)
    preds = ev.score_predictions([rec], gens, cfg, count_tokens=lambda s: len(s.split()), metrics=metrics)
    assert [p.metrics["scene_list_ok"] for p in preds] == [True, False, False]
    m = ev.aggregate(preds, 3)
    assert m["scene_list_ok"] == pytest.approx(1 / 3) and m["final_acc"] == pytest.approx(2 / 3)
    plain = ev.score_predictions([{"id": "x", "answer": "2"}], gens[:1], ev.EvalConfig(prompt="single"),
                                 count_tokens=lambda s: 1, metrics=metrics)
    assert plain[0].metrics["scene_list_ok"] is None and "scene_list_ok" not in ev.aggregate(plain, 1)
    assert "scene_list_ok" in ev.format_table([dict(checkpoint="c", dataset="d", metrics=m)])
    for wrong in (1, 1.5, float("nan")):  # not a bool nor a share in [0, 1]: an error naming the metric
        bad = [ev.Metric("count", lambda r, t, v=wrong: v)]
        with pytest.raises(TypeError, match="--metric count: must return True, False, a float in"):
            ev.score_predictions([rec], gens, cfg, count_tokens=len, metrics=bad)
    share = [ev.Metric("share", lambda r, t: 0.25 if "2" in t else 1.0)]  # a share is averaged like a bool
    got = ev.aggregate(ev.score_predictions([rec], gens, cfg, count_tokens=len, metrics=share), 3)["share"]
    assert got == pytest.approx(sum(0.25 if "2" in g.text else 1.0 for g in gens) / 3)


# -----------------------------------------------------------------------------
# the command line refuses what would give an unusable result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, test.jsonl) of a tiny random model on a 2-question built-in task."""
    import torch
    from support import data
    import model as qwen
    from demo import task
    d = tmp_path_factory.mktemp("tiny")
    train, test = task.make_task(str(d / "task"), task.TaskConfig(n_train=4, n_test=2, difficulty=1, seed=0))
    tok = data.train_tokenizer([data.render_chat(r["messages"]) for r in data.read_jsonl(train)],
                               str(d / "tok"), vocab_size=300)
    torch.manual_seed(0)
    cfg = qwen.tiny_config(tok.vocab_size, tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.eos_ids,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    qwen.save_pretrained(qwen.Qwen2_5_VL(cfg), str(d / "ck"), tokenizer_dir=str(d / "tok"))
    return str(d / "ck"), test


def broken_copy(ck, dst, how):
    import shutil
    shutil.copytree(ck, dst)
    if how == "weights":   # not a safetensors file at all: caught before any work
        open(os.path.join(dst, "model.safetensors"), "wb").write(b"\x00" * 64)
    else:                  # a config that does not match the weights: caught only when loading
        cfg = json.load(open(os.path.join(dst, "config.json")))
        (cfg.get("text_config") or cfg)["num_hidden_layers"] = 2
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_bad_checkpoint_fails_before_any_work(tiny, tmp_path):
    ck, test = tiny
    bad = broken_copy(ck, tmp_path / "bad", "weights")
    out = tmp_path / "eval"
    os.makedirs(out)
    (out / "metrics.json").write_text('{"old": true}')
    with pytest.raises(SystemExit, match=rf"--model {bad}: not a loadable checkpoint"):
        ev.main(["--model", ck, bad, "--data", test, "--out", str(out), "--max-new-tokens", "2"])
    assert not (out / "predictions").exists()  # nothing ran; the earlier result is untouched
    with pytest.raises(SystemExit, match=r"--model .*nowhere: not a loadable checkpoint"):
        ev.main(["--model", str(tmp_path / "nowhere"), "--data", test, "--out", str(out)])


def test_checkpoint_failing_at_load_leaves_no_metrics(tiny, tmp_path, monkeypatch):
    """A checkpoint that passes the cheap check but fails to load after the first model was
    evaluated: exit != 0 naming it, and no metrics.json (the stale one is gone too)."""
    monkeypatch.setenv("SRPO_COMPILE", "0")
    ck, test = tiny
    bad = broken_copy(ck, tmp_path / "bad", "config")
    out = tmp_path / "eval"
    os.makedirs(out)
    (out / "metrics.json").write_text('{"old": true}')
    with pytest.raises(SystemExit, match=rf"--model {bad}: cannot load"):
        ev.main(["--model", ck, bad, "--data", test, "--out", str(out), "--max-new-tokens", "2", "--limit", "1"])
    assert not (out / "metrics.json").exists()
    ev.main(["--model", ck, "--data", test, "--out", str(out), "--max-new-tokens", "2", "--limit", "1"])
    assert json.loads((out / "metrics.json").read_text())["results"][0]["metrics"]["n_questions"] == 1


@pytest.mark.parametrize("argv,flag", [
    (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch_size"), (["--n", "0"], "--n"),
    (["--max-new-tokens", "0"], "--max_new_tokens"), (["--temperature", "-0.5"], "--temperature"),
    (["--max_new_token", "5"], "--max_new_token"),   # an abbreviation is not the flag
    (["--prompt", "both"], "--prompt"), (["--reward_preset", "mine"], "--reward_preset"),
])
def test_bad_flags_named(argv, flag, capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "m", "--data", "d", "--out", "o", *argv])
    assert flag in capsys.readouterr().err


def test_main_refusals(tiny, tmp_path):
    import torch
    ck, test = tiny
    base = ["--model", ck, "--data", test, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="give --model"):
        ev.main(["--model", ck, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--metric 'nosuchmodule:f': cannot import module 'nosuchmodule'"):
        ev.main(base + ["--metric", "nosuchmodule:f"])
    with pytest.raises(SystemExit, match="--metric 'test_eval:nope': module 'test_eval' has no function 'nope'"):
        ev.main(base + ["--metric", "test_eval:nope"])
    with pytest.raises(SystemExit, match="expected MODULE:FUNCTION"):
        ev.main(base + ["--metric", "scene_list_ok"])
    with pytest.raises(SystemExit, match="names must be unique and not built-in"):
        ev.main(base + ["--metric", "test_eval:scene_list_ok", "--metric", "test_eval:scene_list_ok"])
    if not torch.cuda.is_available():  # a CPU machine: say so, not a pin_memory error
        with pytest.raises(SystemExit, match=r"--device cuda: no GPU is visible"):
            ev.main(base + ["--device", "cuda"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match=r"empty\.jsonl: no records"):
        ev.main(["--model", ck, "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "answer": "2"}\n{"id": "1", "answer": "3"}\n')
    with pytest.raises(SystemExit, match=r"dup\.jsonl:2: duplicate id '1' \(first at .*dup\.jsonl:1\)"):
        ev.main(["--model", ck, "--data", str(tmp_path / "dup.jsonl"), "--out", str(tmp_path / "o")])


def test_reward_preset_flag():
    """--reward_preset reaches reward.RewardConfig(preset=...); with a reward.py that has no such
    field the flag fails with a clear message instead of a TypeError."""
    import dataclasses
    import reward
    has = "preset" in {f.name for f in dataclasses.fields(reward.RewardConfig)}
    assert ev.reward_config("") == reward.RewardConfig()
    if has:
        assert ev.reward_config("code").preset == "code"
    else:
        with pytest.raises(SystemExit, match="--reward_preset: this reward.py's RewardConfig has no field 'preset'"):
            ev.reward_config("code")


def test_bad_records_are_reported_and_the_rest_scored(tiny, tmp_path, capsys, monkeypatch):
    """One bad image (and a NaN answer, a control token, messages that are not a list) costs only
    its own record: the others are scored, the bad ones named with file:line in metrics.json and on
    stderr; predictions are strict JSON. A file with no usable record stops eval.py, no predictions."""
    from support import data
    monkeypatch.setenv("SRPO_COMPILE", "0")
    ck, test = tiny
    root = os.path.dirname(test)
    recs = data.read_jsonl(test)
    for r in recs:   # absolute image paths: the records move to another directory
        r["messages"][1]["content"][0]["image"] = os.path.join(root, r["messages"][1]["content"][0]["image"])
    (tmp_path / "zero.png").write_bytes(b"")
    bad_img = json.loads(json.dumps(recs[0]))
    bad_img["id"], bad_img["messages"][1]["content"][0]["image"] = "bad_img", "zero.png"
    nan = json.dumps({**recs[1], "id": "nan"}).replace(f'"answer": "{recs[1]["answer"]}"', '"answer": NaN')
    ctrl = json.loads(json.dumps(recs[1]))
    ctrl["id"], ctrl["messages"][1]["content"][1]["text"] = "ctrl", "How many?<|im_end|>"
    lines = [json.dumps(recs[0]), json.dumps(bad_img), nan, json.dumps(recs[1]), json.dumps(ctrl),
             json.dumps({"id": "hello", "answer": "1", "messages": "hello"})]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    ev.main(["--model", ck, "--data", str(p), "--out", str(out), "--max-new-tokens", "2"])
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in the output"))
    preds = [json.loads(l, **strict) for l in open(out / "predictions" / "ck__t.jsonl")]
    assert [x["id"] for x in preds] == [recs[0]["id"], recs[1]["id"]]
    (row,) = json.loads((out / "metrics.json").read_text(), **strict)["results"]
    assert row["metrics"]["n_questions"] == 2 and row["metrics"]["skipped_bad_record"] == 4
    assert [b.split(": ")[0] for b in row["bad_records"]] == [f"{p}:{i}" for i in (2, 3, 5, 6)]
    assert "content[0].image: cannot read image" in row["bad_records"][0] and "NaN" in row["bad_records"][1]
    assert "control token '<|im_end|>'" in row["bad_records"][2] and "'messages'" in row["bad_records"][3]
    assert f"4 bad record(s) skipped, not scored:\n  {p}:2: messages[1].content[0].image" in capsys.readouterr().err
    p.write_text(json.dumps(bad_img) + "\n" + nan + "\n")
    with pytest.raises(SystemExit, match=rf"no usable record in {p}"):
        ev.main(["--model", ck, "--data", str(p), "--out", str(tmp_path / "e2"), "--max-new-tokens", "2"])
    assert os.listdir(tmp_path / "e2" / "predictions") == []
