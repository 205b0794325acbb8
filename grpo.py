"""
Stage 2 of SRPO: reflection-aware GRPO (METHOD.md, section 2).

    for each step:
      1. rollout   each rank takes its contiguous share of the step's P prompts and samples G
                   responses per prompt at temperature 1.0 (sampler.generate_texts); logp_old is
                   the sampler's log-softmax(logits / temperature) of the drawn tokens in fp32, the
                   training forward's recomputed log-probs otherwise (--logp_old auto)
      2. reward    reward.score_batch: the SRPO reward (two-pass prompt SYSTEM_PROMPT_REFLECT) or,
                   with --reward grpo, the plain GRPO baseline (single-pass SYSTEM_PROMPT_SINGLE)
      3. advantage A_i = (r_i - mean(r)) / (std(r) + eps) within each group of G
      4. filter    groups whose mean of (accuracy + effectiveness) is outside [acc_low, acc_high]
                   carry no signal and are dropped
      5. update    mu passes x n_minibatches AdamW steps (grad-norm clipped) of
                       ratio = exp(logp - logp_old)
                       pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
                       kl    = exp(logp_ref - logp) - (logp_ref - logp) - 1   (k3; only if beta > 0)
                       loss  = --loss_agg seq:   mean over responses of (mean over its tokens)  (Eq. 2)
                               --loss_agg token: sum over all tokens / tokens            (DAPO)
                   of pg + beta * kl, normalised by the GLOBAL mini-batch, so one process and N
                   processes holding the same global batch take the same step.
      6. every --eval_every steps: greedy evaluation on --test (eval.py's), logged as {"eval": true, "test_*"}

The file reads top to bottom: the knobs (GRPOConfig, every field a flag, its comment the --help),
the math, the rollout, the update, the step's log record, the training loop, and last the
command line and the start of a run (inputs checked, out/ opened, models built or resumed).
Log-probs are computed on logits / temperature, in float32, chunked over time so a 152k
vocabulary never needs a full float32 (B, T, V) copy. The vision tower is frozen by default.
Distributed: one process without torchrun; under torchrun FSDP2 (support/dist.py) over gloo
(CPU) or nccl (GPU). Every rank runs the same number of forwards (weight-0 padding forwards).
From support/: prompts, batching and the step's prompt order (data.py); all-reduce, a no-op in
one process (dist.py); AdamW groups, lr schedule and gradient clipping (training.py); the run
directory: log.jsonl, checkpoint/, the final HF model in --out (checkpoint.py).

    python grpo.py --model runs/demo/sft --train runs/demo/task/train.jsonl --out runs/demo/srpo
    python grpo.py --model runs/demo/base --reward grpo ... --out runs/demo/grpo   # plain GRPO
    torchrun --nproc_per_node=8 grpo.py ...                                        # 7B: docs/API.md
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

import eval as eval_lib
import model as model_lib
import reward
import sampler
from support import checkpoint
from support import cli
from support import data
from support import dist
from support import training
from support.config import load_function, parse_config


# ----------------------------------------------------------------------------------------------
# 0. the knobs: every field is a flag, its comment the --help

PROG = "grpo.py"


@dataclass
class GRPOConfig:
    # io (defaults: the files `python pipeline.py` makes in runs/demo)
    model: str = "runs/demo/sft"            # stage-1 (reflection SFT) checkpoint, HF format + tokenizer.json
    train: str = "runs/demo/task/train.jsonl"   # records with messages + answer (task.py / reflect_data.py)
    test: str = ""                          # records for the in-run evaluation (--eval_every); eval.py reads them
    out: str = "runs/demo/srpo"             # log.jsonl, checkpoint/ (resumed from), final HF model
    reward: str = "srpo"                    # srpo (two-pass prompt + SRPO reward) | grpo (baseline)
    reward_preset: str = "paper"            # paper (Eq. 4-8, METHOD.md) | code (the authors' released reward function)
    length_weight: float = -1.0             # weight of f_len (0 = the paper's "w/o f_len"); -1 = the preset's
    effectiveness: bool = True              # 0 = the paper's "w/o I_eff" (RewardConfig(effectiveness=False))
    # rollout
    prompts_per_step: int = 16              # P, global over all ranks
    group_size: int = 8                     # G responses per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_batch: int = 8                  # prompts per sampler call (per rank)
    # update
    loss_agg: str = "seq"                   # seq: the paper's Eq. 2 (per-response token mean, then mean) | token (DAPO)
    lr: float = 3e-5                        # tiny model (1e-4 erodes the scene list; docs/LOG.md); the paper's 7B uses 1e-6
    warmup_frac: float = 0.0                # linear lr warmup over this fraction of the steps (paper code: 0.03)
    min_lr_frac: float = 1.0                # then cosine from lr to lr x this at the end; 1 = constant (paper code: 0.1)
    weight_decay: float = 0.0               # AdamW, on weight matrices only (not norms, biases, embeddings)
    mu: int = 1                             # passes over each rollout batch
    n_minibatches: int = 2                  # optimizer steps per pass
    micro_batch: int = 16                   # rows per forward/backward (per rank), rounded down to whole groups (>= 1)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04                      # k3 KL to the frozen initial model; 0 = no reference kept (paper: 0)
    adv_eps: float = 1e-6
    filter_groups: bool = True              # drop groups with mean accuracy outside [acc_low, acc_high]
    dynamic_sampling: int = 0               # DAPO: up to this many more rollout rounds (fresh prompts) per step while
                                            # fewer than prompts_per_step groups passed the filter; 0 = off
    acc_low: float = 0.1
    acc_high: float = 0.9
    grad_clip: float = 1.0                  # max grad norm; 0 = off
    freeze_vision: bool = True
    grad_checkpoint: bool = False           # recompute each decoder layer in backward (large models)
    max_pixels: int = 0                     # images: 0 = --model's preprocessor_config.json (else 28*28*1280); > 0 overrides
    precision: str = "auto"                 # bf16: FSDP2 mixed precision (fp32 master weights, bf16 forwards, fp32
                                            # gradient reduction; dist.shard_model) | fp32 | auto: bf16 on GPU, fp32 on CPU
    logprob_chunk: int = 256                # time chunk of the float32 log-softmax
    logp_old: str = "auto"                  # sampler | recompute (training forward) | auto: recompute unless the
                                            # policy runs in float32 (CPU), where both agree to ~1e-6
    # run
    steps: int = 200
    save_every: int = 20
    eval_every: int = 0                     # greedy evaluation of --test every N steps and at the end (0 = off)
    eval_limit: int = 0                     # the first N records of --test (0 = all)
    eval_metric: list[str] = field(default_factory=list)   # MODULE:FUNCTION per-response metrics (eval.py --metric)
    report_every: int = 0                   # every N steps: out/rollouts/stepNNNNNN.html, a few groups' samples (0 = off)
    extra_metrics: str = ""                 # "module:function", fn(texts, records) -> {name: (sum, count)}, logged as
                                            # sum / count per step (same names every call), e.g. a task's perception metric
    seed: int = 0
    device: str = ""                        # "" = cuda if available else cpu (torchrun: cuda:LOCAL_RANK)
    threads: int = 0                        # CPU: torch threads per process (0 = torch's default)
    skip_bad_records: bool = False          # drop the --train / --test records that fail the check at start (counted
                                            # on stderr) instead of refusing the run with their file:line list


# ----------------------------------------------------------------------------------------------
# 1. the math: log-probabilities, advantages, group filter, loss

def _chunk_logprobs(logits, targets, temperature):
    # logits (B, t, V) any dtype; targets (B, t) long -> logp (B, t) fp32, entropy (B, t) fp32
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1)                                   # (B, t)
    logp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse       # (B, t)
    with torch.no_grad():
        entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1)         # (B, t)
    return logp, entropy


def token_logprobs(logits, targets, temperature=1.0, chunk=256):
    """log softmax(logits / temperature) at targets, plus the entropy (no grad).
    logits (B, T, V), targets (B, T) -> logp (B, T) float32, entropy (B, T) float32. Chunk by
    chunk over T, each chunk recomputed in backward: at most (B, chunk, V) fp32 values alive."""
    assert logits.shape[:2] == targets.shape, f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}"
    logps, ents = [], []
    for s in range(0, logits.shape[1], chunk):
        lg, tg = logits[:, s:s + chunk], targets[:, s:s + chunk]
        if torch.is_grad_enabled() and lg.requires_grad:
            lp, ent = recompute(_chunk_logprobs, lg, tg, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(lg, tg, temperature)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps, 1), torch.cat(ents, 1)


def group_advantages(rewards, G, eps=1e-6):
    """rewards (P*G,) prompt-major -> advantages (P*G,): (r - group mean) / (group std + eps).
    std is the unbiased (Bessel) one, as torch.std and the paper's training code."""
    assert G >= 2, f"group advantages need G >= 2 samples per prompt, got G={G}"
    assert rewards.numel() % G == 0, f"{rewards.numel()} rewards is not a multiple of G={G}"
    r = rewards.float().view(-1, G)                                    # (P, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def accuracy_band_keep(acc, G, low=0.1, high=0.9):
    """acc (P*G,) per-response accuracy term -> keep (P*G,) bool: True for every row of a group
    whose mean lies in [low, high] (all-right and all-wrong groups carry no signal)."""
    mean = acc.float().view(-1, G).mean(1, keepdim=True)              # (P, 1)
    keep = (mean >= low - 1e-9) & (mean <= high + 1e-9)
    return keep.expand(-1, G).reshape(-1)


