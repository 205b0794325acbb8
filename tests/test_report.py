"""support/report.py: the HTML report of evaluations and rollouts.

The fixture tests/data/report_quick is the real output of `python pipeline.py --quick` (its five
evaluations of the first 4 test items, those items' images and the models' tokenizer), copied
here so that the test needs no pipeline run. The browser tests run Debian's `chromium` headless
with every network request refused, and skip (saying so) where it is not installed."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from support import data
import reward
from support import report

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "report_quick")
EVALS = ("single", "reflect", "blind")          # pipeline.py's order: the report's columns


def quick_run(tmp_path):
    """The fixture copied to tmp_path, metrics.json pointing at the copied records and tokenizer
    (as eval.py wrote them, with the paths of the machine that ran the pipeline)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    for e in EVALS:
        path = run / "eval" / e / "metrics.json"
        m = json.loads(path.read_text())
        m["config"]["data"] = [str(run / "task" / "test.jsonl")]
        for r in m["results"]:
            r["path"] = str(run / "tokenizer")
        path.write_text(json.dumps(m))
    return run


def page_json(text):
    """The data block of a page (what its script draws)."""
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def summary_cells(text):
    """The summary table: {column name: [cell texts]}."""
    table = re.search(r"<table class='sum'>(.*?)</table>", text, re.S).group(1)
    rows = [re.findall(r"<t[dh]>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)]
    return rows[0], {r[0]: r for r in rows[1:]}


def test_report_of_the_quick_pipeline(tmp_path):
    run = quick_run(tmp_path)
    out = str(tmp_path / "report.html")
    report.write_eval_report(out, [str(run / "eval" / e) for e in EVALS], provenance={"seed": 0})
    text = open(out, encoding="utf-8").read()
    d = page_json(text)
    records = data.read_jsonl(run / "task" / "test.jsonl")
    # one entry per evaluated item, in the records' order, each with its image, question and ground truth
    assert [i["id"] for i in d["items"]] == [str(r["id"]) for r in records]
    assert all(i["image"].startswith("data:image/") for i in d["items"])
    assert [i["answer"] for i in d["items"]] == [str(r["answer"]) for r in records]
    # the columns are the evaluations, as eval.py named them in metrics.json
    results = [(e, r) for e in EVALS for r in json.loads((run / "eval" / e / "metrics.json").read_text())["results"]]
    assert [c["name"] for c in d["columns"]] == ["base (single)", "grpo (single)", "sft (reflect)", "srpo (reflect)",
                                                 "base (single, shuffled images)"]
    head, rows = summary_cells(text)
    for col, (e, r) in zip(d["columns"], results):
        preds = data.read_jsonl(run / "eval" / e / "predictions" / f"{r['checkpoint']}__test.jsonl")
        assert set(col["cells"]) == {str(p["id"]) for p in preds}
        for p in preds:
            x = col["cells"][str(p["id"])]
            # the components, recomputed with the checkpoint's tokenizer, add up to what eval.py stored
            fmt, acc, eff, ref, f_len, total = x["s"]
            assert total == pytest.approx(p["reward"], abs=1e-3)
            assert fmt + acc + eff + ref + 0.1 * f_len == pytest.approx(total, abs=1e-3)
            assert (x["case"], x["c1"], x["c2"]) == (p["case"], p["first_correct"], p["final_correct"])
            assert x["m"] == p["metrics"] and x["L"] == p["length"]
        # cases, accuracies and the scene-list metric counted as eval.py counted them
        m, row = r["metrics"], dict(zip(head, rows[col["name"]]))
        assert [int(row[c]) for c in ("w2r", "r2r", "r2w", "w2w", "single", "none")] == \
               [m[c] for c in ("w2r", "r2r", "r2w", "w2w", "single", "none")]
        assert (row["first acc"], row["final acc"]) == (f"{m['first_acc']:.3f}", f"{m['final_acc']:.3f}")
        assert row["scene_list_ok"] == f"{m['scene_list_ok']:.3f}"
    assert "recomputed reward differs" not in text             # same tokenizer: the same f_len
    assert "shuffled images" in text and "NEXT item's image" in text
    assert all(k in text for k in ("commit: ", "seed: 0", str(run / "tokenizer"), "file size: "))


def test_components_by_hand():
    """A two-pass response that corrects itself (paper preset): R_format 0.5, R_accuracy 0 (a1
    wrong), I_eff 0.5 (w2r), I_ref 0.25; and a malformed one keeps its raw text."""
    text = "<think>two red</think> <answer>2</answer> <reflection>I missed one</reflection> " \
           "<think>three</think> <answer>3</answer>"
    s = reward.score_batch([text], ["3"], "srpo", lambda t: len(t.split()))[0]
    x = report.cell(text, s)
    assert x["case"] == "w2r" and (x["t1"], x["a1"], x["rf"], x["t2"], x["a2"]) == \
        ("two red", "2", "I missed one", "three", "3")
    assert x["s"][:4] == [0.5, 0.0, 0.5, 0.25] and "raw" not in x
    bad = "<answer>3</answer> trailing <reflection>"
    x = report.cell(bad, reward.score_batch([bad], ["3"], "srpo")[0])
    assert x["raw"] == bad and x["case"] == "single" and x["rf"] is None


def test_cases_and_accuracies_counted_by_hand(tmp_path):
    """Four items, one per case, ground truth 3: w2r, r2r, r2w, w2w -> one of each; first answer
    right in 2 of 4 (r2r, r2w), final in 2 of 4 (w2r, r2r); the metric averaged where it is not None."""
    root = hostile_eval(tmp_path, n_items=4)
    two = "<think>t</think><answer>{}</answer><reflection>r</reflection><think>u</think><answer>{}</answer>"
    answers = [("4", "3"), ("3", "3"), ("3", "4"), ("4", "5")]
    metric = [True, False, None, None]
    preds = [dict(json.loads(l), response=two.format(*a), metrics={"scene_list_ok": m})
             for l, a, m in zip(open(root / "predictions" / "<m>__test.jsonl"), answers, metric)]
    (root / "predictions" / "<m>__test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = str(tmp_path / "r.html")
    report.write_eval_report(out, [str(root)])
    text = open(out, encoding="utf-8").read()
    head, rows = summary_cells(text)
    row = dict(zip(head, rows["&lt;m&gt; (reflect)"]))
    assert [row[c] for c in ("w2r", "r2r", "r2w", "w2w", "single", "none")] == ["1", "1", "1", "1", "0", "0"]
    assert (row["first acc"], row["final acc"], row["scene_list_ok"]) == ("0.500", "0.500", "0.500")
    # paper preset, by hand: format 0.5 + accuracy (0.5 if a1 right) + I_eff + I_ref 0.25 (+ 0.1 f_len)
    cells = page_json(text)["columns"][0]["cells"]
    assert [cells[f"<i{k}>"]["s"][:4] for k in range(4)] == [[0.5, 0.0, 0.5, 0.25], [0.5, 0.5, 0.25, 0.25],
                                                            [0.5, 0.5, -0.25, 0.25], [0.5, 0.0, 0.0, 0.25]]


HOSTILE = ["<script>alert('pwned')</script>", "</div></div><h1 id=injected>x</h1>", "<img src=x onerror=alert(1)>",
           "<b><i>unbalanced", "</script><script>document.title='pwned'</script>", "]]> <!-- & &amp; \u2028"]


def hostile_eval(tmp_path, n_items=3):
    """An eval.py-shaped folder whose records and responses are hostile strings, one response
    100 kB long."""
    from PIL import Image
    root = tmp_path / "hostile"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "images" / "0.png")
    recs = [dict(id=f"<i{k}>", answer="3", messages=[dict(role="user", content=[
        dict(type="image", image="images/0.png"), dict(type="text", text=HOSTILE[k % len(HOSTILE)] + " how many?")])])
        for k in range(n_items)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    responses = [f"<think>{h}</think><answer>3</answer><reflection>{h}</reflection><answer>{h}</answer>"
                 for h in HOSTILE] + ["<think>" + "<script>x</script>" * 6000 + "</think><answer>3</answer>"]
    preds = [dict(id=r["id"], sample=0, answer="3", response=responses[k % len(responses)] if k else responses[-1],
                  reward=None, length=10, finish="stop", metrics={"</td><script>": True}) for k, r in enumerate(recs)]
    (root / "predictions").mkdir()
    (root / "predictions" / "<m>__test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (root / "metrics.json").write_text(json.dumps(dict(config=dict(data=[str(root / "test.jsonl")], prompt="reflect"),
                                                       results=[dict(checkpoint="<m>", dataset="test",
                                                                     path="</li><script>", metrics={})])))
    return root


def test_hostile_strings_are_escaped(tmp_path):
    out = str(tmp_path / "r.html")
    report.write_eval_report(out, [str(hostile_eval(tmp_path))], provenance={"seed": "<script>s</script>"})
    text = open(out, encoding="utf-8").read()
    for h in HOSTILE + ["<script>s</script>", "</li><script>", "</td><script>", "<i0>", "<m>"]:
        assert h not in text, h
    d = page_json(text)       # ... and every string is there, intact, for the script to show as text
    assert d["items"][0]["id"] == "<i0>" and HOSTILE[1] in d["items"][1]["question"]
    assert d["columns"][0]["name"] == "<m> (reflect)" and d["columns"][0]["cells"]["<i1>"]["rf"] == HOSTILE[1]
    long = d["columns"][0]["cells"]["<i0>"]["t1"]     # 102 kB of tags: stored up to MAX_STORED, the cut said
    assert len(long) < report.MAX_STORED + 100 and long.endswith("more characters not stored in this report")


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                                    "chromium; .ci/run installs it): the page was not opened in a browser")


