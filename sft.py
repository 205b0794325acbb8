"""
Supervised fine-tuning of the Qwen2.5-VL of model.py on JSONL conversations with images.

Two uses, one code path:
- `--init tiny`: train the tiny default tokenizer (data.train_tokenizer) on the training texts
  (+ the extra texts of --tokenizer_corpus), build the tiny model (model.tiny_config) from a seed
  and train it from scratch: this makes the built-in *base* model:
      python sft.py --data runs/demo/task/train.jsonl \
          --tokenizer_corpus runs/demo/task/tokenizer_corpus.jsonl --out runs/demo/base
- `--init PATH`: continue from a checkpoint (HF format); on reflection data this is SRPO stage 1:
      python sft.py --data runs/demo/reflect/train.jsonl --init runs/demo/base --out runs/demo/sft --lr 1e-4

The idea:
- loss = cross-entropy on assistant tokens only (data.encode_messages' assistant_mask), as a
  token-level mean over the whole *global* batch: every micro-batch adds sum(CE) / N_global,
  N_global counted up front, so 1 process and N processes (torchrun, FSDP2) compute the same
  loss and gradient for the same global batch;
- data order is a pure function of (seed, step): every epoch is a seeded permutation cut into
  windows of `bucket` global batches sorted by length (length bucketing: little padding), the
  batches are then shuffled. Step s always sees the same examples, so resuming needs only s;
- global batch = batch_size examples = world_size x grad_accum x micro_batch_size;
- AdamW, linear warmup then cosine decay to min_lr, gradient clipping (training.py, shared with grpo.py);
- every save_every steps and at the end an atomic training checkpoint (checkpoint.save: HF
  weights + optimizer + step + RNG, no pickle) goes to out/checkpoint/ (layout: checkpoint.py); a
  rerun of the same command resumes from it (also after kill -9) and ends with the same weights
  as an uninterrupted run. At the end the HF files (config.json, model.safetensors,
  tokenizer.json, ...) are also copied into out/ itself, loadable by transformers;
- a non-finite loss or gradient stops the run before the optimizer step (exit status 1);
- every record is checked before the first step (data.validate_records: images decode, no control
  tokens, no NaN, at most --max_len tokens, ...): a bad one stops the run at start naming file:line
  and field, or is dropped and counted with --skip_bad_records;
- metrics (loss, lr, grad norm, tokens/s) go to out/log.jsonl, progress to a tqdm bar.
Images are re-encoded per micro-batch (cheap), so memory does not grow with the data set.
"""
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from support import checkpoint
from support import cli
from support import data
from support import dist
import model as model_lib
from support import training
from support.config import parse_config

PROG = "sft.py"


@dataclass
class SFTConfig:
    data: str = "runs/demo/task/train.jsonl"  # training JSONL (images relative to its directory)
    tokenizer_corpus: str = ""  # --init tiny: JSONL of extra texts for the tokenizer (one JSON string a line)
    init: str = "tiny"          # "tiny" = new tokenizer + tiny model from scratch, else a checkpoint dir
    out: str = "runs/demo/base" # final HF checkpoint + log.jsonl + checkpoint/ (layout: checkpoint.py)
    system_prompt: str = "keep" # keep the records' system message, or replace it: "single" / "reflect"
    epochs: float = 1.0
    max_steps: int = 0          # 0 = epochs * steps_per_epoch
    batch_size: int = 16        # global batch, in examples (all processes, all micro-batches)
    micro_batch_size: int = 8   # examples per forward per process
    share_prefix: bool = True   # encode the common first tokens of a micro-batch's rows (the system
                                # prompt) once: the same loss and gradients, less compute
    lr: float = 3e-3            # defaults: the tiny base model from scratch; stage 1 wants ~10x less
    min_lr: float = 3e-4        # end of the cosine
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta2: float = 0.95
    grad_clip: float = 1.0      # 0 = off
    freeze_vision: bool = False
    vision_lr_scale: float = 1.0  # the vision tower's lr = lr x this
    bucket: int = 8             # length bucketing window, in global batches (1 = plain shuffle)
    save_every: int = 50        # checkpoint every K steps (and at the end)
    seed: int = 1337
    vocab_size: int = 1024      # --init tiny: tokenizer size
    tiny: str = ""              # --init tiny: JSON of model.tiny_config overrides, e.g. '{"hidden_size": 96}'
    max_len: int = 0            # >0: error on longer examples
    max_pixels: int = 0         # images: 0 = --init's preprocessor_config.json (else 28*28*1280); > 0 overrides
    threads: int = 1            # CPU only: torch threads per process (0 = torch's default). 1 is robust
                                # on a shared machine: spinning OpenMP threads on busy cores cost up to 10x
    skip_bad_records: bool = False  # drop the records that fail the check at start (counted on stderr)
                                    # instead of refusing the run with their file:line list


