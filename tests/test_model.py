"""model.py against transformers' Qwen2_5_VLForConditionalGeneration (the oracle) on random tiny
configs: logits, M-RoPE position ids, KV-cache decoding, checkpoint I/O in both directions and
both key layouts, and the error messages for broken checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import model as M
from support import hf_checkpoint

VOCAB = 256
IMG, VS, VE = 250, 251, 252  # image / vision start / vision end ids, inside the tiny vocab
TOL = 1e-4


def hf_config_dict(tie=True):
    """A transformers-5 config.json written by hand (not by our to_hf): window 112 -> 4x4 merged units."""
    return {
        "model_type": "qwen2_5_vl",
        "image_token_id": IMG, "video_token_id": 253, "vision_start_token_id": VS, "vision_end_token_id": VE,
        "tie_word_embeddings": tie,
        "text_config": {
            "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "bos_token_id": None,
            "eos_token_id": 254, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
            "window_size": 112, "fullatt_block_indexes": [1], "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def make_hf(tie=True, seed=0):
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config_dict(tie))).eval()
    with torch.no_grad():  # perturb everything (biases start at 0, norms at 1)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its save_pretrained dir, our model loaded from that dir)."""
    hf = make_hf(tie=True)
    path = str(tmp_path_factory.mktemp("hf_tied"))
    hf.save_pretrained(path)
    return hf, path, M.from_pretrained(path)


def seq_with_images(grids, gen, text=(3, 4, 2)):
    """text, <vs> image tokens <ve>, text, ... (one image per grid); ids of plain text are < 240."""
    ids = torch.randint(0, 240, (text[0],), generator=gen).tolist()
    for i, (t, h, w) in enumerate(grids):
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE]
        ids += torch.randint(0, 240, (text[1 + i % (len(text) - 1)],), generator=gen).tolist()
    return ids


def pixels(grids, gen):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=gen), torch.tensor(grids)


def left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_logits(hf, ids, pv=None, grid=None, mask=None):
    # transformers computes M-RoPE only when told which tokens are image tokens
    mm = (ids == IMG).int()
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask,
                  mm_token_type_ids=mm).logits


