"""dist.py: single-process fallbacks, and (slow) torchrun x2 with FSDP2 sharding on gloo, including a
checkpoint.save / load round trip of the sharded model (checkpoint tests: test_checkpoint.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from support import checkpoint
from support import dist
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vision_depth=2, vision_hidden_size=32, vision_intermediate_size=64,
            vision_num_heads=2, vision_fullatt_block_indexes=[1])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return M.Qwen2_5_VL(M.tiny_config(**TINY))


def train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 50, (2, 12), generator=g)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def test_single_process_fallbacks(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = dist.init()
    assert (d.rank, d.world_size, d.is_main) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce(t, "sum"), torch.tensor([1.0, 2.0]))
    m = tiny_model()
    assert dist.shard_model(m) is m and not any(type(p).__name__ == "DTensor" for p in m.parameters())


SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.environ["ROOT"]); sys.path.insert(0, os.environ["TESTS"])
    import model as M
    from support import checkpoint, dist
    from safetensors.torch import save_file
    from test_dist import tiny_model, make_opt, train_steps
    d = dist.init()
    assert d.world_size == 2 and torch.distributed.get_backend() == "gloo"
    t = dist.all_reduce(torch.tensor([float(d.rank + 1)]), "sum")
    assert t.item() == 3.0, t
    m = tiny_model()
    dist.shard_model(m)
    w = m.layers[0].mlp.gate_proj.weight if hasattr(m.layers[0], "mlp") else next(m.layers[0].parameters())
    assert type(w).__name__ == "DTensor" and w.to_local().shape[0] * 2 == w.shape[0]
    assert type(next(m.visual.blocks[0].parameters())).__name__ == "DTensor"
    opt = make_opt(m)
    train_steps(m, opt, 2)
    path = os.environ["CKPT"]
    checkpoint.save(path, m, opt, step=2, extra={"rank_count": d.world_size})
    # what the two ranks hold, put together (full_tensor: a collective), for the 1-process resume
    ref = {"w/" + n: p.full_tensor() for n, p in m.named_parameters()}
    ref.update({f"o/{n}/{k}": v.full_tensor() if hasattr(v, "full_tensor") else v
                for n, p in m.named_parameters() for k, v in opt.state.get(p, {}).items()})
    if d.rank == 0:
        save_file({k: v.contiguous() for k, v in ref.items()}, os.environ["REF"])
    m2 = tiny_model(seed=1); m2.train()   # other weights: the checkpoint must bring them
    dist.shard_model(m2)
    opt2 = make_opt(m2)
    step, extra = checkpoint.load(path, m2, opt2)
    assert step == 2 and extra == {"rank_count": 2}
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), n
    for p, p2 in zip(m.parameters(), m2.parameters()):
        if "exp_avg" not in opt.state[p]:  # never had a gradient (vision tower: text-only data)
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k].full_tensor(), opt2.state[p2][k].full_tensor())
        assert torch.equal(opt.state[p]["step"], opt2.state[p2]["step"])
    assert set(opt2.state) == {p2 for p, p2 in zip(m.parameters(), m2.parameters()) if opt.state.get(p)}
    train_steps(m, opt, 1, seed=1); train_steps(m2, opt2, 1, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    after = {n: p.full_tensor() for n, p in m.named_parameters()}
    if d.rank == 0:
        save_file({k: v.contiguous() for k, v in after.items()}, os.environ["REF"] + ".after")
    del m, m2, opt, opt2, a, b, ref, after  # free the sharded tensors before the process group goes
    dist.close()
    print("OK", d.rank)
    dist.exit_worker()  # skip the interpreter teardown, where gloo can abort a finished worker
""")


