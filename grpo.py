"""
Stage 2 of SRPO: reflection-aware GRPO (see ../shared/SRPO.md, "GRPO (stage 2)").

    for each step:
      1. rollout   each rank takes its contiguous share of the step's P prompts and samples G
                   responses per prompt at temperature 1.0 (sampler.generate); logp_old comes
                   from the sampler (log-softmax of logits / temperature, as recomputed below)
      2. reward    reward.score_batch: the SRPO reward (two-pass prompt SYSTEM_PROMPT_REFLECT:
                   format + reflection effectiveness + length) or, with --reward grpo, the plain
                   GRPO baseline (single-pass prompt SYSTEM_PROMPT_SINGLE: format + accuracy)
      3. advantage A_i = (r_i - mean(r)) / (std(r) + eps) within each group of G
      4. filter    groups whose mean final-answer accuracy is outside [0.1, 0.9] carry no signal
      5. update    mu passes x n_minibatches AdamW steps (grad-norm clipped) of
                       ratio = exp(logp - logp_old)
                       pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
                       kl    = exp(logp_ref - logp) - (logp_ref - logp) - 1    (k3; beta > 0 only,
                                                       no reference model is kept when beta = 0)
                       loss  = sum over response tokens of (pg + beta * kl) / (response tokens
                               of the GLOBAL mini-batch)
                   so one process and N processes holding the same global batch take the same step
                   (FSDP averages gradients over ranks, so each rank scales its sum by world_size).

Log-probabilities are computed on logits / temperature, in float32, chunked over time so a 152k
vocabulary never needs a full float32 (B, T, V) copy. The vision tower is frozen by default.

Distributed: one process without torchrun; under torchrun, FSDP2 (dist.shard_model: one unit per
decoder layer / vision block) over gloo (CPU) or nccl (GPU), multi-node by torchrun's own flags.
Every rank runs the same number of forwards (padding with weight-0 micro-batches), rewards and
metrics are all-reduced.

Outputs in --out: log.jsonl (one line per step: reward and its components, first / final answer
accuracy, reflection cases w2r r2r r2w w2w single none, response length, KL, clip fraction,
entropy, grad norm, rollout and training tokens/s, a sample response; plus greedy test evals),
checkpoint/ (HF weights + optimizer + RNG, written atomically every save_every steps; a rerun of
the same command resumes from it exactly, also after kill -9) and, at the end, the final HF model
in --out itself. A non-finite loss or gradient stops the run before the optimizer step, naming
the last good checkpoint, which is left untouched.

    python grpo.py --model runs/sft --train runs/task/train.jsonl --test runs/task/test.jsonl --out runs/srpo
    python grpo.py --model runs/base --reward grpo ... --out runs/grpo          # plain GRPO baseline
    torchrun --nproc_per_node=8 grpo.py ...                                     # see the 7B config below
"""
import json
import math
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import dist
from config import parse_config
import model as model_lib
import reward
import sampler
import task


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


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class GRPOConfig:
    # io
    model: str = "runs/sft"                 # stage-1 (reflection SFT) checkpoint, HF format + tokenizer.json
    train: str = "runs/task/train.jsonl"    # records with messages + answer (task.py / reflect_data.py)
    test: str = "runs/task/test.jsonl"      # greedy eval every eval_every steps ("" = none)
    out: str = "runs/grpo"                  # log.jsonl, checkpoint/ (latest, resumed from), final HF model
    reward: str = "srpo"                    # srpo (two-pass prompt + SRPO reward) | grpo (baseline)
    # rollout
    prompts_per_step: int = 16              # P, global over all ranks
    group_size: int = 8                     # G responses per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_batch: int = 8                  # prompts per sampler call (per rank)
    # update
    lr: float = 3e-5                        # tiny model (1e-4 erodes the scene list; README); the paper's 7B uses 1e-6
    weight_decay: float = 0.0
    mu: int = 1                             # passes over each rollout batch
    n_minibatches: int = 2                  # optimizer steps per pass
    micro_batch: int = 16                   # rows per forward/backward (per rank)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04                      # k3 KL to the frozen initial model; 0 = no reference kept (paper: 0)
    adv_eps: float = 1e-6
    filter_groups: bool = True              # drop groups with mean accuracy outside [acc_low, acc_high]
    acc_low: float = 0.1
    acc_high: float = 0.9
    grad_clip: float = 1.0
    freeze_vision: bool = True
    grad_checkpoint: bool = False           # recompute each decoder layer in backward (large models)
    logprob_chunk: int = 256                # time chunk of the float32 log-softmax
    # run
    steps: int = 200
    save_every: int = 20
    eval_every: int = 20                    # greedy eval on the first n_eval test records (0 = none)
    n_eval: int = 100
    seed: int = 0
    device: str = ""                        # "" = cuda if available else cpu (torchrun: cuda:LOCAL_RANK)
    threads: int = 0                        # CPU: torch threads per process (0 = torch's default)


