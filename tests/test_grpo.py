"""Tests for grpo.py: the loss and its gradient against a direct per-token computation of the
formula in ../shared/SRPO.md, log-probs against float64 log_softmax, advantages against numpy."""
import math

import numpy as np
import pytest
import torch

import grpo


# ----------------------------------------------------------------------------------------------
# loss and gradient vs a direct scalar computation

def _direct_loss_and_grad(lp, lo, lr, adv, mask, eps_low, eps_high, beta):
    """Plain python floats, one token at a time: loss, d loss / d logp, #tokens with clip active."""
    B, R = len(lp), len(lp[0])
    n = sum(mask[b][t] for b in range(B) for t in range(R))
    total, grad, n_clip = 0.0, [[0.0] * R for _ in range(B)], 0
    for b in range(B):
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
            total += pg + beta * kl
            grad[b][t] = (dpg + beta * dkl) / n
    return total / n, grad, n_clip


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_and_grad_match_direct_formula(beta):
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

    loss, stats = grpo.grpo_loss(logp, logp_old, adv, mask, n_tokens=int(mask.sum()),
                                 eps_low=eps_low, eps_high=eps_high, beta=beta,
                                 logp_ref=logp_ref if beta > 0 else None)
    loss.backward()

    want, want_grad, n_clip = _direct_loss_and_grad(
        logp.detach().tolist(), logp_old.tolist(), logp_ref.tolist(), adv.tolist(),
        mask.tolist(), eps_low, eps_high, beta)
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


def test_loss_is_global_token_mean_across_ranks():
    """Two 'ranks' with different token counts, each scaling by world_size and dividing by the
    global count, averaged as FSDP does, give the single-process loss and gradient."""
    g = torch.Generator().manual_seed(1)
    B, R = 6, 9
    logp_old = -torch.rand(B, R, generator=g, dtype=torch.float64) * 2
    logp0 = logp_old + (torch.rand(B, R, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.arange(R)[None] < torch.tensor([9, 2, 4, 8, 1, 6])[:, None]
    n = int(mask.sum())

    full = logp0.clone().requires_grad_(True)
    loss_full, _ = grpo.grpo_loss(full, logp_old, adv, mask, n, beta=0.0)
    loss_full.backward()

    part = logp0.clone().requires_grad_(True)
    losses = []
    for rows in (slice(0, 2), slice(2, 6)):            # uneven split: 11 vs 19 tokens
        l, _ = grpo.grpo_loss(part[rows], logp_old[rows], adv[rows], mask[rows], n, world_size=2)
        losses.append(l)
    (sum(losses) / 2).backward()                        # FSDP: mean of the ranks' gradients
    assert (sum(losses) / 2).item() == pytest.approx(loss_full.item(), rel=1e-12)
    assert torch.allclose(part.grad, full.grad, rtol=1e-12, atol=1e-15)


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