def check_config(cfg: SFTConfig, world_size=1):
    """Every bad value is refused before anything runs, naming its flag."""
    def bad(field, why):
        raise checkpoint.RunError(f"{PROG}: --{field} {getattr(cfg, field)!r}: {why}")
    for name in ("batch_size", "micro_batch_size", "save_every", "bucket", "vocab_size"):
        if getattr(cfg, name) < 1:
            bad(name, "must be >= 1")
    for name, ok, why in (("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "must be a finite number > 0"),
                          ("min_lr", math.isfinite(cfg.min_lr) and cfg.min_lr >= 0, "must be a finite number >= 0"),
                          ("epochs", math.isfinite(cfg.epochs) and cfg.epochs > 0, "must be a finite number > 0"),
                          ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0 = from --epochs)"),
                          ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
                          ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
                          ("beta2", 0 <= cfg.beta2 < 1, "must be in [0, 1)"),
                          ("grad_clip", cfg.grad_clip >= 0, "must be >= 0 (0 = off)"),
                          ("vision_lr_scale", math.isfinite(cfg.vision_lr_scale) and cfg.vision_lr_scale >= 0, "must be >= 0"),
                          ("system_prompt", cfg.system_prompt in SYSTEM_PROMPTS, f"must be one of {list(SYSTEM_PROMPTS)}")):
        if not ok:
            bad(name, why)
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        bad("batch_size", f"must be a multiple of micro_batch_size {cfg.micro_batch_size} x world_size {world_size}")


SYSTEM_PROMPTS = {"keep": None, "single": data.SYSTEM_PROMPT_SINGLE, "reflect": data.SYSTEM_PROMPT_REFLECT}


# ----------------------------------------------------------------------------- data

@dataclass
class Example:
    messages: list
    image_root: str
    where: str          # "file.jsonl:LINE" for error messages
    length: int         # tokens
    n_loss: int         # assistant tokens that are predicted (assistant_mask[1:].sum())


def load_examples(path, tokenizer, system_prompt, max_len=0, skip_bad=False, quiet=False, bad=None) -> list[Example]:
    """Check every record before the first step (data.validate_records on the conversation as
    trained: images checked to decode, at most max_len tokens, an assistant turn to learn from;
    errors name file:line; skip_bad drops bad records instead, bad: a list that receives them), then
    encode each once for its length and number of loss tokens. Pixels are not kept."""
    root = os.path.dirname(os.path.abspath(path))

    def conversation(rec, where):
        messages = rec.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages' missing or not a non-empty list")
        data.message_texts(messages, where)   # every message an object with a role and a content
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message to learn from (field 'messages')")
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
        return messages
    cap = min(max_len, data.MAX_TOKENS) if max_len else data.MAX_TOKENS
    good, dropped = data.load_jsonl_validated(path, tokenizer, messages=conversation, image_root=root, max_tokens=cap,
                                              skip_bad=skip_bad, prog=PROG, quiet=quiet)
    if bad is not None:
        bad += dropped
    examples = []
    for where, rec in good:
        messages = conversation(rec, where)
        enc = data.encode_messages(messages, tokenizer, root, where=where, pixels=False)  # pixels: per micro-batch
        n_loss = int(enc["assistant_mask"][1:].sum())
        if n_loss == 0:
            raise ValueError(f"{where}: no assistant message to learn from (field 'messages')")
        examples.append(Example(messages, root, where, len(enc["input_ids"]), n_loss))
    return examples