# Qwen2.5-VL-7B on 8 GPUs (one node; multi-node: torchrun --nnodes/--node_rank/--master_addr):
#
#   torchrun --nproc_per_node=8 grpo.py \
#       --model ckpt/qwen2.5-vl-7b-reflection-sft --train data/srpo_rl.jsonl --test data/val.jsonl \
#       --out runs/grpo-7b --prompts_per_step 128 --group_size 8 --max_new_tokens 2048 \
#       --rollout_batch 4 --lr 1e-6 --weight_decay 1e-2 --mu 1 --n_minibatches 4 --micro_batch 4 \
#       --grad_checkpoint 1 --eps_low 0.2 --eps_high 0.2 --beta 0.0 --grad_clip 1.0 --steps 300 \
#       --save_every 20 --eval_every 20 --n_eval 512
#
# i.e. the paper-code defaults (lr 1e-6, eps 0.2, G 8, beta 0 -- 0.01 for the verl variant,
# frozen vision tower, accuracy band [0.1, 0.9]) with 128 prompts x 8 = 1024 rollouts per step,
# 4 optimizer steps of 256 rollouts each. Memory per H100-80GB: fp32 master weights + AdamW state
# sharded 8 ways (~14 GB), bf16 autocast compute, each decoder layer recomputed in backward; the
# rollout all-gathers the full model (sampler.unsharded, ~30 GB fp32) and keeps an fp32 KV cache of
# rollout_batch x G rows (~0.11 MB per token: 4 x 8 rows x 3k tokens ~ 11 GB). beta > 0 adds a
# sharded bf16 reference copy. Checkpoints are HF format (loadable by transformers).


def parse_args(argv=None) -> GRPOConfig:
    cfg = parse_config(GRPOConfig, argv, description="SRPO stage 2: reflection-aware GRPO (see grpo.py docstring)")
    check_config(cfg)
    return cfg


def check_config(cfg: GRPOConfig, world_size=1):
    def bad(field, why):
        raise ValueError(f"grpo.py: --{field}={getattr(cfg, field)!r}: {why}")
    if cfg.reward not in ("srpo", "grpo"):
        bad("reward", "must be srpo or grpo")
    if cfg.group_size < 2:
        bad("group_size", "GRPO needs at least 2 responses per prompt")
    if cfg.prompts_per_step % (world_size * cfg.n_minibatches):
        bad("prompts_per_step", f"must be a multiple of world_size x n_minibatches = {world_size} x {cfg.n_minibatches}")
    for name in ("mu", "n_minibatches", "micro_batch", "rollout_batch", "max_new_tokens", "steps", "save_every"):
        if getattr(cfg, name) < 1:
            bad(name, "must be >= 1")
    if not 0 <= cfg.eps_low < 1 or cfg.eps_high < 0:
        bad("eps_low", "need 0 <= eps_low < 1 and eps_high >= 0")
    if cfg.beta < 0:
        bad("beta", "must be >= 0")
    if not cfg.temperature > 0:
        bad("temperature", "must be > 0")


# ----------------------------------------------------------------------------------------------
# small helpers

def reduce_sums(d: dict, device) -> dict:
    """All-reduce (sum) a dict of numbers over ranks, in one call."""
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, "sum")
    return dict(zip(keys, t.tolist()))


def n_micro_batches(n_rows, size, device):
    """Micro-batches per rank, the same on every rank (FSDP: every rank runs the same forwards)."""
    t = torch.tensor([math.ceil(n_rows / size)], device=device)
    return int(dist.all_reduce(t, "max").item())


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def load_records(path):
    """Records of a JSONL file, each with 'messages' and 'answer'; errors name file:line."""
    records = data.read_jsonl(path)
    for i, r in enumerate(records):
        for key in ("messages", "answer"):
            if key not in r:
                raise ValueError(f"{path}:{i + 1}: record {r.get('id', '?')} has no field '{key}'")
        r["_where"] = f"{path}:{i + 1}"
    return records