def test_text_only_matches_transformers(pair):
    hf, _, ours = pair
    ids = torch.randint(0, 240, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < TOL


def test_one_image_matches_transformers(pair):
    hf, _, ours = pair
    gen = torch.Generator().manual_seed(2)
    grids = [[1, 12, 20]]  # 6x10 merged units -> 2x3 windows of 4x4 units, some partial
    ids = torch.tensor([seq_with_images(grids, gen)])
    pv, grid = pixels(grids, gen)
    with torch.no_grad():
        diff = (ours(ids, pv, grid) - hf_logits(hf, ids, pv, grid)).abs().max().item()
    assert diff < TOL
    # the image must matter (the test would be vacuous otherwise)
    with torch.no_grad():
        assert (ours(ids, pv + 1.0, grid) - ours(ids, pv, grid)).abs().max() > 1e-3


def test_several_images_of_different_sizes_match_transformers(pair):
    hf, _, ours = pair
    gen = torch.Generator().manual_seed(3)
    grids = [[1, 12, 20], [1, 4, 6], [1, 18, 10]]
    ids = torch.tensor([seq_with_images(grids, gen)])
    pv, grid = pixels(grids, gen)
    with torch.no_grad():
        diff = (ours(ids, pv, grid) - hf_logits(hf, ids, pv, grid)).abs().max().item()
    assert diff < TOL


def test_left_padded_batch_matches_transformers(pair):
    hf, _, ours = pair
    gen = torch.Generator().manual_seed(4)
    g0, g2 = [[1, 12, 20]], [[1, 4, 6], [1, 10, 8]]
    rows = [seq_with_images(g0, gen), torch.randint(0, 240, (9,), generator=gen).tolist(),
            seq_with_images(g2, gen, text=(1, 2))]
    ids, mask = left_pad(rows)
    pv0, _ = pixels(g0, gen)
    pv2, _ = pixels(g2, gen)
    pv, grid = torch.cat([pv0, pv2]), torch.tensor(g0 + g2)
    with torch.no_grad():
        a = hf_logits(hf, ids, pv, grid, mask)
        b = ours(ids, pv, grid, attention_mask=mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() < TOL
    assert torch.isfinite(b).all()  # padded queries stay finite (no NaN leaking into losses)
    # position ids equal transformers' on the real tokens
    pos, deltas = ours.get_rope_index(ids, grid, mask)
    hf_pos, _ = hf.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grid, attention_mask=mask)
    assert torch.equal(pos[:, real], hf_pos[:, real])
    # our rope_deltas continue each row at max + 1 after the padded length T
    T = ids.shape[1]
    for b_ in range(3):
        assert T + deltas[b_, 0] == pos[:, b_].max() + 1


def test_our_checkpoint_loads_in_transformers(tmp_path):
    cfg = M.tiny_config(vocab_size=VOCAB, image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE,
                        eos_token_id=254, tie_word_embeddings=False, num_hidden_layers=2, vision_depth=2)
    torch.manual_seed(6)
    ours = M.Qwen2_5_VL(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "ours")
    M.save_pretrained(ours, path)
    M.save_pretrained(ours, path)  # overwriting an existing checkpoint works, nothing left behind
    assert sorted(os.listdir(tmp_path)) == ["ours"] and sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    assert not hf.config.tie_word_embeddings
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    hf.save_pretrained(str(tmp_path / "hf"))  # same tensor names as transformers' own save
    assert sorted(load_file(str(tmp_path / "hf" / "model.safetensors"))) == sorted(load_file(path + "/model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    grids = [[1, 10, 12], [1, 6, 4]]
    ids = torch.tensor([seq_with_images(grids, gen)])
    pv, grid = pixels(grids, gen)
    with torch.no_grad():
        assert (ours(ids, pv, grid) - hf_logits(hf, ids, pv, grid)).abs().max() < TOL
    # and back: our loader reads our own save
    again = M.from_pretrained(path)
    assert again.config == cfg
    with torch.no_grad():
        assert torch.equal(again(ids, pv, grid), ours(ids, pv, grid))


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_both_key_layouts_sharded_untied(tmp_path, layout):
    """hub: flat config.json (rope_scaling.mrope_section), keys model.layers.* / visual.*;
    transformers5: nested config.json, keys model.language_model.* / model.visual.*.
    Both sharded with model.safetensors.index.json."""
    hf = make_hf(tie=False, seed=8)
    d = hf_config_dict(tie=False)
    if layout == "hub":
        flat = {k: v for k, v in d.items() if k != "text_config"}
        text = dict(d["text_config"])
        rope = text.pop("rope_parameters")
        flat.update(text)
        flat.update({"rope_theta": rope["rope_theta"], "hidden_act": "silu", "use_sliding_window": False,
                     "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}})
        flat["vision_config"] = dict(flat["vision_config"], in_chans=3)
        d = flat
    (tmp_path / "config.json").write_text(json.dumps(d))
    sd = {}
    for k, v in hf.state_dict().items():  # in memory transformers 5 uses its own (nested) names
        assert k.startswith(("model.language_model.", "model.visual.", "lm_head."))
        if layout == "hub":
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        sd[k] = v.contiguous()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fn, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fn))
    index = {"weight_map": {k: fn for fn, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = M.from_pretrained(str(tmp_path))
    assert not ours.config.text.tie_word_embeddings and ours.config.text.mrope_section == [2, 3, 3]
    assert all(p.device.type == "cpu" for p in ours.parameters())
    gen = torch.Generator().manual_seed(9)
    ids = torch.tensor([seq_with_images([[1, 8, 8]], gen)])
    pv, grid = pixels([[1, 8, 8]], gen)
    with torch.no_grad():
        assert (ours(ids, pv, grid) - hf_logits(hf, ids, pv, grid)).abs().max() < TOL


def test_config_from_published_7b_flat_layout():
    """The Qwen/Qwen2.5-VL-7B-Instruct config.json layout; transformers parses it as the oracle."""
    flat = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
        "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
    }
    cfg = M.ModelConfig.from_hf(flat)
    hc = Qwen2_5_VLConfig(**flat)
    t, v = cfg.text, cfg.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.rms_norm_eps, t.rope_theta, t.mrope_section, t.tie_word_embeddings) == (
        hc.text_config.vocab_size, hc.text_config.hidden_size, hc.text_config.intermediate_size,
        hc.text_config.num_hidden_layers, hc.text_config.num_attention_heads, hc.text_config.num_key_value_heads,
        hc.text_config.rms_norm_eps, hc.text_config.rope_parameters["rope_theta"],
        hc.text_config.rope_parameters["mrope_section"], hc.tie_word_embeddings)
    hv = hc.vision_config
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.window_size,
            list(v.fullatt_block_indexes), v.in_channels) == (
        hv.depth, hv.hidden_size, hv.intermediate_size, hv.num_heads, hv.out_hidden_size, hv.window_size,
        list(hv.fullatt_block_indexes), hv.in_channels)
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.eos_token_id) == (
        151655, 151652, 151653, 151645)
    # our nested output parses back to the same config, and transformers reads the same numbers
    assert M.ModelConfig.from_hf(cfg.to_hf()) == cfg
    h2 = Qwen2_5_VLConfig(**cfg.to_hf())
    assert h2.text_config.rope_parameters["mrope_section"] == [16, 24, 24] and h2.vision_config.depth == 32
    with torch.device("meta"):
        n = M.count_params(M.Qwen2_5_VL(cfg))
    assert 8.0e9 < n < 8.5e9  # Qwen2.5-VL-7B has 8.29B parameters


def test_tiny_config_and_param_count(pair):
    hf, _, ours = pair
    n_hf = sum(p.numel() for p in hf.parameters())  # transformers' parameters() skips the tied copy
    assert M.count_params(ours) == n_hf
    tiny = M.Qwen2_5_VL(M.tiny_config())
    assert 1e6 < M.count_params(tiny) < 10e6
    assert tiny.lm_head.weight is tiny.embed_tokens.weight
    assert isinstance(tiny.layers, torch.nn.ModuleList) and isinstance(tiny.visual.blocks, torch.nn.ModuleList)
    wide = M.tiny_config(hidden_size=96, vision_depth=1)  # mrope_section follows the head dim
    assert sum(wide.text.mrope_section) == 12 and wide.vision.out_hidden_size == 96
    with pytest.raises(ValueError, match="unknown field 'hidden'"):
        M.tiny_config(hidden=3)


def _copy_ckpt(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    if edit_tensors:
        edit_tensors(sd)
    if edit_config:
        edit_config(cfg)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_broken_checkpoints_fail_with_clear_errors(pair, tmp_path):
    _, src, _ = pair
    key = "model.layers.1.self_attn.k_proj.weight"  # transformers saves the hub key layout
    bad = _copy_ckpt(src, str(tmp_path / "missing"), edit_tensors=lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"missing.*{key}"):
        M.from_pretrained(bad)
    vkey = "visual.blocks.0.attn.qkv.bias"
    bad = _copy_ckpt(src, str(tmp_path / "shape"), edit_tensors=lambda sd: sd.__setitem__(vkey, sd[vkey][:-1].clone()))
    with pytest.raises(ValueError, match=f"{vkey}.*shape"):
        M.from_pretrained(bad)
    bad = _copy_ckpt(src, str(tmp_path / "extra"),
                     edit_tensors=lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected.*layers\.9\.mlp\.up_proj"):
        M.from_pretrained(bad)
    bad = _copy_ckpt(src, str(tmp_path / "qwen2vl"), edit_config=lambda c: c.__setitem__("model_type", "qwen2_vl"))
    with pytest.raises(ValueError, match="config.json.*model_type.*qwen2_vl"):
        M.from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.from_pretrained(str(tmp_path))
    # a truncated model.safetensors (an interrupted copy): the error names the file
    bad = _copy_ckpt(src, str(tmp_path / "truncated"))
    file = os.path.join(bad, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match=f"{file}: cannot read the tensors.*truncated or corrupt"):
        M.from_pretrained(bad)


def test_backward_gradient_checkpointing_and_bf16_load(pair):
    """Activation checkpointing as grpo.py applies it (torch.distributed._composable.checkpoint on
    each decoder layer, the model's code unchanged) gives the gradients of the plain backward."""
    from torch.distributed._composable import checkpoint as recompute_in_backward
    _, path, ours = pair
    gen = torch.Generator().manual_seed(10)
    grids = [[1, 8, 12]]
    ids, mask = left_pad([seq_with_images(grids, gen), torch.randint(0, 240, (7,), generator=gen).tolist()])
    pv, grid = pixels(grids, gen)
    grads = []
    for ckpt in (False, True):
        m = M.from_pretrained(path).train()
        if ckpt:
            for layer in m.layers:
                recompute_in_backward(layer)
        logits = m(ids, pv, grid, attention_mask=mask)
        (logits.float().logsumexp(-1) * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0]["visual.blocks.0.attn.qkv.weight"].abs().sum() > 0  # the vision tower is trained too
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n
    # dtype: weights land in bf16, logits close to fp32
    b16 = M.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
    with torch.no_grad():
        lb = b16(ids, pv, grid, attention_mask=mask)
        lf = ours(ids, pv, grid, attention_mask=mask)
    assert lb.dtype == torch.bfloat16
    assert (lb.float() - lf)[mask.bool()].abs().max() < 0.1


def test_mismatched_images_and_tokens_fail_clearly(pair):
    _, _, ours = pair
    gen = torch.Generator().manual_seed(11)
    ids = torch.tensor([seq_with_images([[1, 4, 6]], gen)])
    pv, _ = pixels([[1, 4, 6]], gen)
    with pytest.raises(ValueError, match=r"input_ids hold 6 image tokens \(id 250\) but the images give 12"):
        ours(ids, torch.cat([pv, pv]), torch.tensor([[1, 4, 12]]))
    with pytest.raises(ValueError, match="image 0 needs 12 image tokens, found 6"):
        ours.get_rope_index(ids, torch.tensor([[1, 4, 12]]))
    with pytest.raises(ValueError, match="pixel_values has 48 patches, image_grid_thw says 24"):
        ours(ids, torch.cat([pv, pv]), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="more image tokens than images"):
        ours(ids)


# ----------------------------------------------------------------------------- shared-prefix forward

def shared_prefix_case(seed, P=3, G=4, R=9):
    """P (2 or 3) left-padded prompts (two with images, one text only) and G right-padded responses each,
    of ragged lengths 1..R (one of full length). Returns the inputs of forward_shared_prefix and
    the per-row inputs of the unshared forward over [prompt | response] (images repeated per row)."""
    gen = torch.Generator().manual_seed(seed)
    g0, g2 = [[1, 8, 8]], [[1, 4, 6], [1, 4, 4]]
    rows = [seq_with_images(g0, gen), torch.randint(0, 240, (9,), generator=gen).tolist(),
            seq_with_images(g2, gen, text=(1, 2))][:P]
    pids, pmask = left_pad(rows)
    pv0, _ = pixels(g0, gen)
    pv2, _ = pixels(g2, gen)
    pv, grid = (torch.cat([pv0, pv2]), torch.tensor(g0 + g2)) if P == 3 else (pv0, torch.tensor(g0))
    lengths = torch.randint(1, R + 1, (P * G,), generator=gen)
    lengths[1] = R
    rmask = (torch.arange(R)[None] < lengths[:, None]).long()  # (P*G, R)
    rids = torch.randint(0, 240, (P * G, R), generator=gen) * rmask  # pad id 0 after the length
    shared = dict(prompt_ids=pids, prompt_mask=pmask, pixel_values=pv, image_grid_thw=grid,
                  response_ids=rids, response_mask=rmask)
    per_prompt = [(pv0, torch.tensor(g0)), (None, None), (pv2, torch.tensor(g2))]  # each prompt's images
    pv_rows = [per_prompt[p][0] for p in range(P) for _ in range(G) if per_prompt[p][0] is not None]
    grid_rows = [per_prompt[p][1] for p in range(P) for _ in range(G) if per_prompt[p][1] is not None]
    unshared = dict(input_ids=torch.cat([pids.repeat_interleave(G, 0), rids], 1),
                    attention_mask=torch.cat([pmask.repeat_interleave(G, 0), rmask], 1),
                    pixel_values=torch.cat(pv_rows), image_grid_thw=torch.cat(grid_rows))
    return shared, unshared


def response_logprobs(logits, rids, rmask):
    return torch.log_softmax(logits.float(), -1).gather(-1, rids[..., None])[..., 0] * rmask  # (N, R)


def unshared_logprobs(net, shared, unshared):
    R = shared["response_ids"].shape[1]
    logits = net(unshared["input_ids"], unshared["pixel_values"], unshared["image_grid_thw"],
                 attention_mask=unshared["attention_mask"], logits_to_keep=R + 1)[:, :-1]  # t predicts t + 1
    return response_logprobs(logits, shared["response_ids"], shared["response_mask"])


def shared_logprobs(net, shared):
    return response_logprobs(net.forward_shared_prefix(**shared), shared["response_ids"], shared["response_mask"])


def grads_of(net, logprobs_fn):
    """Gradients of a GRPO-like loss (a weighted sum of response log-probs) -> (logprobs, {name: grad})."""
    net.zero_grad()
    lp = logprobs_fn()
    w = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # advantages of both signs
    (lp * w).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for n in a:  # relative to the tensor's gradient norm (tiny entries carry only rounding noise)
        err = (a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-12)
        assert err < rtol, (n, float(err))


def test_shared_prefix_equals_unshared_forward(pair):
    """Each prompt encoded once (vision tower on its own images only, decoder batch P), G responses
    attending to its keys/values: the same log-probs and gradients as the forward over every
    [prompt | response] row, with images, left-padded prompts and ragged responses."""
    _, path, _ = pair
    net = M.from_pretrained(path).train()
    shared, unshared = shared_prefix_case(seed=12)
    P, G = 3, 4
    seen = []  # (vision patches, decoder batch) of every call
    hooks = [net.visual.register_forward_hook(lambda m, a, o: seen.append(("visual", a[0].shape[0]))),
             net.layers[0].register_forward_hook(lambda m, a, o: seen.append(("layer", a[0].shape[0])))]
    lp_s, g_s = grads_of(net, lambda: shared_logprobs(net, shared))
    for h in hooks:
        h.remove()
    assert seen == [("visual", shared["pixel_values"].shape[0]), ("layer", P)]
    lp_u, g_u = grads_of(net, lambda: unshared_logprobs(net, shared, unshared))
    real = shared["response_mask"].bool()
    assert (lp_s - lp_u)[real].abs().max() < 1e-5
    assert torch.isfinite(lp_s).all() and lp_s[real].std() > 0.1  # not a degenerate comparison
    assert g_u["visual.blocks.0.attn.qkv.weight"].abs().sum() > 0  # images and prompt tokens get gradients
    assert_grads_close(g_u, g_s)
    # the prompt's positions matter: one response token's log-prob changes when its prompt changes
    other = dict(shared, prompt_ids=shared["prompt_ids"].roll(1, dims=1))
    with torch.no_grad():
        assert (shared_logprobs(net, other) - lp_s)[real].abs().max() > 1e-3


def test_shared_prefix_with_activation_checkpointing(pair):
    """grpo.py's activation checkpointing (composable checkpoint per layer) recomputes the
    two-stream layer call: same gradients."""
    from torch.distributed._composable import checkpoint as recompute_in_backward
    _, path, _ = pair
    shared, _ = shared_prefix_case(seed=13, P=2, G=3)
    plain = M.from_pretrained(path).train()
    ckpt = M.from_pretrained(path).train()
    for layer in ckpt.layers:
        recompute_in_backward(layer)
    lp_a, g_a = grads_of(plain, lambda: shared_logprobs(plain, shared))
    lp_b, g_b = grads_of(ckpt, lambda: shared_logprobs(ckpt, shared))
    assert torch.equal(lp_a, lp_b)
    assert_grads_close(g_a, g_b, rtol=1e-6)


def common_prefix_case(seed, B=4, L=7):
    """B right-padded rows that share L text tokens, then each its own text, image (of its own size
    and pixels) and ragged text: an SFT micro-batch (system prompt, user turn with image, answer)."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 240, (L,), generator=gen).tolist()
    grids = [[[1, 4, 6]], [[1, 8, 8]], [[1, 4, 4]], [[1, 4, 6]]][:B]
    rows = [prefix + seq_with_images(g, gen, text=(1 + b, 3 + 2 * b)) for b, g in enumerate(grids)]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    pv = torch.cat([pixels(g, gen)[0] for g in grids])
    return ids, mask, pv, torch.tensor([g[0] for g in grids])


def test_common_prefix_len_stops_at_images_and_keeps_a_token_per_row(pair):
    _, _, net = pair
    ids, mask, _, _ = common_prefix_case(seed=3, L=7)
    # row b starts with 1 + b own text tokens before its image: rows 0.. differ right after the prefix
    # (random ids could agree by chance at position 7: then the prefix would be longer, still text)
    L = net.common_prefix_len(ids, mask)
    assert L >= 7 and not (ids[:, :L] == IMG).any() and not (ids[:, :L] == VS).any()
    assert net.common_prefix_len(ids[:1], mask[:1]) == 0  # one row: nothing to share
    same = ids[[0, 0]]
    assert net.common_prefix_len(same, mask[[0, 0]]) < int(mask[0].sum())  # identical rows keep own tokens
    text = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    assert net.common_prefix_len(text, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])) == 2  # row 1 has 3 real tokens


def test_common_prefix_forward_equals_plain_forward(pair):
    """forward(prefix_len=L): the shared system prompt once (decoder batch 1), the rows' own tokens
    (with their images, right-padded) attending to it: the same logits and gradients as forward()."""
    _, path, _ = pair
    net = M.from_pretrained(path).train()
    ids, mask, pv, grid = common_prefix_case(seed=5)
    L = net.common_prefix_len(ids, mask)
    assert L >= 7
    targets = ids[:, 1:]
    w = torch.linspace(-1.0, 1.0, targets.numel()).view_as(targets) * mask[:, 1:]

    def run(prefix_len):
        seen = []
        hook = net.layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
        net.zero_grad()
        logits = net(ids, pv, grid, attention_mask=mask, prefix_len=prefix_len)
        hook.remove()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
        (lp * w).sum().backward()
        return logits.detach(), seen, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, seen_plain, g_plain = run(0)
    shared, seen_shared, g_shared = run(L)
    assert seen_plain == [(4, ids.shape[1])] and seen_shared == [(1, L)]  # the prefix went through once
    real = mask.bool()
    assert (plain - shared)[real].abs().max() < 1e-5
    assert plain[real].std() > 0.1
    assert g_plain["visual.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert_grads_close(g_plain, g_shared)


def test_sft_micro_loss_with_shared_prefix_equals_plain(pair):
    """sft.micro_loss on a real SFT micro-batch (tiny tokenizer, system prompt, image, answer):
    share_prefix on and off give the same loss sum and gradients."""
    import sft
    _, path, _ = pair
    net = M.from_pretrained(path).train()
    ids, mask, pv, grid = common_prefix_case(seed=9)
    amask = mask.bool() & (torch.arange(ids.shape[1]) >= ids.shape[1] // 2)  # "assistant" tokens: the tail
    batch = dict(input_ids=ids, attention_mask=mask, assistant_mask=amask, pixel_values=pv, image_grid_thw=grid)
    out = []
    for share in (False, True):
        net.zero_grad()
        ls, n = sft.micro_loss(net, batch, torch.autocast("cpu", enabled=False), share_prefix=share)
        ls.backward()
        out.append((float(ls.detach()), n, {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}))
    assert out[0][1] == out[1][1] > 0
    assert abs(out[0][0] - out[1][0]) < 1e-4 * abs(out[0][0])
    assert_grads_close(out[0][2], out[1][2])


def _fsdp_shared_prefix_worker(rank, port, path, q):
    """Rank r trains on its own case; the FSDP2-sharded shared-prefix gradients must equal the mean
    of the two ranks' unshared single-process gradients (what FSDP's reduce-scatter averages)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cases = [shared_prefix_case(seed=20 + r, P=2, G=3) for r in range(2)]
    net = M.from_pretrained(path).train()
    ref = [grads_of(net, lambda: unshared_logprobs(net, *case)) for case in cases]
    want = {n: (ref[0][1][n] + ref[1][1][n]) / 2 for n in ref[0][1]}
    for blk in net.visual.blocks:  # as dist.shard_model
        fully_shard(blk)
    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    lp, got = grads_of(net, lambda: shared_logprobs(net, cases[rank][0]))
    got = {n: g.full_tensor() for n, g in got.items()}
    real = cases[rank][0]["response_mask"].bool()
    lp_err = float((lp - ref[rank][0])[real].abs().max())
    errs = {n: float((want[n] - got[n]).norm() / want[n].norm().clamp_min(1e-12)) for n in want}
    q.put((rank, lp_err, errs, sorted(got) == sorted(want)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_shared_prefix_under_fsdp2_two_processes(pair):
    import torch.multiprocessing as mp
    _, path, _ = pair
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + (os.getpid() + 500) % 1000
    procs = [ctx.Process(target=_fsdp_shared_prefix_worker, args=(r, port, path, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, lp_err, errs, same_names in results:
        assert same_names
        assert lp_err < 1e-5, (rank, lp_err)
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-4, (rank, worst, errs[worst])


# ----------------------------------------------------------------------------------------------
# preprocessor_config.json: the image processor's settings

QWEN25_VL_7B_PREPROCESSOR = {   # Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json, as published
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def test_image_config_reads_the_checkpoint_file_and_the_flag_overrides(tmp_path):
    from support import data
    assert (hf_checkpoint.image_config(str(tmp_path)).min_pixels, hf_checkpoint.image_config(str(tmp_path)).max_pixels) == (56 * 56, 28 * 28 * 1280)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_7B_PREPROCESSOR))
    c = hf_checkpoint.image_config(str(tmp_path))
    assert (c.min_pixels, c.max_pixels, c.patch_size, c.merge_size) == (3136, 12845056, 14, 2)
    assert hf_checkpoint.image_config(str(tmp_path), max_pixels=28 * 28 * 64).max_pixels == 28 * 28 * 64
    with pytest.raises(ValueError, match="--max_pixels: max_pixels 100 must be >= min_pixels 3136"):
        hf_checkpoint.image_config(str(tmp_path), max_pixels=100)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(   # transformers 5's layout: size only
        {"size": {"shortest_edge": 1000, "longest_edge": 20000}, "patch_size": 14}))
    c = hf_checkpoint.image_config(str(tmp_path))
    assert (c.min_pixels, c.max_pixels) == (1000, 20000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(QWEN25_VL_7B_PREPROCESSOR, image_mean=[0.5] * 3)))
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean"):
        hf_checkpoint.image_config(str(tmp_path))
    assert data.ImageConfig().max_pixels == 28 * 28 * 1280


def test_written_preprocessor_config_gives_transformers_the_same_grids(tmp_path):
    """write_image_config -> transformers' Qwen2VLImageProcessor (the PIL backend: torchvision is
    not installed) loads the file and produces, for images below, inside and above the pixel
    budget, the grid_thw of data.preprocess_image with hf_checkpoint.image_config of that directory, and
    the same pixel values. The budget is not transformers' default, and the default gives other
    grids: the file is what makes them agree."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from support import data
    cfg = data.ImageConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)
    hf_checkpoint.write_image_config(str(tmp_path), cfg)
    hf = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    ours = hf_checkpoint.image_config(str(tmp_path))
    assert (ours.min_pixels, ours.max_pixels) == (cfg.min_pixels, cfg.max_pixels)
    rng = np.random.default_rng(0)
    differs = False
    for h, w in ((20, 30), (90, 120), (300, 200), (57, 400)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = hf(images=[img], return_tensors="pt")
        pv, grid = data.preprocess_image(img, ours)
        assert out["image_grid_thw"][0].tolist() == grid.tolist(), (h, w)
        torch.testing.assert_close(out["pixel_values"].float(), pv, rtol=0, atol=1e-4)
        differs |= data.preprocess_image(img)[1].tolist() != grid.tolist()
    assert differs
