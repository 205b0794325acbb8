"""
Per-GPU memory of a GRPO run, term by term, before you rent the GPUs.

    python -m support.memory --model /ckpt/Qwen2.5-VL-7B-Instruct --world_size 8 --rollout_batch 4 \
        --group_size 8 --prompt_len 1024 --max_new_tokens 2048 --micro_batch 4 --grad_checkpoint
    python -m support.memory                        # defaults: Qwen2.5-VL-7B, grpo.py's 7B recipe on 8 GPUs

Every term is a formula over the model config and the run's shapes (bytes per GPU):

    params       fp32 master weights, sharded by FSDP2 over world_size ranks      4 N / W
    grads        fp32 gradients of the trainable parameters, sharded               4 N_train / W
    optimizer    AdamW's two fp32 moments of the trainable parameters, sharded     8 N_train / W
    reference    the frozen reference model, sharded (only if beta > 0): fp32 like   4 N / W
                 the policy, so that both run the same FSDP2 bf16 path (KL 0 at step 0)
    rollout      the whole model all-gathered in bf16 for generation (FSDP2 MixedPrecisionPolicy
                 param_dtype=bf16: the gathered copy is bf16, not fp32)             2 N
                 sampler.generate gathers it ONCE per call (sampler.unsharded) and keeps it for every
                 decode step, instead of gathering each layer for every new token: this term is the
                 price (15.5 GB for Qwen2.5-VL-7B), paid for the length of the rollout only
    kv_cache     bf16 keys + values of every layer for the rows generated at once:
                 rows x tokens x layers x 2 x kv_heads x head_dim x 2 bytes. The sampler's static
                 path (the CUDA default) holds one row per sample of capacity prompt + new tokens:
                 rollout_batch x G x (prompt_len + max_new), rounded up to 64 tokens per row
                 (sampler.CAPACITY_MULTIPLE; not counted here); its cascade path (the CPU default,
                 shared_prefix_cache=1) each prompt once per group: rollout_batch x prompt_len +
                 rollout_batch x G x max_new
    activations  what autograd keeps for one training micro-batch of B = micro_batch rows of
                 T = prompt_len + max_new tokens, in bf16. Per token and decoder layer a layer saves
                 4 I + 7 H + 2 KV + 2 hd + heads values (I = intermediate, H = hidden, KV = kv_heads x
                 head_dim, hd = head_dim; measured with saved_tensors_hooks on the tiny model, see
                 tests/test_memory.py). With --grad_checkpoint only each layer's input (H per token)
                 is kept, plus one layer's activations while it is recomputed in backward.
    logits       the response logits kept for the log-prob chunks, bf16 (B x max_new x V x 2), plus
                 one float32 chunk and its softmax (3 x B x logprob_chunk x V x 4)

Not counted: the CUDA context and NCCL buffers (~1-3 GB per GPU), allocator fragmentation, the
vision tower's activations (frozen: run without autograd) and the images themselves. Leave ~10% slack.
"""
import argparse
from dataclasses import dataclass, fields

import torch

import model as model_lib

GB = 1024 ** 3


@dataclass
class RunShape:
    world_size: int = 8
    rollout_batch: int = 4          # prompts per sampler call per rank
    group_size: int = 8             # G
    prompt_len: int = 1024          # tokens, images included
    max_new_tokens: int = 2048
    micro_batch: int = 4            # rows per training forward per rank
    grad_checkpoint: bool = True
    logprob_chunk: int = 256
    beta: float = 0.0               # > 0 keeps a reference model
    freeze_vision: bool = True
    shared_prefix_cache: bool = False  # 1: the sampler's cascade path (each group's prompt K/V stored once);
                                       # 0: its static path, the one CUDA runs (the prompt once per sample)