def encode_prompt(record, tok, image_root, system_prompt):
    msgs = data.prompt_messages(record, system_prompt)
    return data.encode_messages(msgs, tok, image_root, add_generation_prompt=True, where=record["_where"])


def step_prompts(n_records, step, P, seed):
    """Global record indices of a step: consecutive slices of per-epoch permutations."""
    out, i = [], step * P
    while len(out) < P:
        epoch, j = divmod(i, n_records)
        perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[j]))
        i += 1
    return out


def decode_response(tok, tokens, length):
    """Response text without its final eos token."""
    ids = tokens[:length].tolist()
    if ids and ids[-1] in tok.eos_ids:
        ids = ids[:-1]
    return tok.decode(ids)


# ----------------------------------------------------------------------------------------------
# rollout and rewards

@torch.no_grad()
def rollout(policy, tok, records, image_root, cfg, d, step, system_prompt):
    """This rank's prompts -> G responses each, their rewards and advantages.

    Returns roll: prompts (list of encoded prompts), prompt_of (N,) long, tokens (N, R) long,
    lengths (N,), logp_old (N, R) float32, rewards (list of reward dicts), adv (N,), keep (N,) bool
    with N = local prompts x G, rows prompt-major; and stats (sums over this rank)."""
    G = cfg.group_size
    prompts = [encode_prompt(r, tok, image_root, system_prompt) for r in records]
    scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, n=G)
    tokens, logps, lengths, reasons = [], [], [], []
    for c in range(0, len(prompts), cfg.rollout_batch):
        batch = data.collate(prompts[c:c + cfg.rollout_batch], tok.pad_id, left_pad=True)
        scfg.seed = cfg.seed * 1_000_003 + step * 10_007 + d.rank * 101 + c
        with autocast(d.device):
            out = sampler.generate(policy, batch, tok.eos_ids, scfg, pad_id=tok.pad_id)
        tokens.append(out["tokens"].cpu())
        logps.append(out["logprobs"].float().cpu())
        lengths.append(out["lengths"].cpu())
        reasons += out["finish_reasons"]
    tokens, logp_old, lengths = torch.cat(tokens), torch.cat(logps), torch.cat(lengths)   # (N, R)
    # an <|image_pad|> / <|video_pad|> the policy wrote cannot be replayed (the model would take it
    # for an image slot): the response ends just before the first one, for reward and training
    vis = torch.isin(tokens, torch.tensor([tok.image_pad_id, tok.video_pad_id])) & (
        torch.arange(tokens.shape[1])[None] < lengths[:, None])
    cut = torch.where(vis.any(1), vis.float().argmax(1), lengths)
    n_cut = int((cut < lengths).sum())
    lengths = cut
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], tok.pad_id)

    texts = [decode_response(tok, tokens[i], int(lengths[i])) for i in range(len(tokens))]
    gts = [r["answer"] for r in records for _ in range(G)]
    options = [r.get("options") for r in records for _ in range(G)]
    scores = reward.score_batch(texts, gts, mode=cfg.reward, count_tokens=tok.count_tokens, options=options)
    rewards = torch.tensor([s.total for s in scores])
    correct = torch.tensor([float(s.final_correct) for s in scores])
    adv = group_advantages(rewards, G, cfg.adv_eps)
    keep = (accuracy_band_keep(correct, G, cfg.acc_low, cfg.acc_high) if cfg.filter_groups
            else torch.ones(len(scores), dtype=torch.bool))
    roll = dict(prompts=prompts, prompt_of=torch.arange(len(scores)) // G, tokens=tokens, lengths=lengths,
                logp_old=logp_old, adv=adv, keep=keep, texts=texts, pad_id=tok.pad_id)

    stats = dict(n=len(scores), groups=len(records), groups_kept=int(keep.sum()) // G,
                 reward=float(rewards.sum()), resp_len=float(lengths.sum()),
                 truncated=sum(r == "length" for r in reasons), vision_token_cut=n_cut)
    for key in ("format", "accuracy", "length"):
        stats[f"r_{key}"] = sum(float(getattr(s, key)) for s in scores)
    stats["acc_first"] = sum(float(s.first_correct) for s in scores)
    stats["acc_final"] = float(correct.sum())
    for case in ("w2r", "r2r", "r2w", "w2w", "single", "none"):
        stats[f"case_{case}"] = sum(s.case == case for s in scores)
    # built-in task only: is the first scene list right? (perception, which no reward checks)
    scenes = [(t, r["scene"]) for t, r in zip(texts, (r for r in records for _ in range(G)))
              if isinstance(r.get("scene"), dict)]
    stats["scene_n"] = len(scenes)
    stats["scene_ok"] = sum(task.first_scene_list(t) == task.scene_list(sc) for t, sc in scenes)
    return roll, stats


