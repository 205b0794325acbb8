"""Tests for grpo.py: the loss and its gradient against a direct per-token computation of the
formula in METHOD.md, log-probs against float64 log_softmax, advantages against numpy."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import checkpoint
from support import data
import grpo
import reward
from support import training


# ----------------------------------------------------------------------------------------------
# loss and gradient vs a direct scalar computation

def _direct_loss_and_grad(lp, lo, lr, adv, mask, eps_low, eps_high, beta, agg="token"):
    """Plain python floats, one token at a time: loss, d loss / d logp, #tokens with clip active.
    token: sum over every token / #tokens; seq (Eq. 2): mean over responses of the token mean."""
    B, R = len(lp), len(lp[0])
    n = sum(mask[b][t] for b in range(B) for t in range(R))
    total, grad, n_clip = 0.0, [[0.0] * R for _ in range(B)], 0
    for b in range(B):
        if agg == "seq":
            n = sum(mask[b]) * B          # token weight 1 / (|o_b| * #responses)
        A = adv[b]
        for t in range(R):
            if not mask[b][t]:
                continue
            r = math.exp(lp[b][t] - lo[b][t])
            rc = min(max(r, 1 - eps_low), 1 + eps_high)
            if r * A <= rc * A:          # unclipped term is the min: d(-r A)/dlp = -r A
                pg, dpg = -r * A, -r * A
            else:                        # clipped term is the min and constant in lp
                pg, dpg = -rc * A, 0.0
                n_clip += 1
            d = lr[b][t] - lp[b][t]
            kl = math.exp(d) - d - 1
            dkl = -math.exp(d) + 1
            total += (pg + beta * kl) / n
            grad[b][t] = (dpg + beta * dkl) / n
    return total, grad, n_clip


