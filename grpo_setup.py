"""
grpo.py's command line and start: GRPOConfig (every field a flag, its comment the --help), the
checks that refuse a bad value before anything runs, the flags' reward config and lr schedule, and
setup (inputs checked, out/ opened, the policy, its optimizer and the reference built or resumed).
The algorithm and the training loop are grpo.py's; the 7B recipe on 8 GPUs is in API.md.
"""
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from support import checkpoint
from support import data
from support import dist
import eval as eval_lib
import model as model_lib
import reward
from support import training
from support.config import parse_config

PROG = "grpo.py"


@dataclass
class GRPOConfig:
    # io (defaults: the files `python pipeline.py` makes in runs/demo)
    model: str = "runs/demo/sft"            # stage-1 (reflection SFT) checkpoint, HF format + tokenizer.json
    train: str = "runs/demo/task/train.jsonl"   # records with messages + answer (task.py / reflect_data.py)
    test: str = ""                          # records for the in-run evaluation (--eval_every); eval.py reads them
    out: str = "runs/demo/srpo"             # log.jsonl, checkpoint/ (resumed from), final HF model
    reward: str = "srpo"                    # srpo (two-pass prompt + SRPO reward) | grpo (baseline)
    reward_preset: str = "paper"            # paper (Eq. 4-8, METHOD.md) | code (the official srpo_reward_func.py)
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
    lr: float = 3e-5                        # tiny model (1e-4 erodes the scene list; README); the paper's 7B uses 1e-6
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
    extra_metrics: str = ""                 # "module:function", fn(texts, records) -> {name: (sum, count)}, logged as
                                            # sum / count per step (same names every call), e.g. a task's perception metric
    seed: int = 0
    device: str = ""                        # "" = cuda if available else cpu (torchrun: cuda:LOCAL_RANK)
    threads: int = 0                        # CPU: torch threads per process (0 = torch's default)


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


# ----------------------------------------------------------------------------------------------
# the start of a run

RESUME_FREE = ("steps", "save_every", "eval_every", "eval_limit", "eval_metric", "threads", "device", "test",
               "micro_batch", "rollout_batch", "grad_checkpoint", "logprob_chunk")   # may change on resume


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
    reference (the initial --model, fp32, sharded like the policy: KL starts at 0) built or resumed."""
    how = "run `python pipeline.py --only task base reflect sft` first, or pass --model / --train"
    checkpoint.require(PROG, os.path.join(cfg.model, "tokenizer.json"), "the model to train", how)
    checkpoint.require(PROG, cfg.train, "training prompts", how)
    if cfg.eval_every:
        checkpoint.require(PROG, cfg.test, "--test records for the in-run evaluation", "pass --test FILE")
    tok = data.Tokenizer.from_dir(cfg.model)
    tok.image_cfg = checkpoint.image_config(PROG, cfg.model, cfg.max_pixels)   # written on save (install_tokenizer)
    checkpoint.check_special_tokens(PROG, cfg.model, tok)
    try:
        records = data.load_records(cfg.train)
        test = eval_lib.load_datasets([cfg.test], [], "", cfg.eval_limit)[0] if cfg.eval_every else None
    except ValueError as e:
        raise checkpoint.RunError(str(e)) from None
    if test is not None:   # as eval.py: records with an unreadable ground truth are skipped, and counted
        test.records, bad = eval_lib.check_answers(test.name, test.records)
        test.skipped = len(bad)
        if not test.records:
            raise checkpoint.RunError(f"{PROG}: --test {cfg.test}: no record with a readable answer")
    rcfg = reward_config(cfg)
    ckpt, resume = checkpoint.open_run(PROG, cfg.out, {"--model": cfg.model}, d.is_main)
    policy, ref, optimizer = build_models(cfg, d, ckpt if resume else cfg.model)
    start = training.resume(PROG, ckpt, policy, optimizer, asdict(cfg), RESUME_FREE) if resume else 0
    if d.is_main:
        checkpoint.install_tokenizer(PROG, cfg.model, cfg.out, cfg.max_pixels)
        checkpoint.start_log(cfg.out, resume, start, {**asdict(cfg), "reward_config": asdict(rcfg)})
        print(f"{PROG}: {'resuming at step ' + str(start) if resume else 'starting'}: {len(records)} train "
              f"prompts, world size {d.world_size}, {model_lib.count_params(policy, trainable_only=True):,} "
              f"trainable parameters, device {d.device}", flush=True)
    dist.barrier()
    return tok, rcfg, records, test, policy, ref, optimizer, start
