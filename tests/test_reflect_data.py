"""reflect_data.py: two-pass SFT data from policy attempts + teacher reflections.

- built-in task + rule teacher, with a scripted policy whose attempts the test controls: every
  written sample passes reward.py's two-pass format check and has a correct final answer, the
  case matches the attempt, the mix holds on every prefix of the file, rejections are recorded;
- filters (empty reflection, copied attempt, wrong second answer, tags in the teacher's text);
- resume: a rerun skips written and rejected ids, repairs a torn last line, and ends with the
  same file as an uninterrupted run;
- OpenAI-compatible teacher against a fake server on 127.0.0.1: good replies, timeouts, 500s,
  malformed JSON, replies without tags, dropped connections, truncated bodies; retries, a report
  of what failed, a rerun that fetches only what failed; the API key reaches the server and
  nowhere else; a SIGKILLed run resumed (slow);
- --attempts k: the candidate of the kind the mix needs is used;
- the real sampler path (tiny random checkpoint) through the command line, and the local teacher.
"""
import base64
import http.server
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from PIL import Image

from support import data
import reflect_data as rd
import reward
from demo import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    task.make_task(str(d), task.TaskConfig(n_train=48, n_test=2, difficulty=2, seed=3))
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(task_dir, tmp_path_factory):
    """A random tiny Qwen2.5-VL + a tokenizer trained on the task: its attempts are gibberish."""
    import torch
    import model as model_lib
    import sft
    d = tmp_path_factory.mktemp("ckpt")
    tok = data.train_tokenizer(sft.tokenizer_texts(str(task_dir / "train.jsonl")), str(d / "tok"), vocab_size=400)
    cfg = model_lib.tiny_config(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id,
                                vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                                eos_token_id=tok.eos_ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    torch.manual_seed(0)
    return model_lib.save_pretrained(model_lib.Qwen2_5_VL(cfg), str(d / "policy"), tokenizer_dir=str(d / "tok"))


def wrong_attempt(rec, delta=1):
    """The worked solution with its final count and answer off by delta."""
    think = task.think_text(rec)
    think = re.sub(r"(-?\d+)(?!.*\d)", lambda m: str(int(m.group(1)) + delta), think)
    return f"<think>{think}</think>\n<answer>{int(rec['answer']) + delta}</answer>"


class ScriptedPolicy:
    """attempts(items): by id, from a plan {id: 'correct' | 'wrong' | 'garbage'}; logs what it was asked."""

    def __init__(self, plan):
        self.plan, self.asked = plan, []

    def attempts(self, items):
        out = []
        for it in items:
            self.asked.append(it.id)
            kind = self.plan[it.id]
            out.append(task.solution(it.record) if kind == "correct" else
                       wrong_attempt(it.record) if kind == "wrong" else "I think it is some number")
        return out


def plan_for(path, pattern):
    recs = data.read_jsonl(path)
    return {r["id"]: pattern[i % len(pattern)] for i, r in enumerate(recs)}


def cfg_for(tmp_path, data_path, **kw):
    return rd.ReflectConfig(data=str(data_path), out=str(tmp_path / "out" / "reflect.jsonl"), batch_size=8, **kw)


def check_written(out_path, data_path, frac):
    """Every sample: two-pass format, correct final answer, case == source; mix on every prefix."""
    recs = data.read_jsonl(out_path)
    truth = {r["id"]: r for r in data.read_jsonl(data_path)}
    texts = [r["messages"][-1]["content"] for r in recs]
    scores = reward.score_batch(texts, [truth[r["id"]]["answer"] for r in recs], mode="srpo")
    for r, s in zip(recs, scores):
        assert r["messages"][0] == {"role": "system", "content": data.SYSTEM_PROMPT_REFLECT}
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert reward.parse_response(r["messages"][-1]["content"]).is_two_pass_format
        assert s.format == 0.5 and s.final_correct, r
        assert s.case == {"correct": "r2r", "wrong": "w2r"}[r["source"]] == r["case"]
        assert r["answer"] == truth[r["id"]]["answer"]
    n = Counter()
    for r in recs:  # the streaming rule: count(kind) <= ceil(share * total) on every prefix
        n[r["source"]] += 1
        tot = n["correct"] + n["wrong"]
        if frac >= 0:
            assert n["correct"] <= math.ceil(frac * tot - 1e-9) and n["wrong"] <= math.ceil((1 - frac) * tot - 1e-9)
    return recs, n


# ----------------------------------------------------------------------------- built-in task, rule teacher

def test_rule_teacher_builtin_format_answers_and_mix(task_dir, tiny_ckpt, tmp_path):
    data_path = task_dir / "train.jsonl"
    plan = plan_for(data_path, ["correct", "wrong", "correct", "garbage", "correct", "wrong"])
    policy = ScriptedPolicy(plan)
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=0.3), policy=policy)
    recs, n = check_written(tmp_path / "out" / "reflect.jsonl", data_path, 0.3)
    want_wrong = sum(v == "wrong" for v in plan.values())  # 16: all wrong ones fit, the correct ones are capped
    assert n["wrong"] == want_wrong and s["written"]["wrong"] == want_wrong
    total = n["correct"] + n["wrong"]
    assert abs(n["correct"] / total - 0.3) <= 1 / total
    # every record is accounted for: written or rejected (with the reason), nothing failed
    rej = data.read_jsonl(tmp_path / "out" / "reflect.rejected.jsonl")
    assert len(recs) + len(rej) == len(plan) and s["teacher_failures"]["count"] == 0
    reasons = Counter(r["reason"] for r in rej)
    assert reasons["attempt_format"] == sum(v == "garbage" for v in plan.values())
    assert reasons["over_quota_correct"] == sum(v == "correct" for v in plan.values()) - n["correct"]
    assert s["rejected"] == dict(reasons)
    # the rule teacher's reflection names the true count for a wrong attempt; the first pass is the attempt
    for r in recs:
        p = reward.parse_response(r["messages"][-1]["content"])
        assert r["attempt"].startswith(f"<think>{p.thinks[0]}</think>")
        if r["source"] == "wrong":
            assert f"answer is {r['answer']}, not {int(r['answer']) + 1}" in p.reflection
    # images point at the task's files, relative to the output file
    img = recs[0]["messages"][1]["content"][0]["image"]
    assert img == recs[0]["image"] and os.path.samefile(tmp_path / "out" / img, task_dir / "images" / os.path.basename(img))
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f) == s
    # sft.py reads it as it is: images found, loss on the two-pass assistant turn
    import sft
    tok = data.Tokenizer.from_dir(tiny_ckpt)
    ex = sft.load_examples(str(tmp_path / "out" / "reflect.jsonl"), tok, None)
    assert len(ex) == len(recs) and all(e.n_loss > 10 for e in ex)


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0, -1.0])
def test_mix_parameter(task_dir, tmp_path, frac):
    data_path = task_dir / "train.jsonl"
    plan = plan_for(data_path, ["correct", "wrong", "wrong"])
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=frac), policy=ScriptedPolicy(plan))
    _, n = check_written(tmp_path / "out" / "reflect.jsonl", data_path, frac)
    n_c, n_w = (sum(v == k for v in plan.values()) for k in ("correct", "wrong"))  # 16, 32
    # 0.5: all 16 correct, and wrong ones while wrong <= ceil(total / 2): 17 at total 33
    want = {0.0: (0, n_w), 0.5: (n_c, n_c + 1), 1.0: (n_c, 0), -1.0: (n_c, n_w)}[frac]
    assert (n["correct"], n["wrong"]) == want
    assert s["correct_share"] == (round(want[0] / sum(want), 4) if sum(want) else None)