def grpo_loss(logp, logp_old, adv, mask, n_global, agg="seq", eps_low=0.2, eps_high=0.2, beta=0.0,
              logp_ref=None, world_size=1):
    """Clipped surrogate (+ beta * k3 KL to the reference) of this rank's rows.

    logp, logp_old, logp_ref: (B, R) float32 log-probs of the response tokens
    adv: (B,) advantage per response;  mask: (B, R) bool, True on response tokens
    agg "seq":   sum_i (1/|o_i|) sum_t l_it / n_global, n_global = responses in the GLOBAL mini-batch
    agg "token": sum_it l_it / n_global,                n_global = response tokens in it
    times world_size, because FSDP averages the ranks' gradients.
    Returns loss and stats (sums over this rank's tokens): clipped, kl_ref, kl_old."""
    mask = mask.bool()
    m = mask.to(logp.dtype)                                            # (B, R)
    # padded positions may hold anything (-inf, garbage): zero them before exp, never after
    d_old = torch.where(mask, logp - logp_old, torch.zeros_like(logp))
    ratio = torch.exp(d_old)
    A = adv.to(logp.dtype).unsqueeze(1)                                # (B, 1)
    pg1, pg2 = -ratio * A, -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    per_tok = torch.maximum(pg1, pg2)                                  # -min(ratio*A, clip*A)
    stats = {"clipped": ((pg2 > pg1) & mask).sum().detach()}
    if beta > 0:
        assert logp_ref is not None, "beta > 0 needs logp_ref (the frozen reference model)"
        d_ref = torch.where(mask, logp_ref - logp, torch.zeros_like(logp))
        kl = torch.exp(d_ref) - d_ref - 1.0
        per_tok = per_tok + beta * kl
        stats["kl_ref"] = (kl * m).sum().detach()
    with torch.no_grad():
        stats["kl_old"] = ((ratio - 1.0 - d_old) * m).sum()          # k3 of KL(old || new)
    if agg == "seq":
        w = m / m.sum(1, keepdim=True).clamp(min=1.0)                  # (B, R): 1/|o_i| on its tokens
    elif agg == "token":
        w = m
    else:
        raise ValueError(f"grpo_loss: agg must be 'seq' or 'token', got {agg!r}")
    loss = (per_tok * w).sum() / max(float(n_global), 1.0) * world_size
    return loss, stats