@pytest.mark.slow
def test_fsdp_two_processes_save_load(tmp_path):
    """torchrun x2 (gloo): params are sharded DTensors, all_reduce sums, the sharded (DCP)
    checkpoint of a sharded model reloads into a freshly sharded model with other weights: identical
    weights, optimizer state and next step. The same checkpoint resumes in ONE process to the
    weights and optimizer state the two ranks held (bitwise) and the same next step; the HF
    export equals a single process trained the same way (FSDP averages the gradients of
    identical data = the single-process gradient)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, ROOT=ROOT, TESTS=os.path.join(ROOT, "tests"), CKPT=str(tmp_path / "ck"), OMP_NUM_THREADS="1",
               REF=str(tmp_path / "ref.safetensors"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout[-3000:] + r.stderr[-3000:]
    single = tiny_model()
    opt = make_opt(single)
    train_steps(single, opt, 2)
    saved = M.from_pretrained(str(tmp_path / "ck"))
    for (n, a), b in zip(single.named_parameters(), saved.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=n)
    # resume in one process what two wrote
    from safetensors.torch import load_file
    ref, after = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "ref.safetensors.after"))
    one = tiny_model(seed=1)
    one.train()
    opt1 = make_opt(one)
    assert not torch.equal(one.embed_tokens.weight, ref["w/embed_tokens.weight"])
    step, extra = checkpoint.load(str(tmp_path / "ck"), one, opt1)
    assert step == 2 and extra == {"rank_count": 2}
    for n, p in one.named_parameters():
        assert torch.equal(p, ref["w/" + n]), n
    moments = {f"o/{n}/{k}": v for n, p in one.named_parameters() for k, v in opt1.state.get(p, {}).items()}
    assert moments.keys() == {k for k in ref if k.startswith("o/")} and len(moments) > 0
    for k, v in moments.items():
        assert torch.equal(v, ref[k]), k
    assert opt1.param_groups[0]["betas"] == (0.9, 0.95) and opt1.param_groups[0]["weight_decay"] == 0.1
    full = checkpoint.read_optimizer_state(str(tmp_path / "ck"))
    assert full.keys() == {k[2:] for k in moments} and all(torch.equal(full[k[2:]], v) for k, v in moments.items())
    train_steps(one, opt1, 1, seed=1)
    for n, p in one.named_parameters():
        torch.testing.assert_close(p, after[n], rtol=0, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# bf16: FSDP2 mixed precision (one process: dist.shard_model starts a process group of one)

@pytest.fixture(scope="module")
def bf16_world(tmp_path_factory):
    """The built-in task, a tokenizer trained on it, a random tiny Qwen2.5-VL with UNTIED
    embeddings (as the 7B: embed_tokens and lm_head are separate FSDP units). Tears down the
    one-process group the bf16 sharding starts, so later tests see a plain process."""
    import json
    from support import data
    from demo import task
    out = str(tmp_path_factory.mktemp("bf16_world"))
    train, _ = task.make_task(os.path.join(out, "task"), task.TaskConfig(n_train=8, n_test=2, difficulty=1))
    recs = data.read_jsonl(train)
    texts = [json.dumps(r["messages"]) for r in recs] + [data.SYSTEM_PROMPT_REFLECT, data.SYSTEM_PROMPT_SINGLE]
    tok = data.train_tokenizer(texts, os.path.join(out, "tok"), vocab_size=400)
    cfg = M.tiny_config(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id,
                        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                        eos_token_id=tok.eos_ids, video_token_id=tok.video_pad_id, num_hidden_layers=2,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    net = M.Qwen2_5_VL(cfg)
    with torch.no_grad():   # a non-trivial output distribution (N(0, 0.02) weights give ~uniform logits)
        net.lm_head.weight.normal_(0, 1.0)
    M.save_pretrained(net, os.path.join(out, "init"), tokenizer_dir=os.path.join(out, "tok"))
    yield dict(model=os.path.join(out, "init"), train=train, tok=tok)
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _bf16_setup(w, beta):
    from support import data
    import grpo
    cfg = grpo.GRPOConfig(model=w["model"], precision="bf16", beta=beta, prompts_per_step=2, group_size=4,
                          max_new_tokens=12, rollout_batch=2, micro_batch=4, n_minibatches=1, logprob_chunk=8)
    d = dist.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    policy, ref, opt = grpo.build_models(cfg, d, w["model"])
    records = data.load_records(w["train"])[:2]
    return cfg, d, policy, ref, opt, records, data


def test_bf16_rollout_and_recomputed_logp_old_give_ratio_1_at_step_0(bf16_world, monkeypatch):
    """--precision bf16 in one process: the parameters are fp32 DTensors (the master weights), the
    sampler's KV cache is bf16 (the gathered copy's dtype, no autocast), and logp_old recomputed
    with the training forward makes the PPO ratio 1 within 1e-3 on every response token of the
    update's micro-batches (which group the rows differently from the recompute). The sampler's
    own bf16 log-probs are further off than that: the test can tell the two apart."""
    import grpo
    cfg, d, policy, _, opt, records, data = _bf16_setup(bf16_world, beta=0.0)
    w = policy.layers[0].self_attn.q_proj.weight
    assert type(w).__name__ == "DTensor" and w.dtype == torch.float32
    made = []
    real_cache = M.KVCache
    monkeypatch.setattr(M, "KVCache", lambda *a, **k: made.append(real_cache(*a, **k)) or made[-1])
    roll = grpo.rollout(policy, bf16_world["tok"], records, cfg, d, 0, grpo.reward_config(cfg), data.SYSTEM_PROMPT_REFLECT)
    assert made and all(c.k.dtype == torch.bfloat16 for c in made), [c.k.dtype for c in made]
    sampled = roll.logp_old.clone()
    grpo.recompute_logp_old(policy, roll, cfg, d)
    worst_train, worst_sampler = 0.0, 0.0
    for groups in (torch.tensor([1]), torch.tensor([0])):              # one group per micro-batch, as in update
        logp, _, mask = grpo.group_logprobs(policy, roll, groups, cfg, d.device)   # grad enabled: the training forward
        assert logp.requires_grad and mask.any()
        rows, R = roll.rows(groups), mask.shape[1]
        ratio = torch.exp(logp.detach() - roll.logp_old[rows, :R])[mask]
        worst_train = max(worst_train, float((ratio - 1).abs().max()))
        worst_sampler = max(worst_sampler, float((torch.exp(logp.detach() - sampled[rows, :R])[mask] - 1).abs().max()))
    print(f"bf16 max |ratio - 1|: recomputed {worst_train:.2e}, sampler's {worst_sampler:.2e}")
    assert worst_train <= 1e-3, worst_train
    assert worst_sampler > 1e-3, worst_sampler
    roll.keep[:] = True                                                # a random model's groups would all be filtered
    roll.adv = torch.randn(roll.adv.shape, generator=torch.Generator().manual_seed(0))
    us = grpo.update(policy, opt, roll, cfg, d)                        # the whole update runs in bf16
    assert us.opt_steps == 1 and us.clipped == 0 and us.kl_old / us.tokens <= 1e-6, us
    assert w.dtype == torch.float32 and all(p.grad is None or p.grad.dtype == torch.float32 for p in policy.parameters())


def test_bf16_policy_and_reference_start_at_kl_0(bf16_world):
    """The reference runs the policy's precision path (fp32 weights, the same FSDP2 bf16 policy):
    k3 KL <= 1e-6 at step 0. A reference in fp32 (a different path) is measurably off, so the
    bound is not vacuous."""
    import grpo
    cfg, d, policy, ref, _, records, data = _bf16_setup(bf16_world, beta=0.04)
    roll = grpo.rollout(policy, bf16_world["tok"], records, cfg, d, 1, grpo.reward_config(cfg), data.SYSTEM_PROMPT_REFLECT)
    m = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
    logp = grpo.rows_logprobs(policy, roll, cfg, d)

    def kl(other):
        dr = (other - logp)[m]
        return float((torch.exp(dr) - dr - 1).mean())

    same, fp32 = kl(grpo.rows_logprobs(ref, roll, cfg, d)), kl(grpo.rows_logprobs(M.from_pretrained(cfg.model), roll, cfg, d))
    print(f"bf16 KL(policy, reference) at step 0: same path {same:.2e}, fp32 reference {fp32:.2e}")
    assert same <= 1e-6, same
    assert fp32 > 1e-6, fp32