@dataclass
class MemoryPlan:
    params: float
    grads: float
    optimizer: float
    reference: float
    rollout: float
    kv_cache: float
    activations: float
    logits: float

    @property
    def training_peak(self):
        """Resident during the update: sharded state + activations + logits."""
        return self.params + self.grads + self.optimizer + self.reference + self.activations + self.logits

    @property
    def rollout_peak(self):
        """Resident during generation: sharded state + the gathered bf16 copy + the KV cache
        (gradients are freed before the rollout)."""
        return self.params + self.optimizer + self.reference + self.rollout + self.kv_cache

    def table(self) -> str:
        rows = [f"{f.name:<12} {getattr(self, f.name) / GB:8.2f} GB" for f in fields(self)]
        rows += [f"{'rollout peak':<12} {self.rollout_peak / GB:8.2f} GB   (params + optimizer + reference + rollout + kv_cache)",
                 f"{'train peak':<12} {self.training_peak / GB:8.2f} GB   (params + grads + optimizer + reference + activations + logits)"]
        return "\n".join(rows)


def param_counts(mcfg: model_lib.ModelConfig, freeze_vision: bool) -> tuple[int, int]:
    """(all parameters, trainable parameters), counted exactly on a meta-device model."""
    with torch.device("meta"):
        net = model_lib.Qwen2_5_VL(mcfg)
    if freeze_vision:
        net.visual.requires_grad_(False)
    return model_lib.count_params(net), model_lib.count_params(net, trainable_only=True)


def layer_activation_values(t: model_lib.TextConfig) -> int:
    """Values one decoder layer saves for backward, per token (fitted on the tiny model within 3%)."""
    kv = t.num_key_value_heads * t.head_dim
    return 4 * t.intermediate_size + 7 * t.hidden_size + 2 * kv + 2 * t.head_dim + t.num_attention_heads


def memory_plan(mcfg: model_lib.ModelConfig, run: RunShape) -> MemoryPlan:
    t, W = mcfg.text, run.world_size
    n_all, n_train = param_counts(mcfg, run.freeze_vision)
    G, Tp, Tn = run.group_size, run.prompt_len, run.max_new_tokens
    cache_tokens = (run.rollout_batch * Tp + run.rollout_batch * G * Tn if run.shared_prefix_cache
                    else run.rollout_batch * G * (Tp + Tn))
    kv_bytes_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2
    B, T = run.micro_batch, Tp + Tn
    per_layer = layer_activation_values(t) * B * T * 2
    if run.grad_checkpoint:
        activations = t.num_hidden_layers * B * T * t.hidden_size * 2 + per_layer
    else:
        activations = t.num_hidden_layers * per_layer
    logits = B * Tn * t.vocab_size * 2 + 3 * B * min(run.logprob_chunk, Tn) * t.vocab_size * 4
    return MemoryPlan(params=4 * n_all / W, grads=4 * n_train / W, optimizer=8 * n_train / W,
                      reference=4 * n_all / W if run.beta > 0 else 0.0, rollout=2 * n_all,
                      kv_cache=cache_tokens * kv_bytes_per_token, activations=activations, logits=logits)


def main(argv=None):
    ap = argparse.ArgumentParser(description="per-GPU memory of a GRPO configuration, term by term",
                                 allow_abbrev=False)
    ap.add_argument("--model", default="", help="checkpoint dir (its config.json); default: Qwen2.5-VL-7B's config")
    for f in fields(RunShape):
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", type=int, choices=[0, 1], default=int(f.default))
        else:
            ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    a = ap.parse_args(argv)
    mcfg = model_lib.read_config(a.model) if a.model else model_lib.ModelConfig()
    run = RunShape(**{f.name: (bool(getattr(a, f.name)) if isinstance(f.default, bool) else getattr(a, f.name))
                      for f in fields(RunShape)})
    n_all, n_train = param_counts(mcfg, run.freeze_vision)
    print(f"model: {n_all / 1e9:.2f}B parameters ({n_train / 1e9:.2f}B trainable); {run}")
    print(memory_plan(mcfg, run).table())


if __name__ == "__main__":
    main()