class ManyAttempts:
    """attempts(items): several candidates per item, from {id: [kind, ...]}."""

    def __init__(self, plan):
        self.plan = plan

    def attempts(self, items):
        make = {"correct": task.solution, "wrong": wrong_attempt, "garbage": lambda r: "no idea"}
        return [[make[k](it.record) for k in self.plan[it.id]] for it in items]


def test_several_attempts_fill_the_mix(task_dir, tmp_path):
    """--attempts k: the candidate of the kind the mix needs is used, so with both kinds on offer
    every question yields a sample and the mix still holds on every prefix."""
    data_path = task_dir / "train.jsonl"
    ids = [r["id"] for r in data.read_jsonl(data_path)]
    offers = [["wrong", "correct"], ["garbage", "correct"], ["wrong", "garbage", "wrong"], ["garbage", "garbage"]]
    plan = {rid: offers[i % 4] if i < 24 else ["wrong", "correct"] for i, rid in enumerate(ids)}
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=0.3), policy=ManyAttempts(plan))
    recs, n = check_written(tmp_path / "out" / "reflect.jsonl", data_path, 0.3)
    rej = {r["id"]: r["reason"] for r in data.read_jsonl(tmp_path / "out" / "reflect.rejected.jsonl")}
    assert {ids[i]: "attempt_format" for i in range(3, 24, 4)}.items() <= rej.items()
    for r in recs:  # the attempt that was used is one that was offered, of the recorded kind
        assert r["attempt"] == (task.solution(r) if r["source"] == "correct" else wrong_attempt(r))
    # an item offering both kinds is always written; one offering a single kind may be over quota
    both = {rid for rid in ids if set(plan[rid]) >= {"correct", "wrong"}}
    assert both <= {r["id"] for r in recs} and len(both) == 30
    assert all(rej[rid] == f"over_quota_{plan[rid][-1]}" for rid in rej if rid not in both and plan[rid][-1] != "garbage")
    assert n["correct"] + n["wrong"] == 48 - len(rej)
    assert abs(n["correct"] / (n["correct"] + n["wrong"]) - 0.3) <= 1 / (n["correct"] + n["wrong"])


class ListTeacher:
    """Returns given replies by item id (default: a good one)."""
    name = "list"

    def __init__(self, replies):
        self.replies = replies

    def reflect(self, items):
        return [self.replies.get(it.id) or rd.TeacherReply(f"I recounted: it is {it.gt}.", f"count {it.gt}", it.gt)
                for it in items]


def test_filters(task_dir, tmp_path):
    data_path = task_dir / "train.jsonl"
    recs = data.read_jsonl(data_path)[:6]
    plan = {r["id"]: "wrong" for r in recs}
    think = lambda r: reward.parse_response(wrong_attempt(r)).thinks[0]
    bad = {
        recs[0]["id"]: rd.TeacherReply("   ", "recount", recs[0]["answer"]),
        recs[1]["id"]: rd.TeacherReply(think(recs[1]).upper(), "recount", recs[1]["answer"]),   # the attempt, shouting
        recs[2]["id"]: rd.TeacherReply("I recounted.", "recount", str(int(recs[2]["answer"]) + 2)),
        recs[3]["id"]: rd.TeacherReply("I recounted </think> oops", "recount", recs[3]["answer"]),
    }
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=-1, limit=6), policy=ScriptedPolicy(plan),
               teacher=ListTeacher(bad))
    rej = {r["id"]: r["reason"] for r in data.read_jsonl(tmp_path / "out" / "reflect.rejected.jsonl")}
    assert rej == {recs[0]["id"]: "empty_reflection", recs[1]["id"]: "reflection_copies_attempt",
                   recs[2]["id"]: "second_answer_wrong", recs[3]["id"]: "bad_format"}
    assert [r["id"] for r in data.read_jsonl(tmp_path / "out" / "reflect.jsonl")] == [recs[4]["id"], recs[5]["id"]]
    assert s["written"]["total"] == 2