def epoch_batches(examples, cfg, epoch) -> list[list[int]]:
    """The epoch's global batches (lists of example indices), a pure function of (seed, epoch):
    seeded permutation -> windows of `bucket` batches sorted by length -> batches -> shuffled."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n_batches = len(examples) // cfg.batch_size
    perm = torch.randperm(len(examples), generator=g)[:n_batches * cfg.batch_size].tolist()
    window = cfg.batch_size * max(1, cfg.bucket)
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w:w + window], key=lambda i: examples[i].length) if cfg.bucket > 1 else perm[w:w + window]
        batches += [chunk[b:b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def rank_micro_batches(batch, examples, micro_batch_size, rank, world_size) -> list[list[int]]:
    """This process's share of a global batch: sorted by length, cut into micro-batches, dealt
    round-robin to the processes."""
    batch = sorted(batch, key=lambda i: examples[i].length)
    micro = [batch[m:m + micro_batch_size] for m in range(0, len(batch), micro_batch_size)]
    return micro[rank::world_size]


def encode_batch(idx, examples, tokenizer, device):
    encoded = [data.encode_messages(examples[i].messages, tokenizer, examples[i].image_root, where=examples[i].where)
               for i in idx]
    b = data.collate(encoded, tokenizer.pad_id, left_pad=False)
    return {k: (v.to(device) if v is not None else None) for k, v in b.items()}


# ----------------------------------------------------------------------------- model / tokenizer

def tokenizer_texts(path, corpus=""):
    """Training texts for the tiny tokenizer: every text of the data, the system prompts, the
    format tags, and the extra texts of `corpus` (JSONL, one JSON string a line: e.g. the task's
    teacher reflections, so stage-1 reflection text gets whole-word tokens too)."""
    texts = [data.SYSTEM_PROMPT_SINGLE, data.SYSTEM_PROMPT_REFLECT, data.DEFAULT_SYSTEM,
             "<think></think><answer></answer><reflection></reflection>"]
    for rec in data.read_jsonl(path):
        for m in rec.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                texts.append(c)
            elif isinstance(c, list):
                texts += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    if corpus:
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    t = json.loads(line)
                except json.JSONDecodeError as e:
                    raise checkpoint.RunError(f"{corpus}:{i}: invalid JSON: {e.msg}") from None
                if not isinstance(t, str):
                    raise checkpoint.RunError(f"{corpus}:{i}: expected a JSON string, got {type(t).__name__}")
                texts.append(t)
    return texts


def build_tiny(tokenizer, cfg) -> "model_lib.Qwen2_5_VL":
    overrides = json.loads(cfg.tiny) if cfg.tiny else {}
    mcfg = model_lib.tiny_config(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_pad_id,
                                 vision_start_token_id=tokenizer.vision_start_id,
                                 vision_end_token_id=tokenizer.vision_end_id,
                                 eos_token_id=tokenizer.eos_ids,
                                 **{"video_token_id": tokenizer.video_pad_id, **overrides})
    torch.manual_seed(cfg.seed)
    return model_lib.Qwen2_5_VL(mcfg)


# ----------------------------------------------------------------------------- training

def lr_at(step, max_steps, cfg):
    """Linear warmup to lr (at most half the run), then cosine to min_lr at max_steps."""
    return training.lr_at(step, cfg.lr, cfg.min_lr, min(cfg.warmup_steps, max_steps // 2), max_steps)


def micro_loss(model, batch, autocast, share_prefix=True):
    """Summed CE over the assistant tokens of a micro-batch -> (loss_sum, n_tokens).
    share_prefix: the rows' common first tokens (the system prompt) go through the model once for
    the whole micro-batch (model.common_prefix_len; the same logits): on the built-in task that is
    about half of every row, and the base model's step takes 0.26 s instead of 0.52 s (1 thread,
    micro-batch 16, with model.py's CPU attention change)."""
    L = model.common_prefix_len(batch["input_ids"], batch["attention_mask"]) if share_prefix else 0
    with autocast:
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       attention_mask=batch["attention_mask"], prefix_len=L)  # (b, T, V)
    targets = batch["input_ids"][:, 1:]               # (b, T-1)
    mask = batch["assistant_mask"][:, 1:]             # (b, T-1) predict token t+1 from position t
    logp = logits[:, :-1][mask].float()               # (n, V) only the positions that count
    loss_sum = F.cross_entropy(logp, targets[mask], reduction="sum")
    return loss_sum, int(mask.sum())


