"""
Qwen2.5-VL in plain PyTorch, readable top to bottom.

    pixels --(patch embed)--> patches --(ViT blocks: window / full attention, 2D rotary)--> merger
           --> image embeddings, written into the text embeddings at the <|image_pad|> tokens
    tokens --(Qwen2 decoder: GQA, multimodal rotary M-RoPE)--> norm --> lm_head --> logits

Vision tower. An image is cut into 14x14 patches (times 2 frames: a still image is repeated), each
flattened to 3*2*14*14 = 1176 numbers and projected to `hidden_size` (a Conv3d whose kernel equals
its stride, i.e. a Linear; the weight keeps the checkpoint's 5D Conv3d layout). The processor
lists the patches "block-major": the 2x2 patches that the merger will fuse are consecutive.
Attention inside the tower is restricted to windows of `window_size` pixels (112 = 4x4 merged
units), except in the blocks listed in `fullatt_block_indexes`, which see the whole image. To make
windows contiguous the patches are reordered window by window before the blocks and the merged
tokens are put back in the original order at the end; each window (or image) then attends only
within itself, windows of equal size batched into one SDPA call (no mask over all patches). The
rotary embedding is 2D: half of the rotated dims encode the patch row, half the column.

Decoder. A Qwen2 decoder with grouped-query attention. M-RoPE gives every token three position
ids (t, h, w): text tokens have t = h = w = running index; the tokens of an image get the grid
coordinates of their merged patch, offset by the running index, and the text after the image
continues at max + 1. The head dims are split by `mrope_section` (e.g. [16, 24, 24] of the 64
frequencies) and each part is rotated by one of the three axes. `get_rope_index` computes the ids
per row over the non-padded tokens. For the tokens after a prompt (the sampler's decode steps,
forward_shared_prefix's responses) we keep `rope_deltas` = (max position + 1) - T per row
(T = padded prompt length), so the token at sequence index s (s >= T) has position
s + rope_deltas on all three axes: they never recompute the vision tower or the rope index. (transformers subtracts the un-padded length instead and then counts positions with
the attention mask's cumsum; both give the same positions.)

KV cache. `KVCache` is preallocated (static): k, v of shape (layers, B, kv_heads, max_len,
head_dim), in the model's dtype. `forward(..., cache=c)` (the sampler's prefill) writes the keys
and values of the T prompt tokens at [0, T); sampler.py decodes with its own one-token step
(`sampler.decode_step`) over that cache, one row per prompt shared by the prompt's samples.

Shared prefix (GRPO). `forward_shared_prefix` computes the logits of G responses per prompt with
each prompt (and its images) encoded once: the decoder runs the P prompts and the P*G responses
side by side, one call per layer; a response attends to its prompt's keys/values, expanded to
its G rows (so autograd sums their gradients into the one prompt forward), then causally to its
own tokens, at positions that continue its prompt's M-RoPE positions.

Checkpoints. `from_pretrained` builds the model on the meta device from config.json and loads a
Hugging Face checkpoint directory into it; `save_pretrained` writes one. The files themselves
(key layouts, shards, atomic writes, preprocessor_config.json) are support/hf_checkpoint.py's.
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from support import hf_checkpoint

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    tokens_per_second: int = 2  # only used for videos (not supported here); kept for round trips


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: object = 151645  # int or list of ints
    pad_token_id: object = None

    def validate(self, where="config"):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"{where}: text hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads {t.num_attention_heads} not divisible by num_key_value_heads {t.num_key_value_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"{where}: mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            raise ValueError(f"{where}: vision hidden_size {v.hidden_size} / num_heads {v.num_heads} must be a multiple of 4")
        if not 0 <= self.image_token_id < t.vocab_size:
            raise ValueError(f"{where}: image_token_id {self.image_token_id} outside vocab_size {t.vocab_size}")
        return self

    @classmethod
    def from_hf(cls, d: dict, where="config.json"):
        """Parse a HF config.json dict: transformers-5 nested layout (text_config / vision_config,
        rope_parameters) or the older flat hub layout (top-level text fields, rope_scaling)."""
        if d.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"{where}: model_type is {d.get('model_type')!r}, expected 'qwen2_5_vl' (Qwen2.5-VL)")
        tc = d.get("text_config") or {}

        def text(key, default=None):  # nested value first, then the flat top-level one
            return tc[key] if key in tc else d.get(key, default)

        for sub, act in (("text", text("hidden_act", "silu")), ("vision", (d.get("vision_config") or {}).get("hidden_act", "silu"))):
            if act != "silu":
                raise ValueError(f"{where}: {sub} hidden_act is {act!r}, only 'silu' is supported")
        if text("use_sliding_window", False):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        rope = text("rope_parameters") or text("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only default M-RoPE)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if text(key) is None:
                raise ValueError(f"{where}: missing field {key!r} (text config)")
        tie = d.get("tie_word_embeddings", False) or tc.get("tie_word_embeddings", False)  # as transformers
        t = TextConfig(
            vocab_size=text("vocab_size"),
            hidden_size=text("hidden_size"),
            intermediate_size=text("intermediate_size"),
            num_hidden_layers=text("num_hidden_layers"),
            num_attention_heads=text("num_attention_heads"),
            num_key_value_heads=text("num_key_value_heads") or text("num_attention_heads"),
            rms_norm_eps=text("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text("rope_theta", 1e6))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=text("max_position_embeddings", 128000),
        )
        vc = d.get("vision_config")
        if not vc:
            raise ValueError(f"{where}: missing field 'vision_config'")
        dv = VisionConfig()
        v = VisionConfig(
            depth=vc.get("depth", dv.depth),
            hidden_size=vc.get("hidden_size", dv.hidden_size),
            intermediate_size=vc.get("intermediate_size", dv.intermediate_size),
            num_heads=vc.get("num_heads", dv.num_heads),
            out_hidden_size=vc.get("out_hidden_size", t.hidden_size),
            patch_size=vc.get("patch_size", dv.patch_size),
            spatial_merge_size=vc.get("spatial_merge_size", dv.spatial_merge_size),
            temporal_patch_size=vc.get("temporal_patch_size", dv.temporal_patch_size),
            window_size=vc.get("window_size", dv.window_size),
            fullatt_block_indexes=list(vc.get("fullatt_block_indexes", dv.fullatt_block_indexes)),
            in_channels=vc.get("in_channels", vc.get("in_chans", dv.in_channels)),
            tokens_per_second=vc.get("tokens_per_second", dv.tokens_per_second),
        )
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"{where}: vision_config.out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        dm = cls()
        return cls(
            text=t, vision=v,
            image_token_id=d.get("image_token_id", dm.image_token_id),
            video_token_id=d.get("video_token_id", dm.video_token_id),
            vision_start_token_id=d.get("vision_start_token_id", dm.vision_start_token_id),
            vision_end_token_id=d.get("vision_end_token_id", dm.vision_end_token_id),
            eos_token_id=text("eos_token_id", dm.eos_token_id),
            pad_token_id=text("pad_token_id", None),
        ).validate(where)

    def to_hf(self, dtype="float32") -> dict:
        """config.json in the transformers-5 layout (Qwen2_5_VLConfig)."""
        t, v = self.text, self.vision
        text_config = {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
            "bos_token_id": None, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings, "dtype": dtype,
        }
        vision_config = {
            "model_type": "qwen2_5_vl_vision", "hidden_act": "silu",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "in_channels": v.in_channels, "tokens_per_second": v.tokens_per_second,
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text_config, "vision_config": vision_config,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings, "dtype": dtype,
        }


def tiny_config(vocab_size=1024, image_token_id=None, vision_start_token_id=None, vision_end_token_id=None,
                eos_token_id=None, **overrides) -> ModelConfig:
    """A few-million-parameter Qwen2.5-VL for CPU. Special token ids default to the top of the
    vocab. overrides: any TextConfig / VisionConfig field by name (vision ones prefixed 'vision_',
    e.g. vision_depth=1), or a ModelConfig field."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6],
                      tie_word_embeddings=True, max_position_embeddings=4096)
    vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                          window_size=112, fullatt_block_indexes=[1])
    cfg = ModelConfig(text=text, vision=vision,
                      image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
                      video_token_id=vocab_size - 2,
                      vision_start_token_id=vocab_size - 3 if vision_start_token_id is None else vision_start_token_id,
                      vision_end_token_id=vocab_size - 4 if vision_end_token_id is None else vision_end_token_id,
                      eos_token_id=vocab_size - 5 if eos_token_id is None else eos_token_id)
    for k, val in overrides.items():
        if k.startswith("vision_") and hasattr(vision, k[len("vision_"):]):
            setattr(vision, k[len("vision_"):], val)
        elif hasattr(text, k):
            setattr(text, k, val)
        elif hasattr(cfg, k):
            setattr(cfg, k, val)
        else:
            raise ValueError(f"tiny_config: unknown field {k!r}")
    vision.out_hidden_size = text.hidden_size
    if "mrope_section" not in overrides:  # Qwen's 1/4, 3/8, 3/8 split of the rotary frequencies
        half = text.head_dim // 2
        text.mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return cfg.validate("tiny_config")