def train_batch(roll, rows, pad_id, device):
    """Rollout rows -> left-padded prompt + right-padded response, the response at [Tp, Tp + R).

    Returns input_ids (B, Tp+R), attention_mask (B, Tp+R), pixel_values, image_grid_thw,
    targets (B, R) response tokens, mask (B, R) True on response tokens, R."""
    prompts = data.collate([roll["prompts"][int(roll["prompt_of"][i])] for i in rows], pad_id, left_pad=True)
    L = roll["lengths"][rows]                                        # (B,)
    R = max(int(L.max()), 1)
    targets = roll["tokens"][rows, :R]                               # (B, R)
    mask = torch.arange(R)[None] < L[:, None]                        # (B, R)
    targets = targets.masked_fill(~mask, pad_id)
    ids = torch.cat([prompts["input_ids"], targets], 1)
    att = torch.cat([prompts["attention_mask"], mask.long()], 1)
    pv, grid = prompts["pixel_values"], prompts["image_grid_thw"]
    return dict(input_ids=ids.to(device), attention_mask=att.to(device),
                pixel_values=None if pv is None else pv.to(device), image_grid_thw=None if grid is None else grid.to(device),
                targets=targets.to(device), mask=mask.to(device), R=R)


def policy_logprobs(net, b, cfg, device):
    """Log-probs (B, R) float32 and entropy (B, R) of the response tokens of train_batch b."""
    pv = b["pixel_values"]
    with autocast(device):
        logits = net(b["input_ids"], pixel_values=None if pv is None else pv.to(next(net.parameters()).dtype),
                     image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"],
                     logits_to_keep=b["R"] + 1)[:, :-1]              # (B, R, V): position t predicts token t+1
    return token_logprobs(logits, b["targets"], cfg.temperature, cfg.logprob_chunk)


@torch.no_grad()
def reference_logprobs(ref, roll, cfg, d):
    """logp_ref (N, R) of every rollout row under the frozen reference model."""
    N, Rmax = roll["tokens"].shape
    out = torch.zeros(N, Rmax)
    rows = torch.arange(N)
    for k in range(n_micro_batches(N, cfg.micro_batch, d.device)):
        mb = rows[k * cfg.micro_batch:(k + 1) * cfg.micro_batch]
        if len(mb) == 0:
            mb = rows[:1]                                            # keep FSDP collectives in step
        b = train_batch(roll, mb, roll["pad_id"], d.device)
        lp, _ = policy_logprobs(ref, b, cfg, d.device)
        out[mb, :b["R"]] = lp.cpu()
    return out


# ----------------------------------------------------------------------------------------------
# the update

class NonFiniteLoss(RuntimeError):
    pass