def setup(cfg: SFTConfig, d):
    """Inputs checked, out/ locked, tokenizer installed in out/tokenizer, model built: from
    out/checkpoint (resume), a given checkpoint (--init PATH) or new (--init tiny)."""
    checkpoint.require(PROG, cfg.data, "training data", "run `python pipeline.py --only task` first, or pass --data")
    if cfg.tokenizer_corpus:
        checkpoint.require(PROG, cfg.tokenizer_corpus, "--tokenizer_corpus", "run `python pipeline.py --only task` "
                           "first, or pass --tokenizer_corpus ''")
    if cfg.init != "tiny":
        checkpoint.require(PROG, os.path.join(cfg.init, "tokenizer.json"), "the --init checkpoint",
                           "run `python pipeline.py --only task base` first, or pass --init tiny / a checkpoint")
    ckpt, resume = checkpoint.open_run(PROG, cfg.out, {"--init": "" if cfg.init == "tiny" else cfg.init}, d.is_main)
    tok_dir = os.path.join(cfg.out, "tokenizer")
    if d.is_main:   # the tokenizer every save copies from (never a checkpoint a later save deletes)
        if resume or cfg.init != "tiny":
            checkpoint.install_tokenizer(PROG, ckpt if resume else cfg.init, cfg.out, cfg.max_pixels)
        else:
            try:
                data.train_tokenizer(tokenizer_texts(cfg.data, cfg.tokenizer_corpus), tok_dir + ".new", vocab_size=cfg.vocab_size)
                checkpoint.install_tokenizer(PROG, tok_dir + ".new", cfg.out, cfg.max_pixels)
            finally:                                                   # also on a full disk: no partial copy left
                shutil.rmtree(tok_dir + ".new", ignore_errors=True)
    dist.barrier()
    src, flag = (ckpt, "checkpoint") if resume else (cfg.init, "--init") if cfg.init != "tiny" else (tok_dir, "tokenizer")
    with cli.reading(PROG, flag, src):
        tokenizer = data.Tokenizer.from_dir(tok_dir)
        tokenizer.image_cfg = checkpoint.image_config(PROG, tok_dir)    # the run's, as install_tokenizer wrote it
        if resume or cfg.init != "tiny":
            model = model_lib.from_pretrained(src, device=d.device)
            checkpoint.check_special_tokens(PROG, src, tokenizer, model.config)
        else:
            model = build_tiny(tokenizer, cfg).to(d.device)
    try:   # every record checked now (data.validate_records), not when a step first draws it
        skipped = []   # --skip_bad_records: [(where, reason)], listed in run_config.json
        examples = load_examples(cfg.data, tokenizer, SYSTEM_PROMPTS[cfg.system_prompt], cfg.max_len,
                                 cfg.skip_bad_records, not d.is_main, skipped)
    except ValueError as e:
        raise checkpoint.RunError(f"{PROG}: {e}") from None
    fingerprint = checkpoint.data_fingerprint({"--data": cfg.data}, {"--data": len(examples)})
    if len(examples) < cfg.batch_size:
        raise checkpoint.RunError(f"{PROG}: {cfg.data} has {len(examples)} examples < --batch_size {cfg.batch_size}")
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    model.train()
    dist.shard_model(model)
    optimizer = training.make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), cfg.vision_lr_scale)
    step = training.resume(PROG, ckpt, model, optimizer, asdict(cfg), free=(
        "max_steps", "epochs", "save_every", "threads", "micro_batch_size", "share_prefix", "out", "tokenizer_corpus",
        "max_len"), data=fingerprint) if resume else 0
    if d.is_main:
        checkpoint.start_log(cfg.out, resume, step, {**asdict(cfg),
                                                     "skipped_bad_records": [f"{w}: {r}" for w, r in skipped]})
        if resume:
            print(f"{PROG}: resuming from {ckpt} at step {step}")
    return tokenizer, model, optimizer, examples, step, ckpt, tok_dir, fingerprint