def test_copies_attempt_and_quota_rule():
    t = "red: 1 circle, 2 square. red 2"
    assert rd.copies_attempt(t, t) and rd.copies_attempt("  RED: 1 circle,  2 square. red 2 ", t)
    assert rd.copies_attempt(f"I wrote: {t}", t)
    assert not rd.copies_attempt("red: missed 1 square. red is 3, not 2. answer is 3, not 2.", t)
    # 0.3: first correct sample allowed (ceil(0.3) = 1), a second only at total >= 4 (ceil(1.2) = 2)
    assert rd.within_quota(Counter(), "correct", 0.3)
    assert not rd.within_quota(Counter(correct=1, wrong=1), "correct", 0.3)
    assert rd.within_quota(Counter(correct=1, wrong=3), "correct", 0.3)  # 2 <= ceil(1.5)
    assert rd.within_quota(Counter(correct=3, wrong=7), "wrong", 0.3)      # 8 <= ceil(7.7)
    assert rd.within_quota(Counter(correct=3, wrong=7), "correct", 0.3)    # 4 <= ceil(3.3)
    assert not rd.within_quota(Counter(correct=2, wrong=7), "wrong", 0.3)  # 8 > 7 = 0.7 * 10 (float: 7.000000000000001)
    assert rd.within_quota(Counter(correct=2, wrong=7), "correct", 0.3)    # 3 <= 3
    assert not rd.within_quota(Counter(wrong=5), "correct", 0.0) and rd.within_quota(Counter(wrong=5), "wrong", 0.0)
    assert rd.within_quota(Counter(correct=5), "correct", -1) and rd.within_quota(Counter(correct=5), "wrong", -1)


def test_parse_teacher():
    good = rd.parse_teacher("Sure!\n<reflection> I missed a square. </reflection>\n<think>red 3</think> <answer>3</answer>")
    assert (good.reflection, good.think, good.answer, good.error) == ("I missed a square.", "red 3", "3", "")
    # a reasoning model's own <think> first: skipped, the think after the reflection is the second attempt
    r = rd.parse_teacher("<think>hidden musing</think><reflection>r</reflection><think>t</think><answer>a</answer>")
    assert (r.reflection, r.think, r.answer) == ("r", "t", "a")
    for bad, tag in [("<think>t</think><answer>a</answer>", "reflection"),
                     ("<reflection>r</reflection><answer>a</answer><think>t</think>", "answer"),
                     ("<reflection> </reflection><think>t</think><answer>a</answer>", "reflection"),
                     ("<reflection>r</reflection><think>t</think><answer></answer>", "answer"), ("", "reflection")]:
        assert rd.parse_teacher(bad).error.startswith(f"unparsable reply (no non-empty <{tag}> block"), bad


# ----------------------------------------------------------------------------- resume

def test_resume_skips_done_and_repairs_torn_tail(task_dir, tmp_path):
    data_path = task_dir / "train.jsonl"
    plan = plan_for(data_path, ["correct", "wrong", "garbage", "wrong", "correct"])
    # uninterrupted run
    rd.run(cfg_for(tmp_path / "a", data_path, correct_frac=0.3), policy=ScriptedPolicy(plan))
    # interrupted: first 20 records, then a kill mid-append (torn line), then the full run
    b = tmp_path / "b"
    rd.run(cfg_for(b, data_path, correct_frac=0.3, limit=20), policy=ScriptedPolicy(plan))
    out, rej = b / "out" / "reflect.jsonl", b / "out" / "reflect.rejected.jsonl"
    done_ids = {r["id"] for r in data.read_jsonl(out)} | {r["id"] for r in data.read_jsonl(rej)}
    assert len(done_ids) == 20
    with open(out, "a") as f:
        f.write('{"id": "train-000099", "messages": [{"role": "sys')
    policy = ScriptedPolicy(plan)
    s = rd.run(cfg_for(b, data_path, correct_frac=0.3), policy=policy)
    assert set(policy.asked) == set(plan) - done_ids and len(policy.asked) == len(plan) - 20
    with open(tmp_path / "a" / "out" / "reflect.jsonl") as fa, open(out) as fb:
        assert fa.read() == fb.read()
    with open(tmp_path / "a" / "out" / "reflect.rejected.jsonl") as fa, open(rej) as fb:
        assert fa.read() == fb.read()
    assert s["this_run"]["todo"] == len(plan) - 20
    # a third run has nothing to do and does not need the policy at all
    s3 = rd.run(cfg_for(b, data_path, correct_frac=0.3), policy=None)
    assert s3["this_run"]["todo"] == 0 and s3["written"] == s["written"] and s3["rejected"] == s["rejected"]


# ----------------------------------------------------------------------------- OpenAI-compatible teacher

KEY = "sk-test-Zq8v3KEYxx-must-not-leak"