@pytest.mark.parametrize("agg", ["seq", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_and_grad_match_direct_formula(beta, agg):
    g = torch.Generator().manual_seed(0)
    B, R, eps_low, eps_high = 4, 7, 0.2, 0.28
    logp_old = -torch.rand(B, R, generator=g, dtype=torch.float64) * 3
    # ratios spread over [exp(-0.6), exp(0.6)]: many outside [0.8, 1.28], many inside
    logp = (logp_old + (torch.rand(B, R, generator=g, dtype=torch.float64) - 0.5) * 1.2)
    logp_ref = logp_old + torch.randn(B, R, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.3, -0.7, 0.4, -1.9], dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(R)[None] < lengths[:, None]                       # (B, R) right padding
    # garbage on padded positions must not leak into loss or gradient
    logp = torch.where(mask, logp, torch.full_like(logp, 50.0)).requires_grad_(True)
    logp_old = torch.where(mask, logp_old, torch.full_like(logp_old, -math.inf))
    logp_ref = torch.where(mask, logp_ref, torch.full_like(logp_ref, math.nan))

    n_global = int(mask.sum()) if agg == "token" else B
    loss, stats = grpo.grpo_loss(logp, logp_old, adv, mask, n_global, agg=agg,
                                 eps_low=eps_low, eps_high=eps_high, beta=beta,
                                 logp_ref=logp_ref if beta > 0 else None)
    loss.backward()

    want, want_grad, n_clip = _direct_loss_and_grad(
        logp.detach().tolist(), logp_old.tolist(), logp_ref.tolist(), adv.tolist(),
        mask.tolist(), eps_low, eps_high, beta, agg)
    n_tok = int(mask.sum())
    assert 3 <= n_clip <= n_tok - 3, f"test must exercise both branches, clip active on {n_clip}/{n_tok}"
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-13)
    assert (logp.grad[~mask] == 0).all()
    assert int(stats["clipped"]) == n_clip
    if beta > 0:
        d = (logp_ref - logp.detach())[mask]
        assert stats["kl_ref"].item() == pytest.approx((d.exp() - d - 1).sum().item(), rel=1e-12)


@pytest.mark.parametrize("agg", ["seq", "token"])
def test_loss_is_global_mean_across_ranks(agg):
    """Two 'ranks' with different token counts, each scaling by world_size and dividing by the
    global count (tokens or responses), averaged as FSDP does, give the single-process loss and
    gradient."""
    g = torch.Generator().manual_seed(1)
    B, R = 6, 9
    logp_old = -torch.rand(B, R, generator=g, dtype=torch.float64) * 2
    logp0 = logp_old + (torch.rand(B, R, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.arange(R)[None] < torch.tensor([9, 2, 4, 8, 1, 6])[:, None]
    n = int(mask.sum()) if agg == "token" else B

    full = logp0.clone().requires_grad_(True)
    loss_full, _ = grpo.grpo_loss(full, logp_old, adv, mask, n, agg=agg, beta=0.0)
    loss_full.backward()

    part = logp0.clone().requires_grad_(True)
    losses = []
    for rows in (slice(0, 2), slice(2, 6)):            # uneven split: 11 vs 19 tokens
        l, _ = grpo.grpo_loss(part[rows], logp_old[rows], adv[rows], mask[rows], n, agg=agg, world_size=2)
        losses.append(l)
    (sum(losses) / 2).backward()                        # FSDP: mean of the ranks' gradients
    assert (sum(losses) / 2).item() == pytest.approx(loss_full.item(), rel=1e-12)
    assert torch.allclose(part.grad, full.grad, rtol=1e-12, atol=1e-15)


def test_seq_and_token_aggregation_differ_as_the_formulas_say():
    """One long and one short response with the same per-token loss: token mean weights the long
    one by its length, Eq. 2 (seq) weights both equally."""
    logp = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)              # ratio 1: per-token loss -A
    tok, _ = grpo.grpo_loss(logp, logp, adv, mask, 5, agg="token")
    seq, _ = grpo.grpo_loss(logp, logp, adv, mask, 2, agg="seq")
    assert tok.item() == pytest.approx((-4 + 1) / 5) and seq.item() == pytest.approx((-1 + 1) / 2)
    with pytest.raises(ValueError, match="agg"):
        grpo.grpo_loss(logp, logp, adv, mask, 2, agg="mean")


# ----------------------------------------------------------------------------------------------
# log-probabilities on temperature-scaled logits

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_chunked_match_log_softmax(temperature):
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 11, 37
    logits = (torch.randn(B, T, V, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    w = torch.randn(B, T, generator=g)                  # arbitrary upstream gradient

    logp, ent = grpo.token_logprobs(logits, targets, temperature, chunk=4)   # 3 chunks
    (logp * w).sum().backward()
    got_grad = logits.grad.clone()

    x = logits.detach().double().requires_grad_(True)
    ref_all = torch.log_softmax(x / temperature, dim=-1)
    ref = ref_all.gather(-1, targets[..., None]).squeeze(-1)
    (ref * w.double()).sum().backward()
    p = ref_all.exp()
    ref_ent = -(p * ref_all).sum(-1)

    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert torch.allclose(logp.double(), ref.detach(), atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent.detach(), atol=1e-5)
    assert torch.allclose(got_grad.double(), x.grad, atol=1e-5)
    with torch.no_grad():                               # no-grad path gives the same values
        logp2, _ = grpo.token_logprobs(logits, targets, temperature, chunk=100)
    assert torch.allclose(logp2, logp.detach(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# advantages and the accuracy-band filter

def test_group_advantages_match_numpy():
    r = np.array([1.0, 0.5, 0.5, 1.6,   0.2, 0.2, 0.2, 0.2,   0.0, 1.75, 0.0, 0.0])
    G = 4
    want = []
    for grp in r.reshape(-1, G):
        want += list((grp - grp.mean()) / (grp.std(ddof=1) + 1e-6))
    got = grpo.group_advantages(torch.tensor(r), G)
    assert torch.allclose(got.double(), torch.tensor(want), atol=1e-6)
    assert (got[4:8] == 0).all()                        # identical rewards: no signal
    with pytest.raises(AssertionError, match="G >= 2"):
        grpo.group_advantages(torch.ones(3), 1)


def test_accuracy_band_keep():
    G = 10
    # group accuracies 0.0, 0.1, 0.5, 0.9, 1.0 -> keep the middle three (bounds inclusive)
    correct = torch.zeros(5, G)
    for i, k in enumerate([0, 1, 5, 9, 10]):
        correct[i, :k] = 1
    keep = grpo.accuracy_band_keep(correct.view(-1), G, 0.1, 0.9).view(5, G)
    assert keep.all(1).tolist() == [False, True, True, True, False]
    assert (keep.all(1) == keep.any(1)).all()           # whole groups kept or dropped


# ----------------------------------------------------------------------------------------------
# a tiny world: the built-in task, a tokenizer trained on it, a random tiny Qwen2.5-VL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from support import data
    import model as M
    from demo import task
    out = str(tmp_path_factory.mktemp("grpo_world"))
    train, test = task.make_task(os.path.join(out, "task"), task.TaskConfig(n_train=48, n_test=8, difficulty=1))
    recs = data.read_jsonl(train)
    texts = [json.dumps(r["messages"]) for r in recs] + [data.SYSTEM_PROMPT_REFLECT, data.SYSTEM_PROMPT_SINGLE]
    tok = data.train_tokenizer(texts, os.path.join(out, "tok"), vocab_size=400)
    cfg = M.tiny_config(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id,
                        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                        eos_token_id=tok.eos_ids, video_token_id=tok.video_pad_id, num_hidden_layers=2)
    torch.manual_seed(0)
    M.save_pretrained(M.Qwen2_5_VL(cfg), os.path.join(out, "init"), tokenizer_dir=os.path.join(out, "tok"))
    return dict(dir=out, model=os.path.join(out, "init"), train=train, test=test)


def _synthetic_roll(world, tok, P, G, R, seed=0):
    """A Rollout of P task prompts x G made-up responses of random lengths (right-padded (N, R))."""
    from support import data
    recs = data.load_records(world["train"])[:P]
    prompts = [data.encode_prompt(r, tok, data.SYSTEM_PROMPT_REFLECT) for r in recs]
    g = torch.Generator().manual_seed(seed)
    N = P * G
    lengths = torch.randint(2, R + 1, (N,), generator=g)
    tokens = torch.randint(0, tok.image_pad_id, (N, R), generator=g)
    tokens[torch.arange(R)[None] >= lengths[:, None]] = tok.pad_id
    return grpo.Rollout(records=recs, prompts=prompts, tokens=tokens, lengths=lengths, logp_old=torch.zeros(N, R),
                        texts=[""] * N, finish_reasons=["stop"] * N, scores=[], adv=torch.randn(N, generator=g),
                        keep=torch.ones(N, dtype=torch.bool), group_size=G, pad_id=tok.pad_id)


def test_policy_logprobs_match_unpadded_forward(world):
    """group_logprobs' layout (left-padded prompts with images + right-padded responses, logits of
    the response positions only) gives each row the log-probs of its own unpadded sequence."""
    from support import data
    import model as M
    tok = data.Tokenizer.from_dir(world["model"])
    net = M.from_pretrained(world["model"])
    cfg = grpo.GRPOConfig(temperature=0.8, logprob_chunk=5)
    roll = _synthetic_roll(world, tok, P=3, G=2, R=9)
    groups = torch.tensor([2, 0])                        # prompts of different lengths, any order
    rows = roll.rows(groups)
    assert rows.tolist() == [4, 5, 0, 1]
    logp, _, mask = grpo.group_logprobs(net, roll, groups, cfg, torch.device("cpu"))
    assert mask.sum() == roll.lengths[rows].sum()
    for j, i in enumerate(rows.tolist()):
        p = roll.prompts[i // 2]
        L = int(roll.lengths[i])
        ids = torch.cat([p["input_ids"], roll.tokens[i, :L]])[None]
        with torch.no_grad():
            logits = net(ids, pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])[0].double()
        Tp = len(p["input_ids"])
        want = torch.log_softmax(logits[Tp - 1:Tp + L - 1] / 0.8, -1).gather(-1, ids[0, Tp:, None])[:, 0]
        assert torch.allclose(logp[j, :L].double(), want, atol=2e-5), (i, logp[j, :L], want)


def test_grad_clip_0_means_off(world):
    """--grad_clip 0 is documented as off; clip_grad_norm_(params, 0) zeroes every gradient, so
    the update used to leave the weights exactly where they were."""
    from support import data
    from support import dist
    import model as M
    tok = data.Tokenizer.from_dir(world["model"])
    net = M.from_pretrained(world["model"])
    net.visual.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=2, n_minibatches=1, micro_batch=4, grad_clip=0.0, beta=0.0)
    roll = _synthetic_roll(world, tok, P=2, G=2, R=6)
    d = dist.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    st = grpo.update(net, opt, roll, cfg, d)
    assert st.opt_steps == 1 and st.grad_norm > 0
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in net.named_parameters() if p.requires_grad)
    assert moved > 1e-4


def test_rollout_seeds_never_collide():
    """Every sampler call of a run gets its own seed (generate_texts adds k for call k), also with
    more than 101 prompts per rank (the old rank * 101 + c collided there: rank 0's call at
    c = 101 and rank 1's first call)."""
    for P, W, rb in ((512, 2, 1), (256, 4, 3), (16, 2, 8)):
        cfg = grpo.GRPOConfig(prompts_per_step=P, rollout_batch=rb, seed=5)
        calls = -(-P // W // rb)
        seeds = [data.rollout_seed(cfg.seed, step, cfg.prompts_per_step, r, W) + k for step in range(4) for r in range(W) for k in range(calls)]
        assert len(set(seeds)) == len(seeds), (P, W, rb)
    old = lambda r, c: r * 101 + c                                     # the former formula (same step)
    assert old(0, 101) == old(1, 0)


# ----------------------------------------------------------------------------------------------
# one process vs torchrun --nproc_per_node=2: the same update for the same global batch

UPDATE_SCRIPT = r'''
import dataclasses, json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import grpo, model as M
from support import data, dist, training
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_grpo import _synthetic_roll

world = json.loads(sys.argv[2]); out = sys.argv[3]
d = dist.init()
for agg in ("seq", "token"):                # both aggregations, each from the initial weights
    cfg = grpo.GRPOConfig(prompts_per_step=4, group_size=4, n_minibatches=2, micro_batch=4, mu=2, lr=1e-3,
                          eps_low=0.2, eps_high=0.28, beta=float(sys.argv[4]), grad_clip=0.5, loss_agg=agg)
    grpo.check_config(cfg, d.world_size)
    tok = data.Tokenizer.from_dir(world["model"])
    policy = M.from_pretrained(world["model"]); policy.visual.requires_grad_(False)
    dist.shard_model(policy)
    ref = None
    if cfg.beta > 0:
        ref = M.from_pretrained(world["model"]).requires_grad_(False)
        dist.shard_model(ref)
    opt = training.make_optimizer(policy, cfg.lr, cfg.weight_decay)

    # the GLOBAL batch: 4 prompts x 4 responses; prompt 1's group filtered out; logp_old = the
    # model's own log-probs + noise, so that the clip is active on some tokens
    G, P, R = 4, 4, 10
    roll = _synthetic_roll(world, tok, P, G, R, seed=0)
    roll.keep[G:2 * G] = False
    with torch.no_grad():
        lp, _, mask = grpo.group_logprobs(policy, roll, torch.arange(P), cfg, d.device)
    noise = torch.randn(P * G, R, generator=torch.Generator().manual_seed(1)) * 0.3
    roll.logp_old[:, :lp.shape[1]] = lp + noise[:, :lp.shape[1]]
    ref_lp = grpo.rows_logprobs(ref, roll, cfg, d) if ref is not None else None

    # this rank's block of prompts
    Pl = P // d.world_size
    rows = slice(d.rank * Pl * G, (d.rank + 1) * Pl * G)
    mine = dataclasses.replace(roll, records=roll.records[d.rank * Pl:(d.rank + 1) * Pl],
                               prompts=roll.prompts[d.rank * Pl:(d.rank + 1) * Pl], tokens=roll.tokens[rows],
                               lengths=roll.lengths[rows], logp_old=roll.logp_old[rows], adv=roll.adv[rows],
                               keep=roll.keep[rows])
    st = grpo.update(policy, opt, mine, cfg, d, None if ref_lp is None else ref_lp[rows])
    sums = {k: v for k, v in dataclasses.asdict(st).items() if k not in ("loss", "grad_norm", "opt_steps")}
    sums = dict(zip(sorted(sums), dist.all_reduce(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64)).tolist()))
    sums.update(loss=st.loss, grad_norm=st.grad_norm, opt_steps=st.opt_steps)
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, f"{out}_{agg}.safetensors")
        with open(f"{out}_{agg}.json", "w") as f:
            json.dump(sums, f)
    del policy, ref, opt, sd
dist.close()
dist.exit_worker()
'''


def _run_update(world, tmp_path, nproc, beta):
    script = tmp_path / "update_check.py"
    script.write_text(UPDATE_SCRIPT)
    out = str(tmp_path / f"update_{nproc}_{beta}")
    w = json.dumps({k: world[k] for k in ("model", "train")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script), ROOT, w, out, str(beta)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(script), ROOT, w, out, str(beta)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from safetensors.torch import load_file
    res = {}
    for agg in ("seq", "token"):
        with open(f"{out}_{agg}.json") as f:
            res[agg] = load_file(f"{out}_{agg}.safetensors"), json.load(f)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.1])     # beta > 0: the sharded reference model too
def test_one_vs_two_processes_same_update(world, tmp_path, beta):
    import model as M
    init = M.from_pretrained(world["model"]).state_dict()
    one, two = _run_update(world, tmp_path, 1, beta), _run_update(world, tmp_path, 2, beta)
    emb = next(k for k in init if k.endswith("embed_tokens.weight"))
    assert not torch.equal(one["seq"][0][emb], one["token"][0][emb])   # the two aggregations differ
    for agg in ("seq", "token"):
        (w1, s1), (w2, s2) = one[agg], two[agg]
        # the same tokens, clipped tokens, loss and gradient norm over the global batch...
        assert s1["opt_steps"] == 4 and s2["opt_steps"] == 4                # global: the same on every rank
        assert s1["tokens"] == s2["tokens"] and s1["clipped"] == s2["clipped"] and s1["clipped"] > 0
        assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5, abs=1e-7)
        assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-5)
        if beta > 0:
            assert s1["kl_ref"] > 0 and s1["kl_ref"] == pytest.approx(s2["kl_ref"], rel=1e-4)
        # ... and the same weights after the 4 AdamW steps (2 passes x 2 mini-batches)
        # (AdamW divides by sqrt(v): on elements whose gradient is ~0 float noise of the 2-rank
        # reduction shows up at ~1e-3 of lr, so compare the update direction and size)
        moved = 0.0
        for k, v in w1.items():
            d1, d2 = v - init[k], w2[k] - init[k]
            if k.startswith("visual."):
                assert torch.equal(v, init[k]) and torch.equal(w2[k], init[k]), f"{k}: frozen vision tower changed"
                continue
            assert d1.norm() > 0, k
            assert (d1 - d2).norm() <= 1e-3 * d1.norm(), (agg, k, float((d1 - d2).norm() / d1.norm()))
            assert (d1 - d2).abs().max() <= 1e-2 * 1e-3, (agg, k, float((d1 - d2).abs().max()))   # 1% of lr
            moved = max(moved, float(d1.abs().max()))
        assert moved > 1e-3                                               # the update did something


# ----------------------------------------------------------------------------------------------
# the whole loop: kill -9 + resume, NaN stop, torchrun
#
# A random tiny model never writes a well-formed answer, so every reward would be 0 and nothing
# would train. These tests are about the loop's mechanics, so they swap in a stand-in reward:
# a fixed function of the response text that varies within a group.

def fake_score_batch(responses, gts, mode="srpo", count_tokens=None, cfg=None, options=None):
    out = []
    for r in responses:
        k = sum(r.encode()) % 5
        out.append(reward.Score(total=k / 4, format=0.0, accuracy=k / 4, length=0.0, first_correct=k >= 3,
                        final_correct=k >= 2, case="none"))
    return out


def chars_metric(texts, records):
    """A stand-in for a task's metric passed with --extra_metrics: (sum, count)."""
    assert len(texts) == len(records)
    return {"chars": (sum(len(t) for t in texts), len(texts))}


RUN_SCRIPT = r'''
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import grpo, reward
from test_grpo import fake_score_batch
reward.score_batch = fake_score_batch
grpo.main(grpo.parse_args(sys.argv[2:]))
'''


def _loop_args(world, out, steps, **kw):
    args = dict(model=world["model"], train=world["train"], out=out, steps=steps,
                save_every=1, prompts_per_step=4, group_size=4, max_new_tokens=12,
                rollout_batch=2, n_minibatches=2, micro_batch=8, lr=1e-3, seed=3, threads=1)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _steps_logged(out):
    from support import data
    path = os.path.join(out, "log.jsonl")
    return data.read_jsonl(path, allow_torn_tail=True) if os.path.exists(path) else []


def _ckpt_step(out):
    try:
        with open(os.path.join(out, "checkpoint", "train_state.json")) as f:
            return json.load(f)["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _without_timing(records):
    return [{k: v for k, v in r.items() if not k.endswith("_s") and "tok_s" not in k} for r in records]


@pytest.mark.slow
def test_kill_9_and_resume_matches_uninterrupted_run(world, tmp_path):
    import signal
    import time
    from safetensors.torch import load_file
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    # eager decoding: a cold torch.compile of the decode step costs ~25 s in each of the 4 runs
    # here, and this test is about the loop (test_sampler.py covers the compiled path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SRPO_COMPILE": "0"}
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    p = subprocess.run([sys.executable, str(script), ROOT] + _loop_args(world, full, 4),
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, str(script), ROOT] + _loop_args(world, killed, 4),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while _ckpt_step(killed) < 2 and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= _ckpt_step(killed) < 4
    p = subprocess.run([sys.executable, str(script), ROOT] + _loop_args(world, killed, 4),
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming at step" in p.stdout

    a = load_file(os.path.join(full, "checkpoint", "model.safetensors"))
    b = load_file(os.path.join(killed, "checkpoint", "model.safetensors"))
    init = load_file(os.path.join(world["model"], "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)           # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + resume"
    final = load_file(os.path.join(killed, "model.safetensors"))     # HF export in out/ itself
    assert all(torch.equal(final[k], b[k]) for k in b)
    assert os.path.exists(os.path.join(killed, "tokenizer.json"))
    la, lb = _steps_logged(full), _steps_logged(killed)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]                    # no duplicates (in-run eval is off)
    assert _without_timing(la) == _without_timing(lb)
    assert la[0]["opt_steps"] == 2 and la[0]["groups_kept"] > 0
    # resuming with another training config is refused, naming the field
    p = subprocess.run([sys.executable, str(script), ROOT] + _loop_args(world, killed, 5, lr=2e-3),
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "another config" in p.stderr and "lr: 0.001 -> 0.002" in p.stderr


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    import model as M
    import reward
    monkeypatch.setattr(reward, "score_batch", fake_score_batch)
    monkeypatch.setenv("SRPO_COMPILE", "0")                          # the loop, not the compiled decoder
    step = {"n": 0}
    update, loss_fn = grpo.update, grpo.grpo_loss

    def counting_update(*a, **k):
        step["n"] += 1
        return update(*a, **k)

    def nan_at_step_3(*a, **k):
        loss, st = loss_fn(*a, **k)
        return (loss * float("nan") if step["n"] == 3 else loss), st

    monkeypatch.setattr(grpo, "update", counting_update)
    monkeypatch.setattr(grpo, "grpo_loss", nan_at_step_3)
    out = str(tmp_path / "nan")
    cfg = grpo.parse_args(_loop_args(world, out, 4, max_new_tokens=8))
    with pytest.raises(checkpoint.NonFiniteLoss) as e:
        grpo.main(cfg)
    msg = str(e.value)
    assert "step 3" in msg and "nan" in msg.lower() and "Last good checkpoint" in msg and "(step 2)" in msg
    assert _ckpt_step(out) == 2                                     # not overwritten by the bad step
    net = M.from_pretrained(os.path.join(out, "checkpoint"))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    log = _steps_logged(out)
    assert [r["step"] for r in log] == [1, 2, 3] and "error" in log[-1]
    # a kill between save's two renames (checkpoint -> .old done, .tmp -> checkpoint not yet):
    # the rerun takes the complete .tmp back and resumes at step 2, not at 0
    os.rename(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp"))
    os.makedirs(os.path.join(out, "checkpoint.old"))
    grpo.main(grpo.parse_args(_loop_args(world, out, 2, max_new_tokens=8)))     # nothing left to train
    assert _ckpt_step(out) == 2 and os.path.isdir(os.path.join(out, "checkpoint.old"))
    assert [r["step"] for r in _steps_logged(out)] == [1, 2]                   # truncated to the checkpoint
    assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
def test_torchrun_two_processes_full_loop(world, tmp_path):
    """The loop under torchrun --nproc_per_node=2 (FSDP2, gloo): rollouts, reference model,
    eval and checkpoints run without a hang and log what they should."""
    import model as M
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(30500 + os.getpid() % 1000), str(script), ROOT] + _loop_args(
        world, out, 2, beta=0.05, max_new_tokens=10, grad_checkpoint=1, logp_old="recompute",
        extra_metrics="test_grpo:chars_metric", eval_every=2, test=world["test"], eval_limit=7)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log, evals = [r for r in _steps_logged(out) if "eval" not in r], [r for r in _steps_logged(out) if "eval" in r]
    assert [r["step"] for r in log] == [1, 2]
    # in-run evaluation: 7 questions split 4 + 3 over the ranks (padded to 4), every answer gathered once
    assert [r["step"] for r in evals] == [2] and evals[0]["test_n_questions"] == 7
    assert sum(evals[0][f"test_{c}"] for c in grpo.CASES) == 7
    for r in log:
        assert sum(v for k, v in r.items() if k.startswith("case_")) == 16          # 4 prompts x 4, both ranks
        assert r["kl_ref"] >= 0 and 0 <= r["clip_frac"] <= 1 and r["entropy"] > 0
        assert 1 <= r["opt_steps"] <= 2 and r["rollout_tok_s"] > 0 and r["train_tok_s"] > 0
        # fp32 on CPU: the sampler and the training forward agree (the recomputed logp_old is exact)
        assert 0 <= r["logp_old_mismatch"] < 1e-4
        assert r["chars"] >= 0                                                   # --extra_metrics, both ranks
    net = M.from_pretrained(os.path.join(out, "checkpoint"))
    assert _ckpt_step(out) == 2 and all(torch.isfinite(p).all() for p in net.parameters())


def test_special_token_ids_must_match_the_tokenizer(world, tmp_path):
    """A config.json whose video_token_id points at a format tag (the sampler never draws video
    ids, so the policy could never write <reflection>) is refused with the field named."""
    import shutil

    import model as M
    from support import data
    bad = tmp_path / "bad"
    shutil.copytree(world["model"], bad)
    tok = data.Tokenizer.from_dir(str(bad))
    with open(bad / "config.json") as f:
        c = json.load(f)
    c["video_token_id"] = tok.tok.token_to_id("<reflection>")
    with open(bad / "config.json", "w") as f:
        json.dump(c, f)
    checkpoint.check_special_tokens("grpo.py", world["model"], tok, M.read_config(world["model"]))  # the good one passes
    with pytest.raises(ValueError, match=r"video_token_id = \d+ is '<reflection>'"):
        grpo.main(grpo.parse_args(["--model", str(bad), "--train", world["train"], "--out", str(tmp_path / "o")]))


def test_cli_accepts_both_flag_spellings():
    """--max_new_tokens and --max-new-tokens set the same field (as in sft.py and reflect_data.py)."""
    a = grpo.parse_args(["--max_new_tokens", "64", "--prompts-per-step", "4", "--freeze_vision", "0"])
    b = grpo.parse_args(["--max-new-tokens", "64", "--prompts_per_step", "4", "--freeze-vision", "0"])
    assert a == b and a.max_new_tokens == 64 and a.prompts_per_step == 4 and a.freeze_vision is False


# ----------------------------------------------------------------------------------------------
# bad input fails before training, naming the flag / file:line

@pytest.mark.parametrize("argv,flag", [
    (["--adv_eps", "0"], "adv_eps"),                                  # 0 / 0 = NaN advantages
    (["--acc_low", "0.9", "--acc_high", "0.1"], "acc_low"),
    (["--eval_every", "-1"], "eval_every"),
    (["--prompts_per_step", "0"], "prompts_per_step"),
    (["--logprob_chunk", "0"], "logprob_chunk"),
    (["--eps_high", "-1"], "eps_high"),
    (["--lr", "inf"], "lr"),
    (["--grad_clip", "-1"], "grad_clip"),
    (["--top_p", "0"], "top_p"),
])
def test_bad_values_name_their_flag(argv, flag):
    with pytest.raises(ValueError, match=f"--{flag} "):
        grpo.parse_args(argv)


def test_bad_training_files_fail_at_load_naming_file_and_line(world, tmp_path):
    # (data.load_records' own errors: tests/test_data.py)
    recs = [json.loads(l) for l in open(world["train"]) if l.strip()][:4]
    recs[2]["answer"] = ""                                           # the reward could never score it
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):           # before any model is built or file written
        grpo.main(grpo.parse_args(["--model", world["model"], "--train", str(bad), "--out", str(tmp_path / "o")]))
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")


def test_out_equal_to_or_inside_model_is_refused_before_writing(world, tmp_path):
    import shutil
    m = str(tmp_path / "m")
    shutil.copytree(world["model"], m)
    before = sorted(os.listdir(m))
    for out in (m, os.path.join(m, "run")):
        with pytest.raises(ValueError, match="overwrite its own input"):
            grpo.main(grpo.parse_args(["--model", m, "--train", world["train"], "--out", out]))
    assert sorted(os.listdir(m)) == before


def test_reward_flags_reach_the_reward_config():
    """--reward_preset / --length_weight / --effectiveness map to reward.RewardConfig fields; the
    default is the paper's reward; a combination the reward rejects names the flags."""
    assert grpo.reward_config(grpo.parse_args([])) == reward.RewardConfig(preset="paper")
    assert grpo.reward_config(grpo.parse_args(["--length_weight", "0"])).length_weight == 0.0
    assert grpo.reward_config(grpo.parse_args(["--reward_preset", "code"])).preset == "code"
    assert grpo.reward_config(grpo.parse_args(["--effectiveness", "0"])).effectiveness is False
    with pytest.raises(ValueError, match="--reward_preset code --effectiveness 0"):
        grpo.reward_config(grpo.parse_args(["--reward_preset", "code", "--effectiveness", "0"]))
    with pytest.raises(SystemExit):
        grpo.parse_args(["--reward_preset", "papr"])


def test_lr_schedule_and_weight_decay_groups(world):
    cfg = grpo.GRPOConfig(lr=1.0, steps=10)
    assert [grpo.lr_at(s, cfg) for s in range(10)] == [1.0] * 10        # default: constant
    cfg = grpo.GRPOConfig(lr=1.0, steps=102, warmup_frac=0.03, min_lr_frac=0.1)   # the paper's code
    assert [grpo.lr_at(s, cfg) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert grpo.lr_at(3, cfg) == pytest.approx(1.0) and grpo.lr_at(101, cfg) == pytest.approx(0.1)
    assert grpo.lr_at(52, cfg) == pytest.approx(0.55, abs=0.01)         # halfway down the cosine
    import model as M
    net = M.from_pretrained(world["model"])
    opt = training.make_optimizer(net, 1e-3, weight_decay=0.1)                 # as grpo.setup calls it
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n and "embed_tokens" not in n for n in decayed)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_in_run_evaluation_is_eval_py_on_the_same_weights(world, tmp_path, monkeypatch):
    """--eval_every N --test FILE: after every N-th step (and the last) one log record
    {"step", "eval": true, "test_<eval.py metric>"}, computed by eval.py's own code: equal to
    eval.py run on that step's checkpoint. Off (the default), no such record is written."""
    import eval as ev
    monkeypatch.setattr(reward, "score_batch", fake_score_batch)     # the training needs rewards that vary
    monkeypatch.setenv("SRPO_COMPILE", "0")
    out = str(tmp_path / "ev")
    grpo.main(grpo.parse_args(_loop_args(world, out, 2, eval_every=1, test=world["test"], eval_limit=5)))
    log = _steps_logged(out)
    assert [(r["step"], "eval" in r) for r in log] == [(1, False), (1, True), (2, False), (2, True)]
    assert log[1]["test_n_questions"] == 5 and log[1]["test_n_samples"] == 5
    # eval.py on the final weights (the step-2 checkpoint exported to out/), with the settings grpo.py uses
    cfg = ev.EvalConfig(prompt="reflect", max_new_tokens=12, batch_size=2, seed=3)
    rows = ev.evaluate([out], ev.load_datasets([world["test"]], [], "", 5), cfg, str(tmp_path / "eval"))
    want = {k: v for k, v in rows[0]["metrics"].items() if k not in ("skipped_bad_answer", "skipped_bad_record", "seconds")}
    assert {k[len("test_"):]: v for k, v in log[3].items() if k.startswith("test_")} == want
    assert want["mean_len"] > 0
    with pytest.raises(ValueError, match="--eval_every 1: needs --test FILE"):
        grpo.parse_args(["--eval_every", "1"])


# ----------------------------------------------------------------------------------------------
# dynamic sampling (--dynamic_sampling K, DAPO): more rounds until enough groups pass the filter

@pytest.mark.parametrize("K, kept_per_round, rounds", [(0, [0], 1), (3, [1, 2, 4, 4], 3), (2, [0, 0, 0], 3),
                                                      (2, [4, 0, 0], 1)])
def test_dynamic_sampling_rounds(monkeypatch, K, kept_per_round, rounds):
    """Round r of step s samples stream slice s(K+1)+r with its own seed, until the kept groups of
    all rounds reach prompts_per_step or K more rounds ran; the rounds' rows are concatenated
    (responses padded to the longest). K = 0 is the plain step: slice s, seed rollout_seed(s)."""
    from support import dist
    P, G, step, n_records = 4, 2, 5, 50
    cfg = grpo.GRPOConfig(prompts_per_step=P, group_size=G, dynamic_sampling=K, seed=3)
    d = dist.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    records = [{"i": i} for i in range(n_records)]
    calls = []

    def fake_rollout(policy, tok, recs, cfg_, d_, seed, rcfg, system_prompt):
        k = kept_per_round[len(calls)]
        calls.append(([r["i"] for r in recs], seed))
        R = 3 + len(calls)                                             # each round's responses longer
        keep = torch.zeros(P * G, dtype=torch.bool)
        keep[:k * G] = True
        return grpo.Rollout(records=recs, prompts=[{}] * P, tokens=torch.full((P * G, R), len(calls)),
                            lengths=torch.full((P * G,), R), logp_old=torch.full((P * G, R), -1.0),
                            texts=[""] * (P * G), finish_reasons=["stop"] * (P * G), scores=[None] * (P * G),
                            adv=torch.zeros(P * G), keep=keep, group_size=G, pad_id=0)

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    roll, n = grpo.sample_step(None, None, records, cfg, d, step, None, "")
    assert n == rounds == len(calls)
    for r, (idx, seed) in enumerate(calls):
        s = step * (K + 1) + r
        assert idx == data.step_prompts(n_records, s, P, cfg.seed) and seed == data.rollout_seed(cfg.seed, s, P, 0, 1)
    assert len({seed for _, seed in calls}) == rounds
    assert [r["i"] for r in roll.records] == [i for idx, _ in calls for i in idx]
    R = 3 + rounds
    assert roll.tokens.shape == (rounds * P * G, R) and roll.logp_old.shape == (rounds * P * G, R)
    for r in range(rounds):
        rows = slice(r * P * G, (r + 1) * P * G)
        assert (roll.tokens[rows, :4 + r] == r + 1).all() and (roll.tokens[rows, 4 + r:] == 0).all()
        assert (roll.logp_old[rows, 4 + r:] == 0).all()
    assert int(roll.keep.sum()) == G * sum(kept_per_round[:rounds])


# bad records: refused before the first step, or dropped with --skip_bad_records (data.validate_records)

@pytest.mark.parametrize("name", ["zero-byte image", "truncated png", "truncated jpeg", "bomb over PIL's limit",
                                  "control token in the question text", "messages not a list",
                                  "3.6M-character question", "NaN answer"])
def test_bad_record_refused_before_the_first_step(world, tmp_path, name):
    """A bad record anywhere in --train stops the run at start, naming file:line and the field,
    before anything is written to --out (it used to crash the step that first drew it, and again
    on every resume)."""
    import re
    from test_bad_records import VARIANTS, write_set
    files, line, want = VARIANTS[name]
    path = write_set(tmp_path / "d", files, line)
    out = tmp_path / "o"
    with pytest.raises(checkpoint.RunError) as e:
        grpo.main(grpo.parse_args(_loop_args(world, str(out), 1, train=path)))
    assert str(e.value).startswith(f"grpo.py: {path}:2: ") and re.search(want, str(e.value).split(":2: ", 1)[1])
    assert not os.path.exists(out / "log.jsonl") and not os.path.exists(out / "checkpoint")


def test_skip_bad_records_trains_on_the_rest(world, tmp_path, capsys, monkeypatch):
    from test_bad_records import VARIANTS, write_set
    monkeypatch.setenv("SRPO_COMPILE", "0")
    path = write_set(tmp_path / "d", *VARIANTS["truncated png"][:2])
    out = str(tmp_path / "o")
    grpo.main(grpo.parse_args(_loop_args(world, out, 1, train=path, skip_bad_records=1, prompts_per_step=2,
                                         group_size=2, micro_batch=4, max_new_tokens=4)))
    assert [r["step"] for r in _steps_logged(out)] == [1]
    assert json.load(open(os.path.join(out, "run_config.json")))["skipped_bad_records"][0].startswith(f"{path}:2: ")
    assert f"grpo.py: {path}: skipped 1 bad record(s) of 3 (--skip_bad_records): {path}:2: " in capsys.readouterr().err