def train(cfg: SFTConfig):
    return training.run(cfg, check_config, _train)


def _train(cfg: SFTConfig, d):
    if d.device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer, model, optimizer, examples, step, ckpt, tok_dir, fingerprint = setup(cfg, d)
    log_path = os.path.join(cfg.out, "log.jsonl")
    steps_per_epoch = len(examples) // cfg.batch_size
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if d.is_main:
        print(f"{PROG}: {len(examples)} examples, {steps_per_epoch} steps/epoch, {max_steps} steps, "
              f"world {d.world_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params (full model)")

    def save(step):
        checkpoint.save(ckpt, model, optimizer, step, tokenizer_dir=tok_dir,
                        extra={"config": asdict(cfg), "epoch": step // steps_per_epoch, "data": fingerprint})

    bar = tqdm(total=max_steps, initial=step, disable=not d.is_main, desc="sft", dynamic_ncols=True)
    cached_epoch, batches, saved = -1, None, step
    t0 = time.time()
    while step < max_steps:
        epoch = step // steps_per_epoch
        if epoch != cached_epoch:
            cached_epoch, batches = epoch, epoch_batches(examples, cfg, epoch)
        batch = batches[step % steps_per_epoch]
        training.follow_thread_budget(d.device)  # pipeline.py: this stage's share of the cores
        n_global = sum(examples[i].n_loss for i in batch)  # loss tokens of the whole global batch
        lr = lr_at(step, max_steps, cfg)
        training.set_lr(optimizer, lr)

        micro = rank_micro_batches(batch, examples, cfg.micro_batch_size, d.rank, d.world_size)
        loss_sum = torch.zeros((), device=d.device)
        for k, idx in enumerate(micro):
            if d.world_size > 1:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(k == len(micro) - 1)
            mb = encode_batch(idx, examples, tokenizer, d.device)
            ls, _ = micro_loss(model, mb, training.autocast(d.device), cfg.share_prefix)
            # FSDP averages gradients over processes: x world_size makes it the global-batch sum / N
            (ls * d.world_size / n_global).backward()
            loss_sum += ls.detach()
        dist.all_reduce(loss_sum, "sum")
        loss = loss_sum.item() / n_global
        try:
            grad_norm = training.clip_grad_norm(params, cfg.grad_clip, loss)
        except checkpoint.NonFiniteLoss as e:
            checkpoint.stop_non_finite(PROG, step + 1, str(e), ckpt, saved, d.is_main)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if d.is_main:
            tokens = sum(examples[i].length for i in batch)
            checkpoint.append_log(log_path, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                             "loss_tokens": n_global, "tokens": tokens, "epoch": step / steps_per_epoch,
                                             "elapsed_s": round(time.time() - t0, 3)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
        if step % cfg.save_every == 0 or step == max_steps:
            save(step)
            saved = step
        stop = training.stop_requested(d)                              # SIGTERM / SIGINT on any rank: stop here
        if stop and step < max_steps:
            if saved != step:
                save(step)
            bar.close()
            raise training.preempted(PROG, stop, step, ckpt)
    bar.close()
    if d.is_main:
        checkpoint.export_final(ckpt, cfg.out)
        print(f"{PROG}: done, {max_steps} steps in {time.time() - t0:.1f}s; final model in {cfg.out}")
    del model, optimizer, params  # free the sharded tensors before the process group goes
    return cfg.out


def parse_args(argv=None) -> SFTConfig:
    cfg = parse_config(SFTConfig, argv, description=__doc__.strip().split("\n")[0],
                       choices={"system_prompt": list(SYSTEM_PROMPTS)})
    check_config(cfg)
    return cfg


if __name__ == "__main__":
    cli.main(PROG, lambda: train(parse_args()))
    dist.exit_worker()
