"""memory.py's formulas against tensors measured on the tiny model."""
import torch

from support import memory
import model as model_lib


def tiny(**kw):
    return model_lib.tiny_config(vocab_size=512, **kw)


def test_state_terms_equal_the_tensors_of_a_real_optimizer_step():
    mcfg = tiny()
    net = model_lib.Qwen2_5_VL(mcfg)
    net.visual.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 400, (2, 12))
    net(ids).float().square().mean().backward()
    opt.step()
    seen = set()
    params = grads = 0
    for p in net.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel() * p.element_size()
        grads += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    plan = memory.memory_plan(mcfg, memory.RunShape(world_size=1, beta=0.0))
    assert (plan.params, plan.grads, plan.optimizer) == (params, grads, state)
    plan4 = memory.memory_plan(mcfg, memory.RunShape(world_size=4, beta=0.1))
    assert plan4.params == params / 4 and plan4.optimizer == state / 4 and plan4.reference == params / 4   # fp32, as the policy
    assert plan4.rollout == params / 2          # the whole model, gathered in bf16


def test_kv_cache_term_equals_the_sampler_cache():
    mcfg = tiny()
    run = memory.RunShape(rollout_batch=3, group_size=4, prompt_len=20, max_new_tokens=7, shared_prefix_cache=False)
    cache = model_lib.KVCache(mcfg, 3 * 4, 20 + 7, "cpu", torch.bfloat16)
    measured = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert memory.memory_plan(mcfg, run).kv_cache == measured
    shared = memory.memory_plan(mcfg, memory.RunShape(**{**run.__dict__, "shared_prefix_cache": True})).kv_cache
    per_token = measured / (3 * 4 * 27)
    assert shared == per_token * (3 * 20 + 3 * 4 * 7)   # each prompt once per group


def _saved_values_per_token(mcfg, B=2, T=24):
    layer = model_lib.DecoderLayer(mcfg.text, 0)
    x = torch.randn(B, T, mcfg.text.hidden_size, requires_grad=True)
    pos = torch.arange(T)[None, None].expand(3, B, T)
    cos, sin = model_lib.mrope_cos_sin(pos, mcfg.text, torch.float32)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, None)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in skip) / 4 / (B * T)   # fp32 values


def test_activation_formula_matches_saved_tensors_of_a_decoder_layer():
    for kw in [dict(), dict(num_attention_heads=8, num_key_value_heads=1),
               dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2),
               dict(hidden_size=96, intermediate_size=640, num_attention_heads=2, num_key_value_heads=2)]:
        mcfg = tiny(**kw)
        measured = _saved_values_per_token(mcfg)
        assert abs(memory.layer_activation_values(mcfg.text) - measured) <= 0.03 * measured, (kw, measured)


def test_seven_b_recipe_fits_in_80_gb():
    plan = memory.memory_plan(model_lib.ModelConfig(), memory.RunShape())
    n_all, n_train = memory.param_counts(model_lib.ModelConfig(), True)
    assert 8.2e9 < n_all < 8.4e9 and n_train < n_all          # Qwen2.5-VL-7B: 8.29B with the vision tower
    assert plan.rollout_peak < 80 * memory.GB and plan.training_peak < 80 * memory.GB
