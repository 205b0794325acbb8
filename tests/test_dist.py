"""dist.py: single-process fallbacks, and (slow) torchrun x2 with FSDP2 sharding on gloo, including a
checkpoint.save / load round trip of the sharded model (checkpoint tests: test_checkpoint.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dist
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
    import checkpoint, dist, model as M
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
    m2 = M.from_pretrained(path); m2.train()
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
    train_steps(m, opt, 1, seed=1); train_steps(m2, opt2, 1, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    del m, m2, opt, opt2, a, b  # free the sharded tensors before the process group goes
    dist.close()
    print("OK", d.rank)
    dist.exit_worker()  # skip the interpreter teardown, where gloo can abort a finished worker
""")


@pytest.mark.slow
def test_fsdp_two_processes_save_load(tmp_path):
    """torchrun x2 (gloo): params are sharded DTensors, all_reduce sums, the checkpoint of a sharded
    model reloads into a freshly sharded one with identical weights, optimizer state and next step;
    the saved weights equal a single process trained the same way (FSDP averages the gradients
    of identical data = the single-process gradient)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, ROOT=ROOT, TESTS=os.path.join(ROOT, "tests"), CKPT=str(tmp_path / "ck"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout[-3000:] + r.stderr[-3000:]
    single = tiny_model()
    opt = make_opt(single)
    train_steps(single, opt, 2)
    saved = M.from_pretrained(str(tmp_path / "ck"))
    for (n, a), b in zip(single.named_parameters(), saved.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=n)