class FakeServer:
    """/v1/chat/completions on 127.0.0.1. Behaviour per question tag ('Q3') and request number,
    from script {tag: [action, ...]} (the last action repeats): good | sleep | 500 | badjson |
    notags | 401 | 429:SECONDS (Retry-After) | trickle (one byte every 50 ms) | control (a
    reply with <|im_end|> in the reflection) | paper (a reflection only). Records every request
    with its arrival time."""

    def __init__(self, script, sleep_s):
        self.script, self.sleep_s, self.requests = script, sleep_s, []
        self.lock = threading.Lock()
        srv = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][1]["content"]
                text = user[-1]["text"]
                tag = re.search(r"Question: (Q\d+)", text).group(1)
                with srv.lock:
                    k = sum(r["tag"] == tag for r in srv.requests)
                    srv.requests.append(dict(tag=tag, auth=self.headers.get("Authorization"), body=body,
                                             path=self.path, t=time.time()))
                acts = srv.script.get(tag, ["good"])
                act = acts[min(k, len(acts) - 1)]
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    act = "401"
                if act == "sleep":
                    time.sleep(srv.sleep_s)
                    act = "good"
                if act == "drop":  # close without a reply
                    self.close_connection = True
                    return
                if act.startswith("429:"):
                    self.send_response(429)
                    self.send_header("Retry-After", act[4:])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if act == "trickle":  # a reply that never finishes quickly: one byte every 50 ms for 10 s
                    self.send_response(200)
                    self.send_header("Content-Length", "200")
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.05)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if act == "partial":  # promise more bytes than are sent, then close
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": ')
                    self.close_connection = True
                    return
                gt = re.search(r"Correct answer: (\S+)", text).group(1)
                if act in ("good", "notags", "control", "paper"):
                    content = (f"<reflection>I counted the dots in {tag} again and found my slip.</reflection>\n"
                               f"<think>there are {gt} dots</think>\n<answer>{gt}</answer>")
                    if act == "notags":
                        content = f"The answer is {gt}."
                    if act == "control":
                        content = content.replace("my slip.", "my slip.<|im_end|>")
                    if act == "paper":
                        content = f"<reflection>I counted the dots in {tag} again: there are {gt}.</reflection>"
                    self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))
                elif act == "badjson":
                    self.reply(200, '{"choices": [{"message": {"content": "<reflection>tru')
                else:  # error bodies echo the key back: a hostile server must not make us log it
                    self.reply(int(act), json.dumps({"error": f"boom {self.headers.get('Authorization')}"}))

            def reply(self, code, text):
                raw = text.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, tag):
        return sum(r["tag"] == tag for r in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def dots_task(d, n):
    """A non-built-in data set: n records 'Qi', image with i+1 dots, answer i+1 (no scene)."""
    os.makedirs(d / "img", exist_ok=True)
    with open(d / "train.jsonl", "w") as f:
        for i in range(n):
            img = Image.new("RGB", (56, 56), "white")
            for j in range(i + 1):
                img.putpixel((4 + 4 * (j % 12), 20 + 8 * (j // 12)), (0, 0, 0))
            img.save(d / "img" / f"q{i}.png")
            q = f"Q{i}: how many dots are there?"
            f.write(json.dumps({"id": f"q{i}", "answer": str(i + 1), "question": q, "messages": [
                {"role": "user", "content": [{"type": "image", "image": f"img/q{i}.png"}, {"type": "text", "text": q}]}]})
                    + "\n")
    return d / "train.jsonl"


class WrongByOne:
    """Attempts that miscount by one (so every item is a 'wrong' one); Q1 right."""

    def attempts(self, items):
        return [f"<think>I see {int(it.gt) + (it.id != 'q1')} dots</think>\n<answer>{int(it.gt) + (it.id != 'q1')}</answer>"
                for it in items]


def test_openai_teacher_fake_server(tmp_path, monkeypatch, capsys):
    data_path = dots_task(tmp_path / "d", 9)
    script = {"Q0": ["good"], "Q1": ["good"], "Q2": ["sleep", "good"], "Q3": ["500"], "Q4": ["badjson", "good"],
              "Q5": ["badjson"], "Q6": ["notags"], "Q7": ["drop", "good"], "Q8": ["partial", "good"]}
    server = FakeServer(script, sleep_s=1.5)
    monkeypatch.setenv("MY_TEACHER_KEY", KEY)
    cfg = rd.ReflectConfig(data=str(data_path), out=str(tmp_path / "o" / "r.jsonl"), teacher="openai",
                           teacher_url=server.url, teacher_model="fake-vl", teacher_key_env="MY_TEACHER_KEY",
                           timeout_s=0.5, retries=2, backoff_s=0.01, concurrency=4, correct_frac=-1, batch_size=8)
    try:
        t0 = time.time()
        s = rd.run(cfg, policy=WrongByOne())
        took = time.time() - t0
        out = data.read_jsonl(tmp_path / "o" / "r.jsonl")
        assert sorted(r["id"] for r in out) == ["q0", "q1", "q2", "q4", "q7", "q8"]
        assert {r["id"]: r["source"] for r in out}["q1"] == "correct"
        assert s["teacher_failures"]["count"] == 3 and s["teacher_failures"]["ids"] == ["q3", "q5", "q6"]
        assert s["teacher_failures"]["reasons"] == {
            "HTTP 500": 1, "malformed JSON": 1,
            "unparsable reply (no non-empty <reflection> block in order <reflection>, <think>, <answer>)": 1}
        assert not os.path.exists(tmp_path / "o" / "r.rejected.jsonl")  # failures are not rejections
        # retries: one per failure until success, all 3 tries for the hopeless ones
        assert [server.count(f"Q{i}") for i in range(9)] == [1, 1, 2, 3, 2, 3, 3, 2, 2]
        assert took < 10
        # what the server saw: our key, the image inline, the prompt, the ground truth
        r0 = [r for r in server.requests if r["tag"] == "Q0"][0]
        assert r0["auth"] == f"Bearer {KEY}" and r0["path"] == "/v1/chat/completions"
        assert r0["body"]["model"] == "fake-vl" and r0["body"]["messages"][0]["content"] == rd.TEACHER_PROMPT
        url = r0["body"]["messages"][1]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        with open(tmp_path / "d" / "img" / "q0.png", "rb") as f:
            assert base64.b64decode(url.split(",", 1)[1]) == f.read()
        assert "Correct answer: 1" in r0["body"]["messages"][1]["content"][-1]["text"]
        for r in out:  # the written samples are valid two-pass data with the teacher's text
            assert reward.srpo_reward(r["messages"][-1]["content"], r["answer"]).format == 0.5
            assert "found my slip" in r["messages"][-1]["content"]

        # rerun with a healthy server: only the 3 failures are asked again
        server.script.clear()
        s2 = rd.run(cfg, policy=WrongByOne())
        assert [server.count(f"Q{i}") for i in range(9)] == [1, 1, 2, 4, 2, 4, 4, 2, 2]
        assert s2["teacher_failures"]["count"] == 0 and s2["written"]["total"] == 9
        assert sorted(r["id"] for r in data.read_jsonl(tmp_path / "o" / "r.jsonl")) == [f"q{i}" for i in range(9)]

        # a wrong key: 401 is not retried, and the error does not carry the key
        monkeypatch.setenv("MY_TEACHER_KEY", KEY + "-old")
        n_before = len(server.requests)
        cfg3 = rd.ReflectConfig(**{**cfg.__dict__, "out": str(tmp_path / "o3" / "r.jsonl")})
        s3 = rd.run(cfg3, policy=WrongByOne())
        assert s3["teacher_failures"]["reasons"] == {"HTTP 401": 9} and len(server.requests) - n_before == 9
    finally:
        server.close()
    logs = capsys.readouterr()
    for text in [logs.out, logs.err] + [open(os.path.join(dp, f)).read() for d in ("o", "o3")
                                        for dp, _, fs in os.walk(tmp_path / d) for f in fs]:
        assert KEY not in text and "Zq8v3KEY" not in text


def test_openai_teacher_needs_key(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg = rd.ReflectConfig(teacher="openai", teacher_url="http://127.0.0.1:9/v1", teacher_model="m",
                           teacher_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(SystemExit, match="NO_SUCH_KEY_VAR"):
        rd.make_teacher(cfg)


def test_bad_input_names_file_line_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "answer": "1", "messages": [{"role": "user", "content": "x"}]}\n\n'
                 '{"id": "b", "messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'answer'"):
        rd.load_items(str(p), 0)


# ----------------------------------------------------------------------------- real sampler, CLI, local teacher

@pytest.mark.slow
def test_cli_with_real_sampler(task_dir, tiny_ckpt, tmp_path):
    """The sampler path end to end: a random tiny policy's attempts are not in the format, so each
    item is rejected as attempt_format; the summary says so and a rerun does nothing."""
    out = tmp_path / "r" / "reflect.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "reflect_data.py"), "--policy", tiny_ckpt, "--data",
           str(task_dir / "train.jsonl"), "--out", str(out), "--teacher", "rule", "--limit", "5",
           "--batch-size", "3", "--max-new-tokens", "12", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)   # a hang guard, not a speed check (120 s timed out on a loaded machine)
    assert r.returncode == 1 and "no SFT sample was written" in r.stderr, r.stderr   # an empty output is unusable
    with open(tmp_path / "r" / "summary.json") as f:
        s = json.load(f)
    assert s["rejected"] == {"attempt_format": 5} and s["written"]["total"] == 0
    rej = data.read_jsonl(tmp_path / "r" / "reflect.rejected.jsonl")
    assert [x["id"] for x in rej] == [f"train-{i:06d}" for i in range(5)]
    assert json.loads(r.stdout) == s


def test_sampler_policy_and_local_teacher(task_dir, tiny_ckpt, tmp_path):
    """SamplerPolicy decodes exactly what sampler.generate produced for the SINGLE prompt (the one
    end-of-sequence rule: only the final eos is dropped from the text); the local teacher (random
    model) never yields the tags: every item is a reported failure."""
    import sampler
    cfg = rd.ReflectConfig(policy=tiny_ckpt, data=str(task_dir / "train.jsonl"), max_new_tokens=6, device="cpu",
                           teacher="local", teacher_model=tiny_ckpt, teacher_max_tokens=6, retries=1, seed=5)
    items, _ = rd.load_items(cfg.data, 3)
    pol = rd.SamplerPolicy(cfg)
    texts = pol.attempts(items)
    tok = data.Tokenizer.from_dir(tiny_ckpt)
    enc = [data.encode_messages(data.prompt_messages(it.record, data.SYSTEM_PROMPT_SINGLE), tok, str(task_dir),
                                add_generation_prompt=True) for it in items]
    ref = sampler.generate(pol.net, data.collate(enc, tok.pad_id, left_pad=True), tok.eos_ids,
                           sampler.SampleConfig(max_new_tokens=6, seed=6), pad_id=tok.pad_id)
    def text(i):
        ids = ref["tokens"][i, :int(ref["lengths"][i])].tolist()
        return tok.decode(ids[:-1] if ref["finish_reasons"][i] == "stop" else ids)
    assert texts == [[text(i)] for i in range(3)]
    pol.scfg.n = 2  # --attempts 2: two per question, prompt-major
    two = pol.attempts(items)
    assert [len(x) for x in two] == [2, 2, 2] and two[0][0] != two[0][1]
    for it in items:
        it.attempt_think, it.attempt_answer = "red 1", "1"
    replies = rd.make_teacher(cfg).reflect(items)
    assert all(r.error.startswith("unparsable reply") for r in replies)


@pytest.mark.slow
def test_kill_mid_run_then_resume(tmp_path, monkeypatch):
    """SIGKILL a run (OpenAI teacher, slow server) after a few samples, rerun: every item exactly once."""
    data_path = dots_task(tmp_path / "d", 12)
    server = FakeServer({f"Q{i}": ["sleep"] for i in range(12)}, sleep_s=0.3)
    out = tmp_path / "o" / "r.jsonl"
    kw = dict(data=str(data_path), out=str(out), teacher="openai", teacher_url=server.url, teacher_model="m",
              teacher_key_env="MY_TEACHER_KEY", timeout_s=5, concurrency=1, correct_frac=-1, batch_size=2)
    script = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n"
              f"import reflect_data as rd, test_reflect_data as t\n"
              f"rd.run(rd.ReflectConfig(**{kw!r}), policy=t.WrongByOne())\n")
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "MY_TEACHER_KEY": KEY},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        n_first = out.read_text().count("\n")
        assert 3 <= n_first < 12
        monkeypatch.setenv("MY_TEACHER_KEY", KEY)
        s = rd.run(rd.ReflectConfig(**kw), policy=WrongByOne())
    finally:
        server.close()
    ids = [r["id"] for r in data.read_jsonl(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(12)) and s["this_run"]["todo"] == 12 - n_first


def test_cli_accepts_both_flag_spellings():
    """--correct-frac and --correct_frac set the same field (as in sft.py and grpo.py)."""
    a = rd.parse_args(["--correct-frac", "0.5", "--max_new_tokens", "64"])
    b = rd.parse_args(["--correct_frac", "0.5", "--max-new-tokens", "64"])
    assert a == b and a.correct_frac == 0.5 and a.max_new_tokens == 64


# ----------------------------------------------------------------------------- SFT targets

def test_sample_text_targets_hand_written():
    it = rd.Item(id="a", record={}, where="x:1", question="How many red shapes?", images=[], gt="3",
                 attempt_think="red: 1 circle, 2 square. red 2", attempt_answer="2")
    reply = rd.TeacherReply("I missed the red triangle.", "red: 1 circle, 2 square, 3 triangle. red 3", "3")
    assert rd.sample_text(it, reply, "two-pass") == (
        "<think>red: 1 circle, 2 square. red 2</think>\n<answer>2</answer>\n"
        "<reflection>I missed the red triangle.</reflection>\n"
        "<think>red: 1 circle, 2 square, 3 triangle. red 3</think>\n<answer>3</answer>")
    # the paper's Eq. 1: no second think, and the final answer is the ground truth (not the teacher's)
    assert rd.sample_text(it, rd.TeacherReply("I missed the red triangle."), "paper") == (
        "<think>red: 1 circle, 2 square. red 2</think>\n<answer>2</answer>\n"
        "<reflection>I missed the red triangle.</reflection>\n<answer>3</answer>")
    assert rd.parse_teacher("<reflection> r </reflection>", "paper") == rd.TeacherReply("r")
    assert rd.parse_teacher("no tags", "paper").error.startswith("unparsable reply (no non-empty <reflection>")
    assert rd.ReflectConfig().target == "two-pass"


@pytest.mark.parametrize("target", ["two-pass", "paper"])
def test_rule_teacher_targets(task_dir, tmp_path, target):
    """Each target's samples: its tag sequence exactly, the rule teacher's reflection, the final
    answer the ground truth, and a system prompt that asks for that format; sft.py reads them."""
    data_path = task_dir / "train.jsonl"
    plan = plan_for(data_path, ["wrong", "correct"])
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=-1, limit=8, target=target), policy=ScriptedPolicy(plan))
    assert s["written"]["total"] == 8 and s["target"] == target
    system = {"two-pass": data.SYSTEM_PROMPT_REFLECT, "paper": data.SYSTEM_PROMPT_REFLECT_PAPER}[target]
    for r in data.read_jsonl(tmp_path / "out" / "reflect.jsonl"):
        text = r["messages"][-1]["content"]
        first = task.solution(r) if r["source"] == "correct" else wrong_attempt(r)
        think, answer = re.match(r"<think>(.*)</think>\n<answer>(.*)</answer>", first).groups()
        reflection = task.teacher_reflection(r, think, answer)
        second = f"<think>{task.count_text(r)}</think>\n" if target == "two-pass" else ""
        assert text == f"{first}\n<reflection>{reflection}</reflection>\n{second}<answer>{r['answer']}</answer>"
        assert r["messages"][0] == {"role": "system", "content": system} and r["target"] == target
    assert "<reflection>critique of the first attempt</reflection>\n<answer>final answer</answer>" in \
        data.SYSTEM_PROMPT_REFLECT_PAPER


def test_rule_teacher_passed_by_name(task_dir, tmp_path):
    """--rule_teacher / --rule_think name the functions; a wrong spec or a function that does not
    fit the data is an error naming the flag / the record."""
    data_path = task_dir / "train.jsonl"
    cfg = cfg_for(tmp_path, data_path, limit=2, rule_teacher="test_reflect_data:shouting_teacher",
                  rule_think="test_reflect_data:recount", correct_frac=-1)
    rd.run(cfg, policy=ScriptedPolicy(plan_for(data_path, ["wrong"])))
    for r in data.read_jsonl(tmp_path / "out" / "reflect.jsonl"):
        assert f"<reflection>RECOUNT! ANSWER {r['answer']}</reflection>\n<think>recount: {r['answer']}</think>" \
            in r["messages"][-1]["content"]
    with pytest.raises(SystemExit, match="--rule_teacher 'demo.task:nope': module 'demo.task' has no function 'nope'"):
        rd.make_teacher(rd.ReflectConfig(rule_teacher="demo.task:nope"))
    dots = dots_task(tmp_path / "d", 2)  # no scene: the built-in task's teacher cannot reflect on it
    with pytest.raises(ValueError, match=r"train\.jsonl:1: --rule_teacher demo.task:teacher_reflection .* failed on this record"):
        rd.run(rd.ReflectConfig(data=str(dots), out=str(tmp_path / "o2" / "r.jsonl"), correct_frac=-1),
               policy=WrongByOne())


def shouting_teacher(record, attempt_think, attempt_answer):
    return f"RECOUNT! ANSWER {record['answer']}"


def recount(record):
    return f"recount: {record['answer']}"


# ----------------------------------------------------------------------------- refusals

def test_no_arguments_one_line(task_dir, tmp_path, monkeypatch):
    """`python reflect_data.py` with nothing built: one line naming the command that makes it (no
    traceback, exit != 0); the same for a missing policy; an empty training file is an error."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "reflect_data.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("reflect_data.py: --data runs/demo/task/train.jsonl: no such file; "
                                "make it with: python pipeline.py --only task base")
    monkeypatch.chdir(tmp_path)  # the rest in-process (a subprocess costs seconds of torch import)
    os.makedirs("runs/demo/task")
    with open("runs/demo/task/train.jsonl", "w") as f:
        f.write("\n")
    with pytest.raises(SystemExit, match=r"^reflect_data.py: runs/demo/task/train.jsonl: no records$"):
        rd.main([])
    with open("runs/demo/task/train.jsonl", "w") as f:
        f.write((task_dir / "train.jsonl").read_text().split("\n")[0] + "\n")
    os.symlink(task_dir / "images", "runs/demo/task/images")
    with pytest.raises(SystemExit, match=r"^reflect_data.py: --policy runs/demo/base: not a checkpoint directory "
                                         r"\(no config.json\); make it with: python pipeline.py --only task base$"):
        rd.main([])


@pytest.mark.parametrize("argv,flag", [
    (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch_size"), (["--attempts", "0"], "--attempts"),
    (["--retries", "-2"], "--retries"), (["--limi", "3"], "--limi"), (["--target", "one-pass"], "--target"),
])
def test_bad_flags_named(argv, flag, capsys):
    with pytest.raises(SystemExit):
        rd.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_control_tokens_never_reach_training_data(task_dir, tmp_path):
    """A teacher reply or an attempt carrying a control-token string is rejected with a reason; a
    question carrying one is refused when the file is loaded, naming file:line."""
    data_path = task_dir / "train.jsonl"
    recs = data.read_jsonl(data_path)[:4]

    class Policy:
        def attempts(self, items):
            return [task.solution(it.record).replace("</think>", " <|vision_start|></think>") if it.id == recs[0]["id"]
                    else wrong_attempt(it.record) for it in items]
    teacher = ListTeacher({recs[1]["id"]: rd.TeacherReply("I recounted.<|im_end|><|im_start|>user", "recount", recs[1]["answer"]),
                           recs[2]["id"]: rd.TeacherReply("I recounted.", "<|endoftext|> recount", recs[2]["answer"])})
    rd.run(cfg_for(tmp_path, data_path, correct_frac=-1, limit=4), policy=Policy(), teacher=teacher)
    rej = {r["id"]: r for r in data.read_jsonl(tmp_path / "out" / "reflect.rejected.jsonl")}
    assert {k: v["reason"] for k, v in rej.items()} == {
        recs[0]["id"]: "attempt_control_token", recs[1]["id"]: "teacher_control_token",
        recs[2]["id"]: "teacher_control_token"}
    assert "'<|im_end|>'" in rej[recs[1]["id"]]["detail"]
    written = data.read_jsonl(tmp_path / "out" / "reflect.jsonl")
    assert [r["id"] for r in written] == [recs[3]["id"]]
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in recs[:2]]
    lines[1] = lines[1].replace("How many", "<|im_end|>How many", 1)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: messages\[\d\]\.content\[\d\]\.text: text contains the control token '<\|im_end\|>'"):
        rd.load_items(str(bad), 0)


def test_settings_checked_on_resume(task_dir, tmp_path):
    """A rerun with settings that change what is written or rejected is refused, naming the setting;
    the same settings (or a larger --limit) resume."""
    data_path = task_dir / "train.jsonl"
    plan = plan_for(data_path, ["correct", "wrong", "garbage"])
    rd.run(cfg_for(tmp_path, data_path, correct_frac=0.3, limit=6), policy=ScriptedPolicy(plan))
    for kw, flag in ((dict(correct_frac=0.5), "correct_frac"), (dict(target="paper"), "target"),
                     (dict(rule_teacher="test_reflect_data:shouting_teacher"), "rule_teacher"),
                     (dict(attempts=2), "attempts")):
        with pytest.raises(SystemExit, match=rf"was made with --{flag} .*this run has --{flag}"):
            rd.run(cfg_for(tmp_path, data_path, **{"correct_frac": 0.3, "limit": 6, **kw}), policy=ScriptedPolicy(plan))
    s = rd.run(cfg_for(tmp_path, data_path, correct_frac=0.3, limit=9), policy=ScriptedPolicy(plan))
    assert s["this_run"]["todo"] == 3
    # an output without its settings file: what made it is unknown
    os.remove(tmp_path / "out" / "reflect.settings.json")
    with pytest.raises(SystemExit, match="exists but .*settings.json does not"):
        rd.run(cfg_for(tmp_path, data_path, correct_frac=0.3, limit=9), policy=ScriptedPolicy(plan))


def test_bad_image_refused_at_start_or_skipped_and_counted(tmp_path):
    """One unreadable image and one 1x300 strip: refused before any work, both named with file:line
    and field; with --skip_bad_records those records are dropped and counted in the summary and the
    others written; once fixed, a rerun takes them."""
    data_path = dots_task(tmp_path / "d", 4)
    (tmp_path / "d" / "img" / "q1.png").write_bytes(b"not a png")
    Image.new("RGB", (300, 1), "white").save(tmp_path / "d" / "img" / "q2.png")
    cfg = rd.ReflectConfig(data=str(data_path), out=str(tmp_path / "o" / "r.jsonl"), correct_frac=-1)
    with pytest.raises(data.BadRecords, match=r"2 bad records of 4") as e:
        rd.run(cfg, policy=WrongByOne(), teacher=ListTeacher({}))
    assert [w.rsplit(":", 1)[1] for w, _ in e.value.bad] == ["2", "3"]   # q1, q2 (q0 is line 1)
    assert "content[0].image: cannot read image" in e.value.bad[0][1] and "aspect ratio" in e.value.bad[1][1]
    assert not os.path.exists(tmp_path / "o" / "r.jsonl")              # refused before anything was written
    cfg.skip_bad_records = True
    s = rd.run(cfg, policy=WrongByOne(), teacher=ListTeacher({}))
    assert s["skipped_bad_records"]["count"] == 2 and "q1.png" in s["skipped_bad_records"]["examples"][0]
    assert sorted(r["id"] for r in data.read_jsonl(tmp_path / "o" / "r.jsonl")) == ["q0", "q3"]
    assert s["complete"] and s["records"] == 2
    Image.new("RGB", (56, 56), "white").save(tmp_path / "d" / "img" / "q1.png")  # fixed: the rerun takes it
    Image.new("RGB", (56, 56), "white").save(tmp_path / "d" / "img" / "q2.png")
    s2 = rd.run(cfg, policy=WrongByOne(), teacher=ListTeacher({}))
    assert s2["this_run"]["todo"] == 2 and s2["written"]["total"] == 4 and s2["skipped_bad_records"]["count"] == 0


def test_openai_retry_after_trickle_and_control(tmp_path, monkeypatch):
    """HTTP 429 Retry-After is honoured (and capped by --max_wait_s); --timeout_s bounds the whole
    request, so a reply trickled byte by byte stops at the deadline; a reply with a control token
    is rejected; --target paper asks for (and takes) the reflection only."""
    data_path = dots_task(tmp_path / "d", 4)
    server = FakeServer({"Q0": ["429:1", "good"], "Q1": ["429:3600", "good"], "Q2": ["trickle"], "Q3": ["control"]},
                        sleep_s=0)
    monkeypatch.setenv("MY_TEACHER_KEY", KEY)
    cfg = rd.ReflectConfig(data=str(data_path), out=str(tmp_path / "o" / "r.jsonl"), teacher="openai",
                           teacher_url=server.url, teacher_model="m", teacher_key_env="MY_TEACHER_KEY",
                           timeout_s=0.5, retries=1, backoff_s=0.01, max_wait_s=1.5, concurrency=4, correct_frac=-1)
    try:
        t0 = time.time()
        s = rd.run(cfg, policy=WrongByOne())
        took = time.time() - t0
        times = {tag: [r["t"] for r in server.requests if r["tag"] == tag] for tag in ("Q0", "Q1", "Q2")}
        assert times["Q0"][1] - times["Q0"][0] >= 0.95           # waited the 1 s the server asked for
        assert 1.4 <= times["Q1"][1] - times["Q1"][0] < 3          # 3600 s capped at --max_wait_s 1.5
        assert len(times["Q2"]) == 2 and times["Q2"][1] - times["Q2"][0] < 1.5  # each try cut at 0.5 s, not 10 s
        assert took < 6
        assert s["teacher_failures"]["reasons"] == {"timeout": 1} and s["teacher_failures"]["ids"] == ["q2"]
        rej = data.read_jsonl(tmp_path / "o" / "r.rejected.jsonl")
        assert [(r["id"], r["reason"]) for r in rej] == [("q3", "teacher_control_token")]
        assert sorted(r["id"] for r in data.read_jsonl(tmp_path / "o" / "r.jsonl")) == ["q0", "q1"]
        # --target paper: the paper prompt, a reflection-only reply, the ground truth as the final answer
        server.script.clear()
        server.script.update({f"Q{i}": ["paper"] for i in range(4)})
        cfg_p = rd.ReflectConfig(**{**cfg.__dict__, "out": str(tmp_path / "p" / "r.jsonl"), "target": "paper"})
        s = rd.run(cfg_p, policy=WrongByOne())
        assert s["written"]["total"] == 4
        assert server.requests[-1]["body"]["messages"][0]["content"] == rd.TEACHER_PROMPT_PAPER
        r0 = data.read_jsonl(tmp_path / "p" / "r.jsonl")[0]
        assert r0["messages"][-1]["content"].endswith(f"again: there are {r0['answer']}.</reflection>\n"
                                                      f"<answer>{r0['answer']}</answer>")
    finally:
        server.close()