def count_params(model, trainable_only=False) -> int:
    """Number of parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


# -----------------------------------------------------------------------------------------------
# shared pieces


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------------------------
# vision tower


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over one (C, T, P, P) patch == a Linear on the flattened patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):  # (N, C*T*P*P) -> (N, D)
        w = self.proj.weight  # (D, C, T, P, P), checkpoint layout
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, segments):  # x (N, D), cos/sin (N, hd), segments: see VisionTower.segments
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_head, D // self.n_head).unbind(1)  # each (N, H, hd)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, N, hd)
        y = torch.empty_like(q)
        for idx in segments:  # idx (n, L): n segments of L patches, each attending only within itself
            y[:, idx] = F.scaled_dot_product_attention(q[:, idx], k[:, idx], v[:, idx])  # (H, n, L, hd)
        return self.proj(y.transpose(0, 1).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the 2x2 consecutive patches, 2-layer GELU MLP to the text width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.Linear(self.dim, cfg.out_hidden_size))

    def forward(self, x):  # (N, D) -> (N/4, out)
        return self.mlp(self.ln_q(x).view(-1, self.dim))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    def patch_positions(self, grid_thw):
        """(row, col) of each patch in the processor's block-major order -> (N, 2) long."""
        m = self.cfg.spatial_merge_size
        out = []
        for t, h, w in grid_thw.tolist():
            hh = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            # block-major: (block row, block col, row in block, col in block)
            hh, ww = hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()
            out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        return torch.cat(out)

    def window_order(self, grid_thw):
        """Order of the merged units window by window -> (window_index (M,), window_id (M,), frame_id (M,)),
        all indexed in the new order. M = number of merged units (= image tokens)."""
        cfg = self.cfg
        m = cfg.spatial_merge_size
        win = cfg.window_size // m // cfg.patch_size  # window side, in merged units
        index, window_id, frame_id = [], [], []
        offset, n_win, n_frame = 0, 0, 0
        for t, h, w in grid_thw.tolist():
            gh, gw = h // m, w // m
            units = torch.arange(t * gh * gw).view(t, gh, gw) + offset
            for f in range(t):
                for r in range(0, gh, win):
                    for c in range(0, gw, win):
                        idx = units[f, r:r + win, c:c + win].flatten()
                        index.append(idx)
                        window_id.append(torch.full_like(idx, n_win))
                        frame_id.append(torch.full_like(idx, n_frame))
                        n_win += 1
                n_frame += 1
            offset += t * gh * gw
        return torch.cat(index), torch.cat(window_id), torch.cat(frame_id)

    @staticmethod
    def segments(ids, device):
        """ids (N,): the window (or frame) of each patch, equal ids consecutive -> a list of index
        tensors (n, L), one per distinct segment length L: the n segments of that length, which
        attend within themselves in one batched call (no N x N mask over all patches)."""
        _, lengths = torch.unique_consecutive(ids, return_counts=True)
        starts = lengths.cumsum(0) - lengths
        return [(starts[lengths == L][:, None] + torch.arange(L)).to(device) for L in lengths.unique().tolist()]

    def rotary(self, pos, head_dim, device):  # pos (N, 2) -> cos, sin (N, head_dim) float32
        dim = head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        freqs = pos.to(device).float()[:, :, None] * inv_freq  # (N, 2, head_dim/4)
        emb = freqs.flatten(1)  # (N, head_dim/2): [rows | cols]
        emb = torch.cat([emb, emb], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):  # (N, C*T*P*P), (n_img, 3) -> (N/4, out_hidden)
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        device = pixel_values.device
        grid_thw = grid_thw.cpu()
        n_expected = int(grid_thw.prod(-1).sum())
        if (grid_thw[:, 1:] % cfg.spatial_merge_size).any():
            raise ValueError(f"image_grid_thw {grid_thw.tolist()}: h and w must be multiples of {cfg.spatial_merge_size}")
        if pixel_values.shape[0] != n_expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw says {n_expected}")
        x = self.patch_embed(pixel_values)  # (N, D)
        cos, sin = self.rotary(self.patch_positions(grid_thw), cfg.hidden_size // cfg.num_heads, device)
        # reorder patches window by window (the patches of a merged unit stay together)
        window_index, window_id, frame_id = self.window_order(grid_thw)
        perm = (window_index[:, None] * unit + torch.arange(unit)).flatten().to(device)  # (N,)
        x, cos, sin = x[perm], cos[perm], sin[perm]
        windows = self.segments(window_id.repeat_interleave(unit), device)  # attention within a window
        frames = self.segments(frame_id.repeat_interleave(unit), device)  # full attention: within an image
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, frames if i in cfg.fullatt_block_indexes else windows)
        x = self.merger(x)  # (M, out) in window order
        return x[torch.argsort(window_index.to(device))]  # back to the processor's order


