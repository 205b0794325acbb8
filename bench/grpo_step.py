"""
Benchmark: one GRPO step, split into its four parts, with and without prompt sharing.

    generation  sampler.generate_texts: P prompts x G samples, max_new tokens (no eos: every row
                runs to the end), temperature 1
    reward      reward.score_batch on the decoded texts (random weights: the texts do not parse,
                so this is a lower bound of the real reward time)
    reference   log-probs of every response under the frozen reference model (no grad)
    training    forward + backward of the policy on the same rows, micro-batches of whole groups,
                a clipped-ratio loss (random advantages: the random model's rewards are all equal)

"shared" runs the reference and training forwards through model.forward_shared_prefix (each
prompt, with its image, encoded once per micro-batch; its G responses attend to its keys/values);
"unshared" through model.forward over [prompt | response] rows, the prompt repeated G times. Generation and reward are the same code in both.

The shape is the built-in task's: the reflect system prompt + one 280x224 image (80 image tokens)
+ a question -> ~200-token prompts; the model is model.tiny_config() on a tokenizer trained here
(vocab 1024), random weights, fp32, 1 torch thread by default. Times are medians over --reps
runs, shared and unshared interleaved (the machine is shared: read the ratios).

When `trl` is importable (bench/requirements-bench.txt, in a separate venv; never a project
requirement) the same step is also timed with TRL's GRPOTrainer (trl_step: same initial weights,
saved with model.save_pretrained and loaded by transformers; same images, question, P x G, new
tokens forced with min_new_tokens, SRPO reward, beta 0.04, micro-batches of 16 rows, gradient
checkpointing off, fp32, 1 thread, no vLLM), and the ratios are printed last. transformers 5.24
cannot build Qwen2_5_VLProcessor without torchvision, so it is built with the PIL image processor
and video_processor=None (see trl_step).

    python bench/grpo_step.py                     # 8 prompts x 8 samples, 128 new tokens
    python bench/grpo_step.py --new 32 --reps 1   # a quick look

With trl installed it prints two ratios last: our step timed before TRL's (the medians of our
parts, printed first), and interleaved (our shared step run after each of TRL's steps), which is
the one to read on a machine whose speed drifts.

Measured runs are in docs/LOG.md: on a quiet 2-core CPU the shared step took ~3.8-4.1 s, about
2x the unshared step and 3.6-4.0x faster than TRL's GRPOTrainer step.

Caveats: our step is the sum of its four timed parts (AdamW on 1.1M parameters and grpo.py's
bookkeeping are not in it, nor measured here; TRL's step has both); TRL's advantages are all 0 here (the
random model's rewards are equal) while ours are random, which costs the same FLOPs.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import data  # noqa: E402
import model as M  # noqa: E402
import reward  # noqa: E402
import sampler as S  # noqa: E402

QUESTION = "How many red shapes are to the left of the blue circle? Count each one."


def make_world(tmp, P, seed=0):
    """A tokenizer trained on the prompts' text, P encoded prompts (reflect system prompt, one image,
    a question), their ground truths, and a tiny model sized to the tokenizer."""
    g = torch.Generator().manual_seed(seed)
    corpus = [data.SYSTEM_PROMPT_REFLECT, QUESTION, "<think>there are 3 red squares</think><answer>3</answer>"] * 50
    tok = data.train_tokenizer(corpus, os.path.join(tmp, "tok"), vocab_size=1024)
    prompts, images = [], []
    for p in range(P):
        img = Image.new("RGB", (280, 224), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = (int(v) for v in torch.randint(0, 200, (2,), generator=g))
            draw.rectangle([x, y, x + 30, y + 30], fill=tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g)))
        messages = [{"role": "system", "content": data.SYSTEM_PROMPT_REFLECT},
                    {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}]
        prompts.append(data.encode_messages(messages, tok, image_root="", add_generation_prompt=True))
        images.append((img, messages))
    cfg = M.tiny_config(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id,
                        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
                        eos_token_id=tok.eos_ids)
    torch.manual_seed(seed)
    return tok, prompts, images, M.Qwen2_5_VL(cfg).eval()


def micro_batches(prompts, gen, G, per_micro):
    """Whole groups per micro-batch: (prompt batch (left-padded), responses (rows, R), mask, rows)."""
    for a in range(0, len(prompts), per_micro):
        b = min(a + per_micro, len(prompts))
        rows = torch.arange(a * G, b * G)
        L = gen.lengths[rows]
        R = int(L.max())
        mask = (torch.arange(R)[None] < L[:, None]).long()  # (rows, R)
        yield data.collate(prompts[a:b], 0, left_pad=True), gen.tokens[rows, :R] * mask, mask, rows


def response_logits(net, pb, resp, mask, G, shared):
    """(rows, R, V): logits[:, t] predicts response token t, shared or unshared forward."""
    if shared:
        return net.forward_shared_prefix(pb["input_ids"], pb["attention_mask"], pb["pixel_values"],
                                         pb["image_grid_thw"], resp, mask)
    ids = torch.cat([pb["input_ids"].repeat_interleave(G, 0), resp], 1)  # every row: [prompt | response]
    att = torch.cat([pb["attention_mask"].repeat_interleave(G, 0), mask], 1)
    n_pv = pb["image_grid_thw"].prod(-1)  # patches per image; one image per prompt here
    pv = torch.cat([p for p in pb["pixel_values"].split(n_pv.tolist()) for _ in range(G)])
    grid = pb["image_grid_thw"].repeat_interleave(G, 0)
    return net(ids, pv, grid, attention_mask=att, logits_to_keep=resp.shape[1] + 1)[:, :-1]


def logprobs(logits, resp, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, resp[..., None])[..., 0]  # (rows, R)


def reference_pass(ref, prompts, gen, G, per_micro, shared):
    with torch.no_grad():
        for pb, resp, mask, rows in micro_batches(prompts, gen, G, per_micro):
            logprobs(response_logits(ref, pb, resp, mask, G, shared), resp)


def training_pass(policy, prompts, gen, adv, G, per_micro, shared, eps=0.2):
    """Forward + backward of the PPO-clipped loss (token mean over the step), gradients accumulated."""
    n_tokens = float(gen.lengths.sum())
    for pb, resp, mask, rows in micro_batches(prompts, gen, G, per_micro):
        lp = logprobs(response_logits(policy, pb, resp, mask, G, shared), resp)
        ratio = torch.exp(lp - gen.logprobs[rows, :resp.shape[1]])
        a = adv[rows, None]
        pg = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        ((pg * mask).sum() / n_tokens).backward()
    policy.zero_grad(set_to_none=True)


def trl_step(model_dir, images, P, G, new, micro, reps, count_tokens, between=None):
    """TRL's GRPOTrainer on the same weights (model_dir, loaded by transformers), the same P images
    and question, G samples of exactly `new` tokens each (min_new_tokens: the random model would
    otherwise draw an eos at random), the SRPO reward of reward.py, beta 0.04, fp32, no vLLM.
    Settings matched to grpo.py's defaults: micro-batches of `micro` whole groups
    (per_device_train_batch_size = micro * G, gradient_accumulation = P / micro, one generation of
    P x G per optimizer step), gradient checkpointing OFF (TRL's default is on; grpo.py's is off),
    loss_type "grpo" (per-response token mean, grpo.py's default loss_agg=seq; "dapo" costs the same).
    Returns the wall times of optimizer steps 2 .. reps + 1 (step 1 warms up): each from the
    trainer's on_step_begin to its on_step_end, so generation, reward, reference, old log-probs
    (none: one pass over each generation), forward, backward and AdamW are in, the Trainer's
    setup is not. `between`: a callable run after each TRL step (outside its timing), returning a
    time: our step, so that both see the same phases of a machine whose speed drifts; its times
    (the first dropped like TRL's) are returned too."""
    from datasets import Dataset
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              TrainerCallback)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer
    hf_logging.set_verbosity_error()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    # transformers 5.24 cannot build Qwen2_5_VLProcessor without torchvision: its default image
    # processor and its video processor import it. So: the PIL image processor, no video processor,
    # and the class check (which also looks up the missing video processor class) skipped for None.
    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    processor = Processor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None,
                          chat_template=tokenizer.chat_template)
    rows = [{"prompt": [{"role": "system", "content": [{"type": "text", "text": data.SYSTEM_PROMPT_REFLECT}]},
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
             "image": img, "answer": "3"} for img, _ in images[:P]]

    def srpo_reward(completions, answer, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [s.total for s in reward.score_batch(texts, list(answer), mode="srpo", count_tokens=count_tokens)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.between_times, self.t0 = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            if between is not None:
                self.between_times.append(between())

    timer = StepTimer()
    args = GRPOConfig(output_dir=os.path.join(model_dir, "trl"), per_device_train_batch_size=micro * G,
                      gradient_accumulation_steps=P // micro, num_generations=G, max_completion_length=new,
                      generation_kwargs={"min_new_tokens": new}, max_steps=reps + 1, temperature=1.0,
                      beta=0.04, loss_type="grpo", learning_rate=3e-5, gradient_checkpointing=False,
                      use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
                      dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32),
                          args=args, processing_class=processor, train_dataset=Dataset.from_list(rows),
                          reward_funcs=srpo_reward, callbacks=[timer])
    trainer.train()
    return timer.times[1:], timer.between_times[1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2, help="prompts (whole groups) per forward/backward")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    P, G = args.prompts, args.group
    with tempfile.TemporaryDirectory() as tmp:
        tok, prompts, images, policy = make_world(tmp, P)
        ref = M.Qwen2_5_VL(policy.config).eval().requires_grad_(False)
        ref.load_state_dict(policy.state_dict())
        policy.train()
        lens = [len(p["input_ids"]) for p in prompts]
        n_img = int((prompts[0]["input_ids"] == tok.image_pad_id).sum())
        print(f"model: tiny_config(), {M.count_params(policy) / 1e6:.2f}M params, vocab {tok.vocab_size}; "
              f"{P} prompts x {G} samples, prompt {min(lens)}-{max(lens)} tokens ({n_img} image tokens), "
              f"{args.new} new tokens, micro-batch {args.micro} prompts ({args.micro * G} rows), "
              f"torch threads {torch.get_num_threads()}", flush=True)

        sc = S.SampleConfig(max_new_tokens=args.new, temperature=1.0, n=G, seed=0)
        tok_no_eos = type("NoEos", (), {})()  # the tokenizer, with no eos: every row runs to max_new
        tok_no_eos.__dict__.update(pad_id=tok.pad_id, eos_ids=[], decode=tok.decode)
        S.generate_texts(policy, tok_no_eos, prompts[:2], S.SampleConfig(max_new_tokens=4, n=2))  # compile
        gts = ["3"] * (P * G)
        adv = torch.randn(P * G, generator=torch.Generator().manual_seed(0))
        times = {k: [] for k in ("generation", "reward", "reference shared", "reference unshared",
                                 "training shared", "training unshared")}
        def one_step(modes):
            """generation and reward once, then reference and training for each of modes (True =
            shared) in that order -> dict of the parts' wall times"""
            t = {}
            t0 = time.perf_counter()
            gen = S.generate_texts(policy, tok_no_eos, prompts, sc, batch_size=P)
            t["generation"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            reward.score_batch(gen.texts, gts, mode="srpo", count_tokens=tok.count_tokens)
            t["reward"] = time.perf_counter() - t0
            for shared in modes:
                name = "shared" if shared else "unshared"
                t0 = time.perf_counter()
                reference_pass(ref, prompts, gen, G, args.micro, shared)
                t[f"reference {name}"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                training_pass(policy, prompts, gen, adv, G, args.micro, shared)
                t[f"training {name}"] = time.perf_counter() - t0
            return t

        for rep in range(args.reps + 1):  # the first rep warms up (untimed)
            t = one_step((True, False) if rep % 2 else (False, True))  # shared and unshared interleaved
            if rep:
                for k, v in t.items():
                    times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:20s} {v:6.2f} s   (runs: {' '.join(f'{x:.2f}' for x in times[k])})")
        step = {name: med["generation"] + med["reward"] + med[f"reference {name}"] + med[f"training {name}"]
                for name in ("shared", "unshared")}
        print(f"GRPO step: shared {step['shared']:.2f} s | unshared {step['unshared']:.2f} s")
        try:
            import trl  # noqa: F401
        except ImportError:
            trl_times = None
            print("TRL GRPOTrainer: not timed (trl is not installed; pip install -r bench/requirements-bench.txt)")
        else:
            model_dir = os.path.join(tmp, "model")
            M.save_pretrained(ref, model_dir, tokenizer_dir=os.path.join(tmp, "tok"))  # ref: the initial weights
            threads = torch.get_num_threads()

            def ours_between():  # our shared step, run after each of TRL's steps
                torch.set_num_threads(threads)  # in case the Trainer changed it
                return sum(one_step((True,)).values())

            trl_times, ours_times = trl_step(model_dir, images, P, G, args.new, args.micro, args.reps,
                                             tok.count_tokens, between=ours_between)
            torch.set_num_threads(threads)
            print(f"TRL GRPOTrainer step {statistics.median(trl_times):6.2f} s   "
                  f"(runs: {' '.join(f'{x:.2f}' for x in trl_times)}; generation, reward, reference, "
                  f"training and AdamW)")
            print(f"GRPO step, shared, run after each TRL step {statistics.median(ours_times):6.2f} s   "
                  f"(runs: {' '.join(f'{x:.2f}' for x in ours_times)})", flush=True)
        print(f"speedup of prompt sharing: reference {med['reference unshared'] / med['reference shared']:.2f}x, "
              f"training forward+backward {med['training unshared'] / med['training shared']:.2f}x, "
              f"whole step {step['unshared'] / step['shared']:.2f}x")
        if trl_times is not None:
            t_trl = statistics.median(trl_times)
            print(f"GRPO step vs TRL GRPOTrainer, ours timed before TRL's: shared (grpo.py) "
                  f"{t_trl / step['shared']:.2f}x faster, unshared (grpo.py before prompt sharing) "
                  f"{t_trl / step['unshared']:.2f}x faster")
            print(f"GRPO step vs TRL GRPOTrainer, interleaved (ours after each TRL step): shared (grpo.py) "
                  f"{t_trl / statistics.median(ours_times):.2f}x faster")


if __name__ == "__main__":
    main()