# ----------------------------------------------------------------------------------------------
# 2. rollout: G responses per prompt, rewards, advantages, filter

@dataclass
class Rollout:
    """One rank's share of a step: P prompts x G responses, rows prompt-major (row i: prompt i // G)."""
    records: list              # P records
    prompts: list              # P encoded prompts (data.encode_prompt)
    tokens: torch.Tensor       # (P*G, R) long, pad_id after each row's length
    lengths: torch.Tensor      # (P*G,) long, response tokens incl. the final eos
    logp_old: torch.Tensor     # (P*G, R) float32, the sampler's log-probs of the drawn tokens
    texts: list                # P*G responses without their final eos
    finish_reasons: list       # P*G "stop" | "length"
    scores: list               # P*G reward.Score
    adv: torch.Tensor          # (P*G,) group-normalised advantages
    keep: torch.Tensor         # (P*G,) bool, whole groups: passed the accuracy filter
    group_size: int
    pad_id: int

    def rows(self, groups):
        """Prompt indices (g,) -> their response rows (g*G,), prompt-major."""
        G = self.group_size
        return (groups[:, None] * G + torch.arange(G)).reshape(-1)


@torch.no_grad()
def rollout(policy, tok, records, cfg, d, seed, rcfg, system_prompt) -> Rollout:
    """This rank's P records -> G sampled responses each, their rewards, advantages and filter."""
    G = cfg.group_size
    prompts = [data.encode_prompt(r, tok, system_prompt) for r in records]
    scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, n=G, seed=seed)
    gen = sampler.generate_texts(policy, tok, prompts, scfg, batch_size=cfg.rollout_batch)   # bf16 run: on bf16 gathered weights
    gts = [r["answer"] for r in records for _ in range(G)]
    options = [r.get("options") for r in records for _ in range(G)]
    scores = reward.score_batch(gen.texts, gts, mode=cfg.reward, count_tokens=tok.count_tokens, cfg=rcfg,
                                options=options)
    adv = group_advantages(torch.tensor([s.total for s in scores]), G, cfg.adv_eps)
    acc = torch.tensor([s.filter_accuracy for s in scores])     # accuracy + effectiveness (METHOD.md)
    keep = (accuracy_band_keep(acc, G, cfg.acc_low, cfg.acc_high) if cfg.filter_groups
            else torch.ones(len(scores), dtype=torch.bool))
    return Rollout(records=records, prompts=prompts, tokens=gen.tokens, lengths=gen.lengths,
                   logp_old=gen.logprobs.float(), texts=gen.texts, finish_reasons=gen.finish_reasons,
                   scores=scores, adv=adv, keep=keep, group_size=G, pad_id=tok.pad_id)


def cat_rollouts(rolls) -> Rollout:
    """Rollouts of one rank one after the other: lists joined, rows stacked prompt-major, tokens
    and logp_old right-padded to the longest response."""
    R = max(r.tokens.shape[1] for r in rolls)
    pad = {"tokens": rolls[0].pad_id, "logp_old": 0.0}
    def join(name, xs):
        if name in pad:
            xs = [torch.nn.functional.pad(x, (0, R - x.shape[1]), value=pad[name]) for x in xs]
        return [v for x in xs for v in x] if isinstance(xs[0], list) else torch.cat(xs) if torch.is_tensor(xs[0]) else xs[0]
    return Rollout(**{f.name: join(f.name, [getattr(r, f.name) for r in rolls]) for f in fields(Rollout)})