def update(policy, optimizer, roll, cfg, d, logp_ref=None):
    """mu passes x n_minibatches optimizer steps on this rank's share of the rollout batch.

    Mini-batch k holds the kept rows of the local prompts j with j % n_minibatches == k; since each
    rank owns a contiguous block of prompts_per_step / world_size prompts (a multiple of
    n_minibatches), mini-batch k is the same set of global prompts for any number of ranks."""
    G, W = cfg.group_size, d.world_size
    # the optimizer's (sharded) parameters: an FSDP2 module that is unsharded at the moment
    # (e.g. the root after a no-grad forward) lists its gathered copies in .parameters()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = roll["keep"].nonzero()[:, 0]
    st = dict(loss=0.0, tokens=0.0, clipped=0.0, kl_old=0.0, kl_ref=0.0, entropy=0.0, grad_norm=0.0,
              opt_steps=0, train_tokens=0.0)
    for epoch in range(cfg.mu):
        for k in range(cfg.n_minibatches):
            rows = kept[(roll["prompt_of"][kept] % cfg.n_minibatches) == k]
            n_tok = float(dist.all_reduce(torch.tensor([float(roll["lengths"][rows].sum())], device=d.device)).item())
            if n_tok == 0:
                continue                                             # every group of this mini-batch filtered
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(n_micro_batches(len(rows), cfg.micro_batch, d.device)):
                mb = rows[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]
                dummy = len(mb) == 0
                if dummy:
                    mb = torch.arange(1)                             # same forwards on every rank, weight 0
                b = train_batch(roll, mb, roll["pad_id"], d.device)
                logp, ent = policy_logprobs(policy, b, cfg, d.device)
                R = b["R"]
                loss, s = grpo_loss(logp, roll["logp_old"][mb, :R].to(d.device), roll["adv"][mb].to(d.device),
                                    b["mask"], n_tok, cfg.eps_low, cfg.eps_high, cfg.beta,
                                    None if logp_ref is None else logp_ref[mb, :R].to(d.device), W)
                if dummy:
                    loss = loss * 0.0
                loss.backward()
                if not dummy:
                    loss_sum += loss.item()
                    st["tokens"] += float(b["mask"].sum())
                    st["clipped"] += float(s["clipped"])
                    st["kl_old"] += float(s["kl_old"])
                    st["kl_ref"] += float(s.get("kl_ref", 0.0))
                    st["entropy"] += float((ent * b["mask"]).sum())
                    st["train_tokens"] += float(b["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            loss_global = float(dist.all_reduce(torch.tensor([loss_sum / W], device=d.device)).item())
            if not (math.isfinite(loss_global) and math.isfinite(grad_norm)):
                raise NonFiniteLoss(f"loss {loss_global}, grad norm {grad_norm} (pass {epoch}, mini-batch {k})")
            optimizer.step()
            st["loss"] += loss_global
            st["grad_norm"] += grad_norm
            st["opt_steps"] += 1
    return st


# ----------------------------------------------------------------------------------------------
# evaluation (greedy, on the test split)

@torch.no_grad()
def evaluate(policy, tok, records, image_root, cfg, d, system_prompt):
    """Greedy responses to `records` (split over ranks) -> mean reward, accuracies, cases."""
    per = math.ceil(len(records) / d.world_size)
    mine = list(range(d.rank * per, min((d.rank + 1) * per, len(records))))
    idx = mine + [0] * (per - len(mine))            # equal sampler calls on every rank; padding not counted
    scfg = sampler.SampleConfig(max_new_tokens=cfg.max_new_tokens, greedy=True, temperature=cfg.temperature)
    st = dict(n=0.0, reward=0.0, acc_first=0.0, acc_final=0.0, resp_len=0.0, r_format=0.0)
    for case in ("w2r", "r2r", "r2w", "w2w", "single", "none"):
        st[f"case_{case}"] = 0.0
    bs = cfg.rollout_batch * cfg.group_size
    answers = []                                     # final answers: a collapse to one answer shows here
    for c in range(0, per, bs):
        chunk = idx[c:c + bs]
        batch = data.collate([encode_prompt(records[i], tok, image_root, system_prompt) for i in chunk],
                             tok.pad_id, left_pad=True)
        with autocast(d.device):
            out = sampler.generate(policy, batch, tok.eos_ids, scfg, pad_id=tok.pad_id)
        n_real = max(0, min(len(chunk), len(mine) - c))
        texts = [decode_response(tok, out["tokens"][j], int(out["lengths"][j])) for j in range(n_real)]
        scores = reward.score_batch(texts, [records[i]["answer"] for i in chunk[:n_real]], mode=cfg.reward,
                                    count_tokens=tok.count_tokens,
                                    options=[records[i].get("options") for i in chunk[:n_real]])
        for j, s in enumerate(scores):
            parsed = reward.parse_response(texts[j])
            answers.append(parsed.answers[-1] if parsed.answers else "")
            st["n"] += 1
            st["reward"] += s.total
            st["r_format"] += s.format
            st["acc_first"] += float(s.first_correct)
            st["acc_final"] += float(s.final_correct)
            st["resp_len"] += float(out["lengths"][j])
            st[f"case_{s.case}"] += 1
    st = reduce_sums(st, d.device)
    n = max(st.pop("n"), 1.0)
    metrics = {k: (v if k.startswith("case_") else v / n) for k, v in st.items()}
    if dist.is_distributed():
        every = [None] * d.world_size
        torch.distributed.all_gather_object(every, answers)
        answers = [a for part in every for a in part]
    top, count = Counter(answers).most_common(1)[0] if answers else ("", 0)
    metrics.update(top_answer=top, top_answer_frac=count / n)
    return metrics


# ----------------------------------------------------------------------------------------------
# main loop

def truncate_log(path, step):
    """Keep only the log records of steps <= step (a resumed run rewrites what came after)."""
    if not os.path.exists(path):
        return
    keep = [r for r in data.read_jsonl(path, allow_torn_tail=True) if r.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def export_final(ckpt, out):
    """Copy the HF files of the final checkpoint into out/ itself (each atomically;
    model.safetensors last, so its presence means the export is complete)."""
    names = [n for n in os.listdir(ckpt) if n.endswith((".json", ".safetensors", ".jinja"))
             and n not in ("optimizer.safetensors", "train_state.json") and not n.startswith("rng_rank")]
    for name in sorted(names, key=lambda n: n == "model.safetensors"):
        shutil.copyfile(os.path.join(ckpt, name), os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def check_special_tokens(path, tok):
    """config.json's vision token ids must be the tokenizer's: the model treats image_token_id
    positions as image slots and the sampler never draws image/video ids, so a wrong id there
    can, e.g., make a format tag like <reflection> impossible to sample."""
    mc = model_lib.read_config(path)
    want = dict(image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id,
                vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)
    for field, tid in want.items():
        got = getattr(mc, field)
        if got != tid:
            raise ValueError(f"grpo.py: {os.path.join(path, 'config.json')}: {field} = {got} is "
                             f"{tok.tok.id_to_token(got)!r} in the tokenizer, which has "
                             f"{tok.tok.id_to_token(tid)!r} at id {tid}; fix config.json")


def main(cfg: GRPOConfig):
    d = dist.init()
    try:
        check_config(cfg, d.world_size)
        return train(cfg, d)
    finally:
        dist.close()


def train(cfg: GRPOConfig, d):
    device = torch.device(cfg.device) if cfg.device and d.world_size == 1 else d.device
    d.device = device
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    system_prompt = data.SYSTEM_PROMPT_REFLECT if cfg.reward == "srpo" else data.SYSTEM_PROMPT_SINGLE
    tok = data.Tokenizer.from_dir(cfg.model)
    check_special_tokens(cfg.model, tok)
    train_records = load_records(cfg.train)
    test_records = load_records(cfg.test)[:cfg.n_eval] if cfg.test else []
    train_root = os.path.dirname(os.path.abspath(cfg.train))
    test_root = os.path.dirname(os.path.abspath(cfg.test)) if cfg.test else ""
    ckpt = os.path.join(cfg.out, "checkpoint")
    log_path = os.path.join(cfg.out, "log.jsonl")
    resume = os.path.exists(os.path.join(ckpt, "train_state.json"))

    # models: fp32 master weights (bf16 autocast on GPU); the reference only when beta > 0
    policy = model_lib.from_pretrained(ckpt if resume else cfg.model, device=device, dtype=torch.float32)
    if cfg.freeze_vision:
        policy.visual.requires_grad_(False)
    if cfg.grad_checkpoint:
        from torch.distributed._composable import checkpoint as recompute_in_backward
        for layer in policy.layers:          # state-dict keys unchanged
            recompute_in_backward(layer)
    dist.shard_model(policy)
    ref = None
    if cfg.beta > 0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref = model_lib.from_pretrained(cfg.model, device=device, dtype=ref_dtype).requires_grad_(False)
        dist.shard_model(ref)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    start = saved = 0
    if resume:
        start, extra = dist.load_train_state(ckpt, policy, optimizer)
        saved = start
        free = ("steps", "save_every", "eval_every", "n_eval", "threads", "device", "test",   # memory / run knobs
                "micro_batch", "rollout_batch", "grad_checkpoint", "logprob_chunk")
        old = extra.get("config", {})
        changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in asdict(cfg).items() if k in old and k not in free and old[k] != v]
        if changed:
            raise ValueError(f"grpo.py: {ckpt} was written with another config ({'; '.join(changed)}); "
                             f"resume with the same settings or use a new --out")
    if d.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        if resume:
            truncate_log(log_path, start)
        else:
            if os.path.exists(log_path):
                os.remove(log_path)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
        print(f"grpo.py: {'resuming at step ' + str(start) if resume else 'starting'}: {len(train_records)} train "
              f"prompts, world size {d.world_size}, {model_lib.count_params(policy, trainable_only=True):,} "
              f"trainable parameters, device {device}", flush=True)

    def log(record):
        if d.is_main:
            data.append_jsonl(log_path, record)

    def run_eval(step):
        t0 = time.time()
        ev = evaluate(policy, tok, test_records, test_root, cfg, d, system_prompt)
        log({"step": step, "eval": True, **{f"test_{k}": v for k, v in ev.items()}, "time_s": time.time() - t0})
        if d.is_main:
            tqdm.write(f"eval step {step}: test reward {ev['reward']:.3f}  first acc {ev['acc_first']:.3f}  "
                       f"final acc {ev['acc_final']:.3f}  length {ev['resp_len']:.0f}  "
                       f"most common answer {ev['top_answer']!r} ({ev['top_answer_frac']:.0%})")

    if test_records and cfg.eval_every and start == 0:
        run_eval(0)
    P_local = cfg.prompts_per_step // d.world_size
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not d.is_main, desc="grpo")
    for step in pbar:
        # 1-4. rollout, rewards, advantages, filter (this rank's contiguous block of the step's prompts)
        idx = step_prompts(len(train_records), step, cfg.prompts_per_step, cfg.seed)
        mine = [train_records[i] for i in idx[d.rank * P_local:(d.rank + 1) * P_local]]
        t0 = time.time()
        roll, rs = rollout(policy, tok, mine, train_root, cfg, d, step, system_prompt)
        t_roll = time.time() - t0
        logp_ref = reference_logprobs(ref, roll, cfg, d) if ref is not None else None
        # 5. update
        t0 = time.time()
        try:
            us = update(policy, optimizer, roll, cfg, d, logp_ref)
        except NonFiniteLoss as e:
            where = (f"{os.path.abspath(ckpt)} (step {saved}), left untouched" if saved
                     else "none: no checkpoint was written yet")
            msg = (f"grpo.py: step {step + 1}: non-finite {e}. Stopped before the optimizer step. "
                   f"Last good checkpoint: {where}. Lower --lr, check the data, or resume from it.")
            log({"step": step + 1, "error": msg})
            raise NonFiniteLoss(msg) from None
        t_train = time.time() - t0

        # 6. log
        rs = reduce_sums(rs, device)
        us = reduce_sums(us, device)
        n, tokens = rs["n"], max(us["tokens"], 1.0)
        rec = {"step": step + 1, "reward": rs["reward"] / n}
        rec.update({k: rs[k] / n for k in ("r_format", "r_accuracy", "r_length", "acc_first", "acc_final",
                                           "resp_len", "truncated", "vision_token_cut")})
        rec.update({k: int(rs[k]) for k in rs if k.startswith("case_")})
        rec["groups_kept"] = rs["groups_kept"] / rs["groups"]
        if rs["scene_n"]:
            rec["scene_acc"] = rs["scene_ok"] / rs["scene_n"]
        opt_steps = max(us["opt_steps"] / d.world_size, 1.0)
        rec.update(loss=us["loss"] / d.world_size / opt_steps, grad_norm=us["grad_norm"] / d.world_size / opt_steps,
                   opt_steps=int(us["opt_steps"] / d.world_size), kl_old=us["kl_old"] / tokens,
                   clip_frac=us["clipped"] / tokens, entropy=us["entropy"] / tokens)
        if cfg.beta > 0:
            rec["kl_ref"] = us["kl_ref"] / tokens
        rec.update(rollout_tok_s=rs["resp_len"] / t_roll, train_tok_s=us["train_tokens"] * 1.0 / max(t_train, 1e-9),
                   rollout_s=t_roll, train_s=t_train, lr=cfg.lr, sample=roll["texts"][0])
        log(rec)
        pbar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['acc_final']:.2f}", len=f"{rec['resp_len']:.0f}",
                         kept=f"{rec['groups_kept']:.2f}", clip=f"{rec['clip_frac']:.3f}")

        # 7. eval, checkpoint
        done = step + 1
        if test_records and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            run_eval(done)
        if done % cfg.save_every == 0 or done == cfg.steps:
            dist.save_train_state(ckpt, policy, optimizer, done, extra={"config": asdict(cfg)},
                                  tokenizer_dir=cfg.model)
            saved = done
    if d.is_main:
        export_final(ckpt, cfg.out)
        print(f"grpo.py: done, {cfg.steps} steps; final model in {cfg.out} (training state in {ckpt})", flush=True)
    return ckpt


if __name__ == "__main__":
    main(parse_args())
    dist.exit_worker()
