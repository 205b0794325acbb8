"""
Stage 2 of SRPO: reflection-aware GRPO (see ../shared/SRPO.md, "GRPO (stage 2)").

    for each step:
      1. rollout   each rank takes its share of P prompts and samples G responses per prompt
                   at temperature 1.0 (sampler.generate); logp_old comes from the sampler
      2. reward    reward.score_batch, SRPO reward (two-pass format + reflection effectiveness
                   + length) or the plain GRPO baseline (--reward grpo)
      3. advantage A_i = (r_i - mean(r)) / (std(r) + eps) within each group of G
      4. filter    groups whose mean final-answer accuracy is outside [0.1, 0.9] carry no signal
      5. update    mu epochs x n_minibatches optimizer steps of the clipped surrogate
                       ratio = exp(logp - logp_old)
                       pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
                       kl    = exp(logp_ref - logp) - (logp_ref - logp) - 1        (k3, beta > 0)
                       loss  = sum over response tokens of (pg + beta * kl) / (response tokens
                               of the GLOBAL mini-batch)
                   so one process and N processes holding the same global batch take the same step
                   (FSDP averages gradients over ranks, so each rank scales its sum by world_size).

Log-probabilities are computed on logits / temperature, in float32, chunked over time so a
152k vocabulary never needs a full float32 (B, T, V) copy.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------
# the math: log-probabilities, advantages, group filter, loss

def _chunk_logprobs(logits, targets, temperature):
    # logits (B, t, V) any dtype; targets (B, t) long -> logp (B, t) fp32, entropy (B, t) fp32
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1)                                   # (B, t)
    logp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse       # (B, t)
    with torch.no_grad():
        p = torch.softmax(x, dim=-1)
        entropy = lse - (p * x).sum(-1)                                # (B, t)
    return logp, entropy


def token_logprobs(logits, targets, temperature=1.0, chunk=256):
    """log softmax(logits / temperature) gathered at targets, plus the entropy (no grad).

    logits (B, T, V), targets (B, T) -> logp (B, T) float32, entropy (B, T) float32.
    Works chunk by chunk over T; with autograd on, each chunk is recomputed in backward
    (checkpoint), so at most (B, chunk, V) float32 values are alive at once.
    """
    assert logits.shape[:2] == targets.shape, f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}"
    logps, ents = [], []
    for s in range(0, logits.shape[1], chunk):
        lg, tg = logits[:, s:s + chunk], targets[:, s:s + chunk]
        if torch.is_grad_enabled() and lg.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, lg, tg, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(lg, tg, temperature)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps, 1), torch.cat(ents, 1)


def group_advantages(rewards, G, eps=1e-6):
    """rewards (P*G,) prompt-major -> advantages (P*G,): (r - group mean) / (group std + eps).

    std is the unbiased (Bessel) one, as torch.std and the verl / EasyR1 code behind the paper.
    """
    assert G >= 2, f"group advantages need G >= 2 samples per prompt, got G={G}"
    assert rewards.numel() % G == 0, f"{rewards.numel()} rewards is not a multiple of G={G}"
    r = rewards.float().view(-1, G)                                    # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def accuracy_band_keep(correct, G, low=0.1, high=0.9):
    """correct (P*G,) 0/1 -> keep (P*G,) bool: True for every row of a group whose mean
    accuracy lies in [low, high] (all-right and all-wrong groups carry no signal)."""
    acc = correct.float().view(-1, G).mean(1, keepdim=True)          # (P, 1)
    keep = (acc >= low - 1e-9) & (acc <= high + 1e-9)
    return keep.expand(-1, G).reshape(-1)


def grpo_loss(logp, logp_old, adv, mask, n_tokens, eps_low=0.2, eps_high=0.2, beta=0.0,
              logp_ref=None, world_size=1):
    """Clipped surrogate (+ beta * k3 KL to the reference), token-level mean over the global batch.

    logp, logp_old, logp_ref: (B, R) float32 log-probs of the response tokens
    adv: (B,) advantage per response;  mask: (B, R) bool, True on response tokens
    n_tokens: response tokens in the GLOBAL mini-batch (all ranks); the loss is this rank's sum
      divided by n_tokens, times world_size because FSDP averages gradients over ranks.
    Returns loss (scalar) and stats: sums over this rank's tokens (all-reduce, then divide by
      the token count): clipped, kl_ref, kl_old (k3 of the rollout policy vs the current one).
    """
    mask = mask.bool()
    m = mask.to(logp.dtype)
    # padded positions may hold anything (-inf, garbage): zero them before exp, never after
    d_old = torch.where(mask, logp - logp_old, torch.zeros_like(logp))   # (B, R)
    ratio = torch.exp(d_old)
    A = adv.to(logp.dtype).unsqueeze(1)                                          # (B, 1)
    pg1 = -ratio * A
    pg2 = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    pg = torch.maximum(pg1, pg2)                                          # -min(ratio*A, clip*A)
    per_tok = pg
    stats = {"clipped": ((pg2 > pg1) & mask).sum().detach()}
    if beta > 0:
        assert logp_ref is not None, "beta > 0 needs logp_ref (the frozen reference model)"
        d_ref = torch.where(mask, logp_ref - logp, torch.zeros_like(logp))
        kl = torch.exp(d_ref) - d_ref - 1.0
        per_tok = per_tok + beta * kl
        stats["kl_ref"] = (kl * m).sum().detach()
    with torch.no_grad():
        stats["kl_old"] = ((ratio - 1.0 - d_old) * m).sum()     # k3 of KL(old || new)
    loss = (per_tok * m).sum() / max(float(n_tokens), 1.0) * world_size
    return loss, stats
