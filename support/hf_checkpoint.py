"""
Qwen2.5-VL checkpoints in the Hugging Face layout: the files, not the architecture (model.py).

config.json is read here and parsed by model.ModelConfig.from_hf (transformers-5 nested layout or
the older flat hub layout). Weights come from model.safetensors or a sharded index, in either key
layout (hub: model.layers.*, visual.*; transformers-5: model.language_model.*, model.visual.*),
each tensor loaded straight to the target device and dtype into a model built on the meta device.
save_pretrained writes atomically what transformers' own save_pretrained writes (transformers-5
nested config.json, hub key layout), loadable by transformers.Qwen2_5_VLForConditionalGeneration.
preprocessor_config.json carries the image processor's pixel budget (image_config /
write_image_config).
"""
import json
import os
import shutil

from support import data


# -----------------------------------------------------------------------------------------------
# config.json and the weights


def _key_to_ours(key):
    """checkpoint key (either layout) -> our state_dict key, or None if it is not one of ours."""
    for prefix, new in (("model.language_model.", ""), ("model.visual.", "visual."), ("model.", ""),
                        ("visual.", "visual."), ("lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return new + key[len(prefix):]
    return None


def _key_to_hf(key):
    """our state_dict key -> checkpoint key, in the hub layout that transformers (4.x and 5.x)
    itself writes: model.embed_tokens / model.layers.* / model.norm, visual.*, lm_head."""
    if key.startswith(("visual.", "lm_head.")):
        return key
    return "model." + key


def read_config_json(path) -> tuple[dict, str]:
    """checkpoint directory -> (its config.json as a dict, the file's path); model.read_config
    turns it into a ModelConfig."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (is {path} a Qwen2.5-VL checkpoint directory?)")
    with open(file) as f:
        try:
            return json.load(f), file
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: line {e.lineno}: invalid JSON: {e.msg}") from None


def checkpoint_files(path):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        return [os.path.join(path, fn) for fn in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def _read_tensors(file, expected, tied, device, dtype):
    """One safetensors file -> {our key: tensor on device, dtype}, checked against `expected` shapes."""
    from safetensors import safe_open

    sd = {}
    with safe_open(file, framework="pt", device=str(device)) as f:
        for key in f.keys():
            ours = _key_to_ours(key)
            if ours == "lm_head.weight" and tied:
                continue  # tied to embed_tokens; some checkpoints store a copy
            if ours not in expected:
                raise ValueError(f"{file}: unexpected tensor {key!r} (not part of Qwen2.5-VL with this config.json)")
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(expected[ours]):
                raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(expected[ours])} from config.json")
            sd[ours] = t.to(dtype)
    return sd


def load_weights(model, path, device, dtype):
    """Every tensor of checkpoint directory `path` straight into `model` (built on the meta device)
    at device/dtype, checked against the model's state_dict shapes; a tied lm_head is skipped."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.text.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    sd = {}
    for file in checkpoint_files(path):
        try:
            sd.update(_read_tensors(file, expected, tied, device, dtype))
        except (ValueError, OSError):  # ours (they name the file), a missing shard (names it too)
            raise
        except Exception as e:  # safetensors' own errors (a truncated or corrupt file) do not name the file
            raise ValueError(f"{file}: cannot read the tensors ({type(e).__name__}: {e}); "
                             f"the file is truncated or corrupt (an interrupted copy or download?)") from e
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first: {_key_to_hf(missing[0])!r} "
                         f"(all: {[_key_to_hf(k) for k in missing[:10]]})")
    model.load_state_dict(sd, strict=False, assign=True)


def save_pretrained(model, path, tokenizer_dir=None, state_dict=None):
    """Atomic: write everything to path + '.tmp', then rename into place. config.json in the
    transformers-5 layout, tensors under the hub keys (as transformers 5 itself saves them).
    state_dict: a full (gathered) state dict with our keys, e.g. from FSDP on rank 0."""
    path = os.path.abspath(path.rstrip("/"))
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_pretrained(model, tmp, tokenizer_dir, state_dict)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path


def write_pretrained(model, directory, tokenizer_dir=None, state_dict=None):
    """The HF files (model.safetensors, config.json, tokenizer) into an existing directory, not
    atomically: save_pretrained, or a caller with its own atomic directory (checkpoint.save)."""
    from safetensors.torch import save_file

    config = model.config
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for k, v in sd.items():
        if k == "lm_head.weight" and config.text.tie_word_embeddings:
            continue
        tensors[_key_to_hf(k)] = v.detach().to("cpu").contiguous()
    dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(dtype), f, indent=2, allow_nan=False)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                     PREPROCESSOR_CONFIG):
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))


# -----------------------------------------------------------------------------------------------
# the image processor's settings: preprocessor_config.json

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def image_config(path, max_pixels: int = 0, flag: str = "--max_pixels"):
    """data.ImageConfig for checkpoint directory `path`: min/max pixels (and patch sizes) from its
    preprocessor_config.json when it has one -- Qwen2.5-VL-7B-Instruct ships its own budget,
    max_pixels = 12845056 (28 x 28 x 16384), not transformers' 28 x 28 x 1280 default that applies
    otherwise. max_pixels > 0 overrides the file (the --max_pixels flag of grpo / sft / eval).
    Both the old top-level min_pixels / max_pixels keys and transformers 5's size.shortest_edge /
    longest_edge are read; top-level wins, as in transformers' Qwen2VLImageProcessor."""
    cfg = data.ImageConfig()
    file = os.path.join(path, PREPROCESSOR_CONFIG)
    if os.path.isfile(file):
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: line {e.lineno}: invalid JSON: {e.msg}") from None
        size = d.get("size") or {}
        cfg.min_pixels = int(d.get("min_pixels") or size.get("shortest_edge") or cfg.min_pixels)
        cfg.max_pixels = int(d.get("max_pixels") or size.get("longest_edge") or cfg.max_pixels)
        for k in ("patch_size", "merge_size", "temporal_patch_size"):
            setattr(cfg, k, int(d.get(k, getattr(cfg, k))))
        # data.preprocess_image normalises with the CLIP mean / std: a file asking for others
        # would be silently ignored, so refuse it
        for k, want in (("image_mean", data.IMAGE_MEAN), ("image_std", data.IMAGE_STD)):
            if k in d and (len(d[k]) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(d[k], want))):
                raise ValueError(f"{file}: {k} {d[k]} is not the CLIP {list(want)} that data.py normalises with")
    if max_pixels:
        cfg.max_pixels = int(max_pixels)
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        where = flag if max_pixels else file
        raise ValueError(f"{where}: max_pixels {cfg.max_pixels} must be >= min_pixels {cfg.min_pixels} "
                         f"(one image needs at least {cfg.min_pixels} pixels after resizing)")
    return cfg


def write_image_config(directory, cfg):
    """preprocessor_config.json for data.ImageConfig `cfg`, in the layout of Qwen2.5-VL-7B-Instruct's
    (plus transformers 5's `size`), so that transformers' Qwen2VLImageProcessor resizes and cuts
    images exactly as data.preprocess_image does (same pixel budget, same grid_thw)."""
    d = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
         "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
         "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
         "patch_size": cfg.patch_size, "merge_size": cfg.merge_size, "temporal_patch_size": cfg.temporal_patch_size,
         "image_mean": list(data.IMAGE_MEAN), "image_std": list(data.IMAGE_STD), "do_resize": True,
         "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}
    with open(os.path.join(directory, PREPROCESSOR_CONFIG), "w") as f:
        json.dump(d, f, indent=2, allow_nan=False)