# -----------------------------------------------------------------------------------------------
# text decoder


@functools.lru_cache(maxsize=16)
def mrope_inv_freq(head_dim, theta, mrope_section, device):
    """(3, head_dim/2) float32: the rotary frequencies, frequency j kept on the row of the axis
    (t, h, w) that rotates it (chunk i of mrope_section -> axis i % 3), 0 on the other two rows.
    Computed once per config and device (decode steps reuse it)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)]).to(device)  # (hd/2,)
    return inv_freq * (axis == torch.arange(3, device=device)[:, None])  # (3, hd/2)


def mrope_cos_sin(position_ids, cfg: TextConfig, dtype):
    """position_ids (3, B, T) -> cos, sin (B, T, head_dim): frequency chunk i of mrope_section is
    rotated by axis i % 3 (t, h, w)."""
    inv_freq = mrope_inv_freq(cfg.head_dim, cfg.rope_theta, tuple(cfg.mrope_section), position_ids.device)
    # the frequency of axis a at position p_a: sum over the 3 axes of p_a * inv_freq[a] (exact: 2 zero terms)
    freqs = (position_ids.float()[..., None] * inv_freq[:, None, None]).sum(0)  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def project(self, x, cos, sin):
        """x (B, T, C), cos/sin (B, T, hd) -> q (B, H, T, hd), k, v (B, Hkv, T, hd), q and k rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q (B, H, T, hd), k, v (B, Hkv, S, hd), mask (B|1, 1, T, S) bool or None (= causal, S == T)
        -> (B, T, C) after o_proj."""
        B, _, T, _ = q.shape
        if mask is not None and T > 1 and self.n_head != self.n_kv and q.device.type == "cuda":
            # a masked multi-token forward: expand the kv heads so CUDA can use its memory-efficient
            # kernel (its GQA support varies by version). Not on CPU: its flash kernel takes the kv
            # heads as they are (enable_gqa), and the copies cost 5-8% of a GRPO training pass here
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, responses=None):
        """x (B, T, C); cos, sin (B, T, hd); mask (B|1, 1, T, T) bool or None (causal).
        cache: None, or an object with k, v (L, B, Hkv, >= T, hd): this layer's keys/values are
        written at [0, T) (the sampler's prefill).
        responses: None, or (xr, cos_r, sin_r, mask_r) of Qwen2_5_VL.forward_shared_prefix: the
        P*G response rows (G per prompt row of x, prompt-major), xr (P*G, R, C), mask_r
        (P*G, 1, R, T + R) over [the prompt's keys | their own]; then returns (x, xr).
        Both streams go through ONE call per layer, so FSDP2 all-gathers (and activation
        checkpointing recomputes) each layer once for prompts and responses together."""
        a = self.self_attn
        q, k, v = a.project(self.input_layernorm(x), cos, sin)
        if cache is not None:
            T = x.shape[1]
            cache.k[self.layer_idx, :, :, :T] = k
            cache.v[self.layer_idx, :, :, :T] = v
        x = x + a.attend(q, k, v, mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if responses is None:
            return x
        xr, cos_r, sin_r, mask_r = responses
        qr, kr, vr = a.project(self.input_layernorm(xr), cos_r, sin_r)  # (P*G, H|Hkv, R, hd)
        G = xr.shape[0] // x.shape[0]
        xr = xr + a.attend(qr, after_prompt(k, kr, G), after_prompt(v, vr, G), mask_r)
        xr = xr + self.mlp(self.post_attention_layernorm(xr))
        return x, xr


def after_prompt(kp, kr, G):
    """The keys (or values) a response attends to: its prompt's, then its own.
    kp (P, Hkv, T, hd), kr (P*G, Hkv, R, hd) prompt-major -> (P*G, Hkv, T + R, hd).
    The prompt's are expand()ed to its G rows (a view, no copy), so autograd sums the G rows'
    gradients into the one prompt forward; torch.cat then writes them once into the result."""
    P = kp.shape[0]
    return torch.cat([kp[:, None].expand(P, G, *kp.shape[1:]), kr.unflatten(0, (P, G))], dim=3).flatten(0, 1)


class KVCache:
    """Static KV cache filled by a prefill forward: k, v (num_layers, B, n_kv_heads, max_len, head_dim)
    in the model's dtype (bf16 on GPU: half the memory of fp32, and what the decode step computes in)."""

    def __init__(self, config: ModelConfig, batch_size, max_len, device, dtype):
        t = config.text
        shape = (t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


# -----------------------------------------------------------------------------------------------
# the model


class Qwen2_5_VL(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.visual = VisionTower(config.vision)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(t, i) for i in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self):
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(mod):  # as transformers: normal(0, 0.02), zero biases, unit norms
        if isinstance(mod, (nn.Linear, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, RMSNorm):
            nn.init.ones_(mod.weight)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def get_rope_index(self, input_ids, image_grid_thw=None, attention_mask=None):
        """M-RoPE ids -> (position_ids (3, B, T), rope_deltas (B, 1)).
        Per row, over the non-padded tokens: text advances by 1 on all axes; an image's tokens get
        (t, h, w) = start + grid coordinates of their merged patch, and the text after it starts at
        start + max(gh, gw). Padded tokens get 0. rope_deltas = max position + 1 - T."""
        cfg = self.config
        m = cfg.vision.spatial_merge_size
        B, T = input_ids.shape
        position_ids = torch.zeros(3, B, T, dtype=torch.long)
        deltas = torch.zeros(B, 1, dtype=torch.long)
        grids = [] if image_grid_thw is None else image_grid_thw.tolist()
        ids_cpu = input_ids.cpu()
        keep_all = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        g = 0  # next image grid
        for b in range(B):
            ids = ids_cpu[b][keep_all[b]]
            is_img = ids == cfg.image_token_id
            # runs of equal is_img: boundaries where the value changes
            change = (is_img[1:] != is_img[:-1]).nonzero().flatten() + 1
            bounds = [0] + change.tolist() + [len(ids)]
            pos, cur = [], 0
            for s, e in zip(bounds[:-1], bounds[1:]):
                if s == e:  # a fully padded row
                    continue
                if not is_img[s]:
                    pos.append(torch.arange(cur, cur + e - s).expand(3, -1))
                    cur += e - s
                    continue
                while s < e:  # one run may hold several images back to back
                    if g >= len(grids):
                        raise ValueError(f"row {b}: more image tokens than images in image_grid_thw ({len(grids)})")
                    t, h, w = grids[g]
                    gh, gw = h // m, w // m
                    n = t * gh * gw
                    if s + n > e:
                        raise ValueError(f"row {b}: image {g} needs {n} image tokens, found {e - s}")
                    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                    pos.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
                    cur += max(gh, gw)
                    g, s = g + 1, s + n
            row = torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.long)
            position_ids[:, b, keep_all[b]] = row
            deltas[b, 0] = (row.max() + 1 if row.numel() else 0) - T
        if g != len(grids):
            raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold image tokens for {g}")
        return position_ids.to(input_ids.device), deltas.to(input_ids.device)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """input_ids (B, T) -> (B, T, C): token embeddings, the images' written at the image tokens."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is None:
            return x
        is_img = input_ids == self.config.image_token_id  # (B, T)
        n, n_img = int(is_img.sum()), int(image_grid_thw.prod(-1).sum()) // self.config.vision.spatial_merge_size**2
        if n != n_img:
            raise ValueError(f"input_ids hold {n} image tokens (id {self.config.image_token_id}) "
                             f"but the images give {n_img} (image_grid_thw {image_grid_thw.tolist()})")
        img = self.visual(pixel_values, image_grid_thw).to(x.dtype)  # (n_img, C)
        return x.masked_scatter(is_img[..., None], img)

    @staticmethod
    def padding_mask(attention_mask):
        """attention_mask (B, T) 1 = real token -> (B, 1, T, T) bool: causal, and no attention to
        padded keys (a padded query still sees itself, so its row stays finite)."""
        T = attention_mask.shape[1]
        i = torch.arange(T, device=attention_mask.device)
        causal = i[None, :] <= i[:, None]  # (T, T): key <= query
        return (causal & attention_mask[:, None, None, :].bool()) | (i[None, :] == i[:, None])

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, position_ids=None,
                cache=None, logits_to_keep=0, response_ids=None, response_mask=None, prefix_len=0):
        """input_ids (B, T) (left-padded when attention_mask has zeros) -> logits (B, T, V), or of the
        last logits_to_keep positions. cache: see DecoderLayer.forward (the sampler's prefill).
        response_ids / response_mask: see forward_shared_prefix, which passes them here so that
        the call goes through nn.Module.__call__ (FSDP2's root hooks gather embed / lm_head).
        prefix_len > 0: the rows share their first prefix_len tokens, encoded once (see
        common_prefix_len: the same logits, less compute)."""
        if response_ids is not None:
            return self._shared_prefix(input_ids, attention_mask, pixel_values, image_grid_thw, response_ids,
                                       response_mask)
        if prefix_len > 0:
            return self._common_prefix(input_ids, pixel_values, image_grid_thw, attention_mask, prefix_len)
        x = self.embed(input_ids, pixel_values, image_grid_thw)  # (B, T, C)
        if position_ids is None:
            position_ids, _ = self.get_rope_index(input_ids, image_grid_thw, attention_mask)  # (3, B, T)
        cos, sin = mrope_cos_sin(position_ids, self.config.text, x.dtype)  # (B, T, hd)
        mask = None if attention_mask is None else self.padding_mask(attention_mask)  # None: plain causal
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)  # (B, T or k, vocab)

    def forward_shared_prefix(self, prompt_ids, prompt_mask, pixel_values, image_grid_thw, response_ids,
                              response_mask):
        """Logits of G responses per prompt, each prompt (and its images) encoded ONCE.

        prompt_ids, prompt_mask (P, Tp): left-padded prompts, 1 = real token;
        pixel_values, image_grid_thw: the images of the P prompts, in order (or None);
        response_ids, response_mask (P*G, R): right-padded responses, prompt-major (row p*G + j is
        response j of prompt p), 1 = real token
        -> logits (P*G, R, V): logits[:, t] predicts response token t (t = 0 from the last prompt
        position), equal to the forward over [prompt | response] concatenated.

        A GRPO group's G samples share their prompt (system prompt + image tokens: ~200 of ~270
        tokens on the built-in task), so the unshared forward spends most of its compute
        re-encoding the same prompt G times. Here the decoder runs on the P prompts and the P*G
        responses side by side, layer by layer; a response attends to its prompt's keys/values
        (expanded, not recomputed, so their gradients sum into the one prompt forward) and then
        causally to its own. Response positions continue the prompt's M-RoPE positions exactly as
        in the concatenated sequence: Tp + t + rope_deltas on all three axes."""
        return self(prompt_ids, pixel_values, image_grid_thw, attention_mask=prompt_mask,
                    response_ids=response_ids, response_mask=response_mask)

    def _shared_prefix(self, prompt_ids, prompt_mask, pixel_values, image_grid_thw, response_ids, response_mask):
        P, Tp = prompt_ids.shape
        N, R = response_ids.shape
        if N % P or response_mask is None or response_mask.shape != response_ids.shape:
            raise ValueError(f"forward_shared_prefix: response_ids {tuple(response_ids.shape)} must be (P*G, R) for "
                             f"P = {P} prompts, with a response_mask of the same shape")
        G = N // P
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        # the prompts: as forward()
        x = self.embed(prompt_ids, pixel_values, image_grid_thw)  # (P, Tp, C)
        pos, deltas = self.get_rope_index(prompt_ids, image_grid_thw, prompt_mask)  # (3, P, Tp), (P, 1)
        cos, sin = mrope_cos_sin(pos, self.config.text, x.dtype)  # (P, Tp, hd)
        mask = self.padding_mask(prompt_mask)  # (P, 1, Tp, Tp)
        # the responses (text): sequence index Tp + t -> position Tp + t + rope_deltas, all 3 axes
        xr = self.embed_tokens(response_ids)  # (N, R, C)
        t = torch.arange(R, device=xr.device)
        pos_r = Tp + t[None] + deltas.to(xr.device).repeat_interleave(G, dim=0)  # (N, R)
        cos_r, sin_r = mrope_cos_sin(pos_r[None].expand(3, N, R), self.config.text, xr.dtype)  # (N, R, hd)
        # response query t sees its prompt's real tokens and its own tokens <= t (no padded ones)
        see_prompt = prompt_mask.bool().repeat_interleave(G, dim=0)[:, None, None, :].expand(N, 1, R, Tp)
        see_own = (t[None, :] <= t[:, None]) & response_mask.bool()[:, None, None, :]  # (N, 1, R, R)
        mask_r = torch.cat([see_prompt, see_own], dim=-1)  # (N, 1, R, Tp + R)
        for layer in self.layers:
            x, xr = layer(x, cos, sin, mask, responses=(xr, cos_r, sin_r, mask_r))
        # position t predicts token t + 1: response token 0 comes from the prompt's last position
        # (one per prompt, expanded to its G rows), token t from response position t - 1
        last = x[:, -1:].expand(P, G, x.shape[-1]).reshape(N, 1, -1)  # (N, 1, C)
        h = torch.cat([last, xr[:, :-1]], dim=1)  # (N, R, C)
        return self.lm_head(self.norm(h))  # (N, R, V)


    def common_prefix_len(self, input_ids, attention_mask=None) -> int:
        """How many leading tokens every row of a RIGHT-padded batch shares, for forward(prefix_len=):
        the same real text tokens (an image's tokens are equal ids but different pixels, so the
        prefix ends before the first vision/image token), and at least one own token left per row.
        SFT batches share their system prompt: 83 of ~174 tokens per row of the built-in base data."""
        B, T = input_ids.shape
        if B < 2:
            return 0
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        same = (input_ids == input_ids[:1]).all(0) & real.all(0)  # (T,)
        for tid in (self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id):
            if tid is not None:
                same &= ~(input_ids == tid).any(0)
        L = int(same.long().cumprod(0).sum())
        return max(0, min(L, int(real.sum(1).min()) - 1))

    def _common_prefix(self, input_ids, pixel_values, image_grid_thw, attention_mask, L):
        """forward() of a right-padded batch whose rows share their first L (text) tokens: the prefix
        goes through the decoder once (batch 1), the B rows' remaining tokens attend to its keys and
        values (expanded, so autograd sums their gradients into the one prefix forward) and then
        causally to their own. The same DecoderLayer two-stream call as forward_shared_prefix."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids, pixel_values, image_grid_thw)  # (B, T, C)
        pos, _ = self.get_rope_index(input_ids, image_grid_thw, attention_mask)  # (3, B, T)
        cos, sin = mrope_cos_sin(pos, self.config.text, x.dtype)  # (B, T, hd)
        R = T - L
        t = torch.arange(R, device=x.device)
        # own query t sees the whole prefix, its row's real tokens <= t, and itself (as padding_mask)
        see_own = ((t[None, :] <= t[:, None]) & attention_mask[:, L:].bool()[:, None, None, :]) | (t[None, :] == t[:, None])
        mask_r = torch.cat([see_own.new_ones(B, 1, R, L), see_own], dim=-1)  # (B, 1, R, L + R)
        xp, xr = x[:1, :L], x[:, L:]  # (1, L, C), (B, R, C)
        for layer in self.layers:
            xp, xr = layer(xp, cos[:1, :L], sin[:1, :L], None, responses=(xr, cos[:, L:], sin[:, L:], mask_r))
        logits_p = self.lm_head(self.norm(xp))  # (1, L, V)
        return torch.cat([logits_p.expand(B, -1, -1), self.lm_head(self.norm(xr))], dim=1)  # (B, T, V)


# -----------------------------------------------------------------------------------------------
# checkpoints: Hugging Face directories (the file handling is support/hf_checkpoint.py)


def read_config(path) -> ModelConfig:
    d, file = hf_checkpoint.read_config_json(path)
    return ModelConfig.from_hf(d, where=file)


def from_pretrained(path, device="cpu", dtype=torch.float32) -> Qwen2_5_VL:
    """Build on the meta device, then load every tensor straight to device/dtype."""
    with torch.device("meta"):
        model = Qwen2_5_VL(read_config(path))
    hf_checkpoint.load_weights(model, path, device, dtype)
    model.tie_weights()
    return model.eval()


def save_pretrained(model, path, tokenizer_dir=None, state_dict=None):
    """Atomic: an HF directory (config.json, model.safetensors, tokenizer files) at path."""
    return hf_checkpoint.save_pretrained(model, path, tokenizer_dir, state_dict)