def sample_step(policy, tok, records, cfg, d, step, rcfg, system_prompt) -> tuple[Rollout, int]:
    """This rank's rollout of a step: its contiguous block of the step's prompts. With
    --dynamic_sampling K (DAPO's dynamic sampling), while fewer than prompts_per_step groups over
    all ranks passed the accuracy filter, up to K more rounds sample the next prompts of the
    stream (step s's rounds are stream slices s(K+1) .. s(K+1)+K, so resuming draws the same);
    the update trains on the kept groups of every round. Every rank runs the same rounds (the
    count is all-reduced). -> (the rollout, the number of rounds)"""
    K, P = cfg.dynamic_sampling, cfg.prompts_per_step
    P_local = P // d.world_size
    rolls, kept = [], 0
    for r in range(K + 1):
        s = step * (K + 1) + r
        idx = data.step_prompts(len(records), s, P, cfg.seed)[d.rank * P_local:(d.rank + 1) * P_local]
        rolls.append(rollout(policy, tok, [records[i] for i in idx], cfg, d, data.rollout_seed(cfg.seed, s, P, d.rank, d.world_size),
                             rcfg, system_prompt))
        kept += int(dist.all_reduce(torch.tensor([int(rolls[-1].keep.sum()) // cfg.group_size], device=d.device)).item())
        if kept >= P:
            break
    return cat_rollouts(rolls), len(rolls)


def recompute_logp_old(policy, roll: Rollout, cfg, d):
    """Under bf16 the sampler's and the training forward's log-probs differ, and the PPO ratio
    must start at exactly 1: replace roll.logp_old by the training forward's. Returns the mean
    |sampler - training| over all ranks' response tokens (logged as logp_old_mismatch)."""
    sampled, roll.logp_old = roll.logp_old, rows_logprobs(policy, roll, cfg, d)
    m = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]          # (P*G, R)
    t = torch.tensor([float(((sampled - roll.logp_old).abs() * m).sum()), float(m.sum())], dtype=torch.float64)
    t = dist.all_reduce(t.to(d.device))
    return float(t[0] / t[1].clamp(min=1))


def group_logprobs(net, roll: Rollout, groups, cfg, device):
    """Log-probs under `net` of the responses of whole groups: groups (g,) prompt indices ->
    logp (g*G, R) float32, entropy (g*G, R), mask (g*G, R) bool (True on response tokens).
    The one place the training (and reference) forward runs. Each prompt is encoded ONCE for its
    G responses (model.forward_shared_prefix): on the built-in task the prompt is ~200 of ~270
    tokens, and sharing it made the training forward+backward 2.7x faster (bench/grpo_step.py)."""
    rows = roll.rows(groups)
    L = roll.lengths[rows]                                             # (g*G,)
    R = max(int(L.max()), 1)
    mask = torch.arange(R)[None] < L[:, None]                          # (g*G, R)
    resp = roll.tokens[rows, :R].masked_fill(~mask, roll.pad_id)       # (g*G, R)
    p = data.collate([roll.prompts[int(j)] for j in groups], roll.pad_id, left_pad=True)   # (g, Tp), left-padded
    pv, grid = p["pixel_values"], p["image_grid_thw"]
    logits = net.forward_shared_prefix(
        p["input_ids"].to(device), p["attention_mask"].to(device), None if pv is None else pv.to(device),
        None if grid is None else grid.to(device), resp.to(device), mask.long().to(device))   # (g*G, R, V)
    logp, ent = token_logprobs(logits, resp.to(device), cfg.temperature, cfg.logprob_chunk)
    return logp, ent, mask.to(device)


def n_micro_batches(n, size, device):
    """Micro-batches per rank, the same on every rank (FSDP: every rank runs the same forwards)."""
    return int(dist.all_reduce(torch.tensor([math.ceil(n / size)], device=device), "max").item())


@torch.no_grad()
def rows_logprobs(net, roll: Rollout, cfg, d):
    """(P*G, R) log-probs of every rollout row under `net`, no grad: the frozen reference's
    logp_ref, or logp_old recomputed with the training forward."""
    out = torch.zeros(roll.tokens.shape)
    groups, per = torch.arange(len(roll.prompts)), max(1, cfg.micro_batch // roll.group_size)
    for k in range(n_micro_batches(len(groups), per, d.device)):
        mb = groups[k * per:(k + 1) * per]
        lp, _, _ = group_logprobs(net, roll, mb if len(mb) else groups[:1], cfg, d.device)  # padding forward
        if len(mb):
            out[roll.rows(mb), :lp.shape[1]] = lp.cpu()
    return out


# ----------------------------------------------------------------------------------------------
# 3. the update

@dataclass
class UpdateStats:
    """What one update did. loss and grad_norm are global (the same on every rank); the rest are
    sums over this rank's response tokens."""
    loss: float = 0.0            # sum over optimizer steps
    grad_norm: float = 0.0       # sum over optimizer steps (before clipping)
    opt_steps: int = 0
    tokens: float = 0.0          # response tokens trained on
    clipped: float = 0.0
    kl_old: float = 0.0
    kl_ref: float = 0.0
    entropy: float = 0.0
    forward_tokens: float = 0.0  # prompt + response tokens through the training forward


def update(policy, optimizer, roll: Rollout, cfg, d, logp_ref=None) -> UpdateStats:
    """mu passes x n_minibatches optimizer steps on this rank's share of the rollout. Mini-batch k
    holds the kept groups of the local prompts j with j % n_minibatches == k; each rank owns a
    contiguous block of P / world_size prompts (a multiple of n_minibatches), so mini-batch k is
    the same set of global prompts for any number of ranks."""
    st = UpdateStats()
    kept = roll.keep.view(-1, roll.group_size)[:, 0].nonzero()[:, 0]  # (kept groups,)
    for _ in range(cfg.mu):
        for k in range(cfg.n_minibatches):
            minibatch_step(policy, optimizer, roll, kept[kept % cfg.n_minibatches == k], cfg, d, logp_ref, st)
    return st


def minibatch_step(policy, optimizer, roll, groups, cfg, d, logp_ref, st: UpdateStats):
    """One optimizer step on the groups (g,) of this rank's part of a global mini-batch."""
    rows = roll.rows(groups)
    n_local = roll.lengths[rows].sum() if cfg.loss_agg == "token" else len(rows)
    n_global = float(dist.all_reduce(torch.tensor([float(n_local)], device=d.device)).item())
    if n_global == 0:
        return                                                         # every group filtered out
    # the optimizer's (sharded) parameters: an FSDP2 module that is unsharded at the moment
    # (e.g. the root after a no-grad forward) lists its gathered copies in .parameters()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    per, loss_sum = max(1, cfg.micro_batch // roll.group_size), 0.0
    n_micro = n_micro_batches(len(groups), per, d.device)
    for m in range(n_micro):
        dist.set_grad_sync(policy, m == n_micro - 1)                   # reduce-scatter once, after the last
        mb = groups[m * per:(m + 1) * per]
        dummy = len(mb) == 0
        mb = torch.arange(1) if dummy else mb                          # same forwards on every rank, weight 0
        logp, ent, mask = group_logprobs(policy, roll, mb, cfg, d.device)
        r, R = roll.rows(mb), mask.shape[1]
        loss, s = grpo_loss(logp, roll.logp_old[r, :R].to(d.device), roll.adv[r].to(d.device), mask, n_global,
                            cfg.loss_agg, cfg.eps_low, cfg.eps_high, cfg.beta,
                            None if logp_ref is None else logp_ref[r, :R].to(d.device), d.world_size)
        (loss * 0.0 if dummy else loss).backward()
        if not dummy:
            loss_sum += loss.item()
            st.tokens += float(mask.sum())
            st.clipped += float(s["clipped"])
            st.kl_old += float(s["kl_old"])
            st.kl_ref += float(s.get("kl_ref", 0.0))
            st.entropy += float((ent * mask).sum())
            st.forward_tokens += float(mask.sum()) + sum(len(roll.prompts[int(j)]["input_ids"]) for j in r // roll.group_size)
    loss_global = float(dist.all_reduce(torch.tensor([loss_sum / d.world_size], device=d.device)).item())
    grad_norm = training.clip_grad_norm(params, cfg.grad_clip, loss_global)   # raises NonFiniteLoss
    optimizer.step()
    st.loss += loss_global
    st.grad_norm += grad_norm
    st.opt_steps += 1


# ----------------------------------------------------------------------------------------------
# 4. metrics: the one place that builds a step's log record

CASES = ("w2r", "r2r", "r2w", "w2w", "single", "none")


def log_record(step, roll: Rollout, us: UpdateStats, t_roll, t_train, cfg, d, metric_fn=None) -> dict:
    sc, G = roll.scores, roll.group_size
    extra = metric_fn(roll.texts, [r for r in roll.records for _ in range(G)]) if metric_fn else {}
    sums = dict(n=len(sc), groups=len(roll.prompts), groups_kept=int(roll.keep.sum()) // G,
                reward=sum(s.total for s in sc), r_format=sum(s.format for s in sc),
                r_accuracy=sum(s.accuracy for s in sc), r_length=sum(s.length for s in sc),
                r_effectiveness=sum(s.effectiveness for s in sc), r_reflection=sum(s.reflection for s in sc),
                acc_first=sum(float(s.first_correct) for s in sc), acc_final=sum(float(s.final_correct) for s in sc),
                resp_len=float(roll.lengths.sum()), truncated=sum(f == "length" for f in roll.finish_reasons),
                tokens=us.tokens, clipped=us.clipped, kl_old=us.kl_old, kl_ref=us.kl_ref, entropy=us.entropy,
                forward_tokens=us.forward_tokens, **{f"case_{c}": sum(s.case == c for s in sc) for c in CASES},
                **{f"{k}/sum": v[0] for k, v in extra.items()}, **{f"{k}/n": v[1] for k, v in extra.items()})
    keys = sorted(sums)
    t = dist.all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=d.device))
    s = dict(zip(keys, t.tolist()))
    n, tokens, opt = s["n"], max(s["tokens"], 1.0), max(us.opt_steps, 1)
    rec = {"step": step, **{k: s[k] / n for k in ("reward", "r_format", "r_accuracy", "r_length", "r_effectiveness",
                                                  "r_reflection", "acc_first", "acc_final", "resp_len", "truncated")}}
    rec.update({f"case_{c}": int(s[f"case_{c}"]) for c in CASES})
    rec.update(groups_kept=s["groups_kept"] / s["groups"], loss=us.loss / opt, grad_norm=us.grad_norm / opt,
               opt_steps=us.opt_steps, kl_old=s["kl_old"] / tokens, clip_frac=s["clipped"] / tokens,
               entropy=s["entropy"] / tokens)
    if cfg.beta > 0:
        rec["kl_ref"] = s["kl_ref"] / tokens
    rec.update({k: s[f"{k}/sum"] / s[f"{k}/n"] for k in extra if s[f"{k}/n"] > 0})
    rec.update(rollout_tok_s=s["resp_len"] / max(t_roll, 1e-9), train_tok_s=s["forward_tokens"] / max(t_train, 1e-9),
               rollout_s=t_roll, train_s=t_train, sample=roll.texts[0])
    return rec


def evaluate(policy, tok, test: eval_lib.Dataset, cfg, d, rcfg, metrics) -> dict:
    """Greedy evaluation of the policy on --test with eval.py's code, on every rank (each generates
    for its block of records): the log record {"step", "eval": true, "test_<eval.py metric>": ...}."""
    ecfg = eval_lib.EvalConfig(prompt="reflect" if cfg.reward == "srpo" else "single",
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rollout_batch, seed=cfg.seed)
    preds = eval_lib.evaluate_model(policy, tok, test, ecfg, rcfg, metrics, d.rank, d.world_size)   # bf16 run: bf16 weights
    return {"eval": True, **{f"test_{k}": v for k, v in eval_lib.aggregate(preds, ecfg.n).items()}}


# ----------------------------------------------------------------------------------------------
# 5. the training loop

def train(cfg: GRPOConfig, d):
    if cfg.device and d.world_size == 1:
        d.device = torch.device(cfg.device)
    if d.device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    metric_fn = load_function(cfg.extra_metrics, "--extra_metrics") if cfg.extra_metrics else None
    eval_metrics = [eval_lib.Metric(s.partition(":")[2], load_function(s, "--eval_metric")) for s in cfg.eval_metric]
    tok, rcfg, records, test, policy, ref, optimizer, start, fingerprint = setup(cfg, d)
    system_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.reward == "srpo" else data.SYSTEM_PROMPT_SINGLE
    ckpt, log_path, saved = os.path.join(cfg.out, "checkpoint"), os.path.join(cfg.out, "log.jsonl"), start
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not d.is_main, desc="grpo")
    for step in pbar:
        # 1-4. rollout, rewards, advantages, filter (this rank's contiguous block of the step's prompts)
        t0 = time.time()
        training.follow_thread_budget(d.device)                         # pipeline.py: this stage's share of the cores
        optimizer.zero_grad(set_to_none=True)                          # no gradients held through the rollout
        roll, rounds = sample_step(policy, tok, records, cfg, d, step, rcfg, system_prompt)
        logp_ref = rows_logprobs(ref, roll, cfg, d) if ref is not None else None
        recompute = cfg.logp_old == "recompute" or (cfg.logp_old == "auto" and dist.precision_dtype(cfg.precision, d.device) != torch.float32)
        mismatch = recompute_logp_old(policy, roll, cfg, d) if recompute else None
        t_roll, t0 = time.time() - t0, time.time()
        lr = lr_at(step, cfg)
        training.set_lr(optimizer, lr)
        # 5. update
        try:
            us = update(policy, optimizer, roll, cfg, d, logp_ref)
        except checkpoint.NonFiniteLoss as e:
            checkpoint.stop_non_finite(PROG, step + 1, str(e), ckpt, saved, d.is_main)
        # log, evaluate (before the save: a run killed in between redoes the step and its evaluation), save
        rec = log_record(step + 1, roll, us, t_roll, time.time() - t0, cfg, d, metric_fn)
        rec.update(lr=lr, **({} if mismatch is None else {"logp_old_mismatch": mismatch}),
                   **({"rollout_rounds": rounds} if cfg.dynamic_sampling else {}))
        if d.is_main:
            checkpoint.append_log(log_path, rec)
        pbar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['acc_final']:.2f}", len=f"{rec['resp_len']:.0f}",
                         kept=f"{rec['groups_kept']:.2f}", clip=f"{rec['clip_frac']:.3f}")
        done = step + 1
        if cfg.report_every and done % cfg.report_every == 0 and d.is_main:   # what the group advantage compares
            from support import report
            report.write_rollout_report(os.path.join(cfg.out, "rollouts", f"step{done:06d}.html"), roll, done,
                                        os.path.dirname(os.path.abspath(cfg.train)), cfg)
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            ev = evaluate(policy, tok, test, cfg, d, rcfg, eval_metrics)
            if d.is_main:
                checkpoint.append_log(log_path, {"step": done, **ev})
        save = lambda: checkpoint.save(ckpt, policy, optimizer, done, extra={"config": asdict(cfg), "data": fingerprint},
                                       tokenizer_dir=os.path.join(cfg.out, "tokenizer"))
        if done % cfg.save_every == 0 or done == cfg.steps:
            save()
            saved = done
        stop = training.stop_requested(d)                              # SIGTERM / SIGINT on any rank: stop here
        if stop and done < cfg.steps:
            if saved != done:
                save()
            raise training.preempted(PROG, stop, done, ckpt)
    if d.is_main:
        checkpoint.export_final(ckpt, cfg.out)
        print(f"{PROG}: done, {cfg.steps} steps; final model in {cfg.out} (training state in {ckpt})", flush=True)
    return ckpt


