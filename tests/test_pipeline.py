"""The whole pipeline, shortened (pipeline.py --quick): every stage runs, and every stage's
output exists and loads (checkpoints in our model and in transformers, JSONL data, metrics)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import model as model_lib
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "pipeline.py", "--quick", "--run", str(run)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    # task: both splits, every record's image exists
    for split in ("train", "test"):
        recs = data.read_jsonl(run / "task" / f"{split}.jsonl")
        assert recs and all(os.path.exists(run / "task" / r["image"]) for r in recs)

    # reflection data: two-pass format, correct final answer (what stage 1 trains on)
    refl = data.read_jsonl(run / "reflect" / "train.jsonl")
    assert refl, "no reflection samples written"
    for r in refl:
        s = reward.srpo_reward(r["messages"][-1]["content"], r["answer"], lambda t: len(t.split()))
        assert s.format == 0.5 and s.final_correct

    # every checkpoint loads here and in transformers, with the same logits
    from transformers import Qwen2_5_VLForConditionalGeneration
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for stage in ("base", "sft", "srpo", "grpo"):
        ckpt = run / stage
        ours = model_lib.from_pretrained(str(ckpt)).eval()
        data.Tokenizer.from_dir(str(ckpt))
        theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt)).eval()
        with torch.no_grad():
            assert torch.allclose(ours(ids), theirs(input_ids=ids).logits, atol=1e-4), stage
        assert os.path.exists(ckpt / "log.jsonl"), stage

    # evaluation: one row per checkpoint, and the results table
    for prompt, names in (("single", {"base", "grpo"}), ("reflect", {"sft", "srpo"}), ("blind", {"base"})):
        with open(run / "eval" / prompt / "metrics.json") as f:
            rows = json.load(f)["results"]
        assert {r["checkpoint"] for r in rows} == names
        assert all(0.0 <= r["metrics"]["final_acc"] <= 1.0 for r in rows)
    # grpo.py logs the perception metric on the built-in task (a fraction)
    for stage in ("srpo", "grpo"):
        last = json.loads((run / stage / "log.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= last["scene_acc"] <= 1.0, stage
    table = (run / "results.md").read_text()
    assert all(n in table for n in ("base", "sft", "srpo", "grpo", "shuffled images", "scene list"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