def open_in_chromium(path, fragment="", screenshot=None, size="1280,1600"):
    """(the DOM after the page's scripts ran, console lines) of a headless Chromium that
    refuses every network request (no DNS, a dead proxy; the page's own policy allows none)."""
    args = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
            "--enable-logging=stderr", "--v=0", f"--window-size={size}", f"--user-data-dir={path}.profile"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    p = subprocess.run(args + [f"file://{os.path.abspath(path)}{fragment}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    console = [l for l in p.stderr.splitlines() if ":CONSOLE" in l]   # the page logs nothing: any line is a fault
    return p.stdout, console


def body_attr(dom, name):
    return re.search(rf'<body[^>]*\b{name}="([^"]*)"', dom).group(1)


@needs_chromium
def test_quick_report_in_headless_chromium(tmp_path):
    run = quick_run(tmp_path)
    out = str(tmp_path / "report.html")
    report.write_eval_report(out, [str(run / "eval" / e) for e in EVALS])
    t0 = time.time()
    dom, console = open_in_chromium(out)
    assert time.time() - t0 < 60                               # a sanity bound only; bench/report.py measures
    assert console == [] and body_attr(dom, "data-errors") == "[]"
    d = page_json(open(out, encoding="utf-8").read())
    assert int(body_attr(dom, "data-items-drawn")) == len(d["items"])
    assert dom.count('class="cell"') == sum(len(c["cells"]) for c in d["columns"])
    assert all(k in dom for k in ("first answer", "ground truth", *report.LABELS))
    # a filter from the address draws only its items: w2r = some column went wrong -> right
    w2r = [i for i in d["items"] if any(c["cells"].get(i["id"], {}).get("case") == "w2r" for c in d["columns"])]
    dom, console = open_in_chromium(out, "#filter=w2r")
    assert console == [] and int(body_attr(dom, "data-items-drawn")) == min(len(w2r), report.PAGE_ITEMS)


@needs_chromium
def test_hostile_page_in_headless_chromium(tmp_path):
    out = str(tmp_path / "r.html")
    report.write_eval_report(out, [str(hostile_eval(tmp_path, n_items=len(HOSTILE)))])
    dom, console = open_in_chromium(out)
    assert console == [] and body_attr(dom, "data-errors") == "[]"
    # no element came from a string: the browser would serialize it with quoted attributes
    assert '<h1 id="injected"' not in dom and '<img src="x"' not in dom and "<b><i>" not in dom
    assert "pwned" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    assert "&lt;script&gt;alert('pwned')&lt;/script&gt;" in dom          # shown as text
    assert "show all (" in dom                                           # the long text is cut, with a button
    assert int(body_attr(dom, "data-items-drawn")) == len(HOSTILE)


# ----------------------------------------------------------------------------- grpo.py --report_every

def hand_rollout_page(tmp_path):
    """Two groups of G = 2 (paper preset): group 0 one right, one wrong; group 1 both wrong. -> the page's path"""
    import types
    import torch
    import grpo
    from PIL import Image
    Image.new("RGB", (28, 28), "blue").save(tmp_path / "a.png")
    recs = [dict(id=f"q{k}", answer="3", _root=str(tmp_path), messages=[dict(role="user", content=[
        dict(type="image", image="a.png"), dict(type="text", text="How many?")])]) for k in range(2)]
    texts = ["<think>a</think><answer>3</answer>", "<think>a</think><answer>4</answer>",
             "<think>a</think><answer>4</answer>", "<think>b</think><answer>5</answer>"]
    scores = reward.score_batch(texts, ["3"] * 4, "srpo")
    adv = grpo.group_advantages(torch.tensor([s.total for s in scores]), 2)
    keep = grpo.accuracy_band_keep(torch.tensor([s.filter_accuracy for s in scores]), 2)
    roll = types.SimpleNamespace(records=recs, texts=texts, scores=scores, adv=adv, keep=keep, group_size=2,
                                 lengths=torch.tensor([5, 5, 5, 5]), finish_reasons=["stop"] * 4)
    cfg = grpo.GRPOConfig(model="m", out=str(tmp_path))
    return report.write_rollout_report(str(tmp_path / "step.html"), roll, 7, str(tmp_path), cfg)


def test_rollout_page_shows_advantages_and_the_dropped_group(tmp_path):
    """Group 0 is kept, its advantages +-1/sqrt 2 by hand ((r - mean) / unbiased std of two values);
    group 1 (accuracy mean 0 < acc_low) is dropped, and the page says why."""
    out = hand_rollout_page(tmp_path)
    d = page_json(open(out, encoding="utf-8").read())
    assert [i["dropped"] for i in d["items"]] == [False, True] and "DROPPED" in d["items"][1]["note"]
    assert [c["name"] for c in d["columns"]] == ["sample 0", "sample 1"]
    assert [c["cells"]["0:q0"]["adv"] for c in d["columns"]] == pytest.approx([0.7071, -0.7071], abs=1e-3)
    assert [c["cells"]["1:q1"]["adv"] for c in d["columns"]] == [0.0, 0.0]
    assert "reward mean 0.750" in d["items"][0]["note"] and "step: 7" in open(out).read()


@needs_chromium
def test_rollout_page_in_headless_chromium(tmp_path):
    dom, console = open_in_chromium(hand_rollout_page(tmp_path), "#filter=dropped")
    assert console == [] and body_attr(dom, "data-errors") == "[]"
    assert int(body_attr(dom, "data-items-drawn")) == 1 and "DROPPED" in dom and "advantage 0.000 (group dropped)" in dom


@pytest.mark.slow
def test_grpo_report_every_writes_the_steps_page(tmp_path, monkeypatch):
    """grpo.py --report_every 1 on a tiny random model: one page per step, every sample of the shown groups."""
    import torch
    import grpo
    import model as M
    from demo import task
    monkeypatch.setenv("SRPO_COMPILE", "0")
    train, _ = task.make_task(str(tmp_path / "task"), task.TaskConfig(n_train=8, n_test=1, n_val=1, difficulty=1))
    recs = data.read_jsonl(train)
    tok = data.train_tokenizer([json.dumps(r["messages"]) for r in recs] + [data.SYSTEM_PROMPT_REFLECT],
                               str(tmp_path / "tok"), vocab_size=300)
    cfg = M.tiny_config(tok.vocab_size, tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.eos_ids,
                        video_token_id=tok.video_pad_id, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    torch.manual_seed(0)
    M.save_pretrained(M.Qwen2_5_VL(cfg), str(tmp_path / "init"), tokenizer_dir=str(tmp_path / "tok"))
    out = tmp_path / "out"
    grpo.main(grpo.parse_args(["--model", str(tmp_path / "init"), "--train", train, "--out", str(out), "--steps", "2",
                               "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6",
                               "--report_every", "1", "--threads", "1"]))
    pages = sorted(os.listdir(out / "rollouts"))
    assert pages == ["step000001.html", "step000002.html"]
    d = page_json((out / "rollouts" / pages[0]).read_text(encoding="utf-8"))
    assert len(d["items"]) == 2 and [c["name"] for c in d["columns"]] == ["sample 0", "sample 1"]
    assert all("adv" in x and "keep" in x for c in d["columns"] for x in c["cells"].values())


@pytest.mark.slow
def test_eval_py_report_flag(tmp_path):
    """eval.py --report FILE: the page of that evaluation, one cell per prediction eval.py wrote."""
    import torch
    import eval as ev
    import model as M
    from demo import task
    _, test = task.make_task(str(tmp_path / "task"), task.TaskConfig(n_train=2, n_test=2, n_val=1, difficulty=1))
    recs = data.read_jsonl(test)
    tok = data.train_tokenizer([json.dumps(r["messages"]) for r in recs] + [data.SYSTEM_PROMPT_REFLECT],
                               str(tmp_path / "tok"), vocab_size=300)
    cfg = M.tiny_config(tok.vocab_size, tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.eos_ids,
                        video_token_id=tok.video_pad_id, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    torch.manual_seed(0)
    M.save_pretrained(M.Qwen2_5_VL(cfg), str(tmp_path / "ck"), tokenizer_dir=str(tmp_path / "tok"))
    out = tmp_path / "r.html"
    ev.main(["--model", str(tmp_path / "ck"), "--data", test, "--out", str(tmp_path / "eval"), "--max-new-tokens", "6",
             "--report", str(out)])
    d = page_json(out.read_text(encoding="utf-8"))
    preds = data.read_jsonl(tmp_path / "eval" / "predictions" / "ck__test.jsonl")
    assert [c["name"] for c in d["columns"]] == ["ck (reflect)"]
    assert sorted(d["columns"][0]["cells"]) == sorted(p["id"] for p in preds) == sorted(r["id"] for r in recs)
    assert "recomputed reward differs" not in out.read_text(encoding="utf-8")


@needs_chromium
def test_the_page_policy_blocks_a_script_that_got_past_the_escaping(tmp_path):
    """Second line of defence, and proof that the console check sees faults: a script spliced into
    the page by hand does not run, and the browser reports the block."""
    out = str(tmp_path / "r.html")
    report.write_eval_report(out, [str(hostile_eval(tmp_path))])
    text = open(out, encoding="utf-8").read().replace("<h1>", "<script>document.title='pwned'</script><h1>", 1)
    open(out, "w", encoding="utf-8").write(text)
    dom, console = open_in_chromium(out)
    assert "pwned" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    assert any("Content Security Policy" in l for l in console)