# ----------------------------------------------------------------------------------------------
# 6. the command line and the start of a run

def parse_args(argv=None) -> GRPOConfig:
    cfg = parse_config(GRPOConfig, argv, description="SRPO stage 2: reflection-aware GRPO (see grpo.py docstring)",
                       choices={"reward": ["srpo", "grpo"], "loss_agg": ["seq", "token"], "precision": ["auto", "fp32", "bf16"],
                                "logp_old": ["auto", "sampler", "recompute"], "reward_preset": ["paper", "code"]})
    check_config(cfg)
    return cfg


def check_config(cfg: GRPOConfig, world_size=1):
    """Every bad value is refused before anything runs, naming its flag."""
    W, nm, c = world_size, max(cfg.n_minibatches, 1), cfg
    rules = [(n, getattr(c, n) >= 1, "must be >= 1") for n in ("prompts_per_step", "mu", "n_minibatches", "micro_batch",
                                                               "rollout_batch", "max_new_tokens", "steps", "save_every",
                                                               "logprob_chunk")] + [
        ("group_size", c.group_size >= 2, "GRPO needs at least 2 responses per prompt"),
        ("prompts_per_step", c.prompts_per_step % (W * nm) == 0, f"must be a multiple of world_size x n_minibatches = {W} x {nm}"),
        ("eps_low", 0 <= c.eps_low < 1, "need 0 <= eps_low < 1"), ("eps_high", c.eps_high >= 0, "must be >= 0"),
        ("beta", c.beta >= 0, "must be >= 0"), ("temperature", c.temperature > 0, "must be > 0"),
        ("dynamic_sampling", c.dynamic_sampling >= 0, "must be >= 0 (0 = off)"),
        ("top_p", 0 < c.top_p <= 1, "must be in (0, 1]"), ("weight_decay", c.weight_decay >= 0, "must be >= 0"),
        ("adv_eps", c.adv_eps > 0, "must be > 0 (a group of equal rewards would give 0 / 0 = NaN)"),
        ("lr", math.isfinite(c.lr) and c.lr > 0, "must be a finite number > 0"),
        ("warmup_frac", 0 <= c.warmup_frac < 1, "must be in [0, 1)"), ("min_lr_frac", 0 <= c.min_lr_frac <= 1, "must be in [0, 1]"),
        ("grad_clip", c.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("acc_low", 0 <= c.acc_low <= c.acc_high, f"need 0 <= acc_low <= acc_high ({c.acc_high})"),
        ("eval_every", c.eval_every >= 0, "must be >= 0 (0 = off)"), ("eval_limit", c.eval_limit >= 0, "must be >= 0"),
        ("report_every", c.report_every >= 0, "must be >= 0 (0 = off)"),
        ("eval_every", c.eval_every == 0 or bool(c.test), "needs --test FILE (the records to evaluate on)"),
        ("length_weight", c.length_weight >= 0 or c.length_weight == -1, "must be >= 0, or -1 (the preset's)")]
    for name, ok, why in rules:
        if not ok:
            raise checkpoint.RunError(f"{PROG}: --{name} {getattr(c, name)!r}: {why}")


def reward_config(cfg: GRPOConfig) -> reward.RewardConfig:
    """--reward_preset / --length_weight / --effectiveness -> reward.RewardConfig."""
    try:
        rcfg = reward.RewardConfig(preset=cfg.reward_preset, effectiveness=cfg.effectiveness)
    except ValueError as e:   # e.g. --reward_preset code --effectiveness 0: the code's table has no I_eff
        raise checkpoint.RunError(f"{PROG}: --reward_preset {cfg.reward_preset} --effectiveness "
                                  f"{int(cfg.effectiveness)}: {e}") from None
    if cfg.length_weight != -1:
        rcfg.length_weight = cfg.length_weight
    return rcfg


def lr_at(step, cfg: GRPOConfig):
    """lr of GRPO step `step` (0-based): linear warmup over warmup_frac of the steps, then cosine
    from lr down to min_lr_frac x lr at the last step. Defaults: constant lr."""
    return training.lr_at(step, cfg.lr, cfg.lr * cfg.min_lr_frac, round(cfg.warmup_frac * cfg.steps), cfg.steps - 1)


RESUME_FREE = ("steps", "save_every", "eval_every", "report_every", "eval_limit", "eval_metric", "threads", "device",
               "test", "micro_batch", "rollout_batch", "grad_checkpoint", "logprob_chunk",
               "out")   # may change on resume (out: a run directory moved or copied elsewhere resumes)


def build_models(cfg: GRPOConfig, d, path):
    """The policy from `path` (fp32 master weights; --precision bf16: bf16 forwards through FSDP2
    mixed precision), its AdamW, and the frozen reference (the initial --model, fp32, sharded with
    the policy's precision: KL starts at 0) when beta > 0."""
    policy = model_lib.from_pretrained(path, device=d.device, dtype=torch.float32)
    policy.visual.requires_grad_(not cfg.freeze_vision)
    if cfg.grad_checkpoint:
        from torch.distributed._composable import checkpoint as recompute_in_backward
        for layer in policy.layers:                                    # state-dict keys unchanged
            recompute_in_backward(layer)
    dt = dist.precision_dtype(cfg.precision, d.device)
    dist.shard_model(policy, dt)
    ref = None
    if cfg.beta > 0:   # the same precision path as the policy (fp32 weights, the same mixed precision): KL starts at 0
        ref = dist.shard_model(model_lib.from_pretrained(cfg.model, device=d.device, dtype=torch.float32).requires_grad_(False), dt)
    return policy, ref, training.make_optimizer(policy, cfg.lr, cfg.weight_decay)


def setup(cfg: GRPOConfig, d):
    """Inputs checked (before anything is written), out/ opened, the policy, its AdamW and the frozen
    reference (the initial --model, fp32, sharded like the policy: KL starts at 0) built or resumed.
    Every --train / --test record is checked first (data.validate_records): a bad one stops the run
    here or is dropped with --skip_bad_records, never met mid-run. Also returns the fingerprint of
    --train (checkpoint.data_fingerprint) that every save stores and a resume compares."""
    how = "run `python pipeline.py --only task base reflect sft` first, or pass --model / --train"
    checkpoint.require(PROG, os.path.join(cfg.model, "tokenizer.json"), "the model to train", how)
    checkpoint.require(PROG, cfg.train, "training prompts", how)
    if cfg.eval_every:
        checkpoint.require(PROG, cfg.test, "--test records for the in-run evaluation", "pass --test FILE")
    with cli.reading(PROG, "--model", cfg.model):
        tok = data.Tokenizer.from_dir(cfg.model)
        tok.image_cfg = checkpoint.image_config(PROG, cfg.model, cfg.max_pixels)   # written on save (install_tokenizer)
        checkpoint.check_special_tokens(PROG, cfg.model, tok, model_lib.read_config(cfg.model))
    system_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.reward == "srpo" else data.SYSTEM_PROMPT_SINGLE
    try:
        skipped = []   # --skip_bad_records: [(where, reason)], listed in run_config.json
        records = data.load_records(cfg.train, tok, system_prompt, cfg.skip_bad_records, PROG, not d.is_main, skipped)
        test = eval_lib.load_datasets([cfg.test], [], "", cfg.eval_limit)[0] if cfg.eval_every else None
        if test is not None:
            eval_lib.drop_bad_records([test], [tok], system_prompt, PROG, skip=cfg.skip_bad_records, quiet=not d.is_main)
    except ValueError as e:
        raise checkpoint.RunError(f"{PROG}: {e}") from None
    if test is not None:   # as eval.py: records with an unreadable ground truth are skipped, and counted
        test.records, bad = eval_lib.check_answers(test.name, test.records)
        test.skipped = len(bad)
        if not test.records:
            raise checkpoint.RunError(f"{PROG}: --test {cfg.test}: no record with a readable answer")
    rcfg = reward_config(cfg)
    fingerprint = checkpoint.data_fingerprint({"--train": cfg.train}, {"--train": len(records)})
    ckpt, resume = checkpoint.open_run(PROG, cfg.out, {"--model": cfg.model}, d.is_main)
    with cli.reading(PROG, "checkpoint" if resume else "--model", ckpt if resume else cfg.model):
        policy, ref, optimizer = build_models(cfg, d, ckpt if resume else cfg.model)
    start = training.resume(PROG, ckpt, policy, optimizer, asdict(cfg), RESUME_FREE, fingerprint) if resume else 0
    if d.is_main:
        checkpoint.install_tokenizer(PROG, cfg.model, cfg.out, cfg.max_pixels)
        checkpoint.start_log(cfg.out, resume, start, {**asdict(cfg), "reward_config": asdict(rcfg),
                                                      "skipped_bad_records": [f"{w}: {r}" for w, r in skipped]})
        print(f"{PROG}: {'resuming at step ' + str(start) if resume else 'starting'}: {len(records)} train "
              f"prompts, world size {d.world_size}, {model_lib.count_params(policy, trainable_only=True):,} "
              f"trainable parameters, device {d.device}", flush=True)
    dist.barrier()
    return tok, rcfg, records, test, policy, ref, optimizer, start, fingerprint


def main(cfg: GRPOConfig):
    return training.run(cfg, check_config, train)


if __name__ == "__main__":
    cli.main(PROG, lambda: main(parse_args()))
    dist.exit_worker()
