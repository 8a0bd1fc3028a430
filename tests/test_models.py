"""Model definitions: registry shapes, parameter counts, masks, the KV cache, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructune.errors import ModelLoadError
from instructune.models import REGISTRY, ModelConfig, build_model, get_config

# Published sizes (HF model cards / config.json), counted with tied heads.
EXPECTED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "llama-3.2-1b": 1_235_814_400,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_registry_parameter_counts_on_meta(name):
    model = build_model(get_config(name), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert n_params(model) == EXPECTED_PARAMS[name]


def test_untied_gpt2_medium_is_the_books_406m():
    model = build_model(get_config("gpt2-medium", tie_embeddings=False), device="meta")
    assert n_params(model) == 406_286_336


def test_smollm2_135m_shape():
    cfg = get_config("smollm2-135m")
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (
        30, 576, 9, 3, 1536,
    )  # fmt: skip
    assert (cfg.vocab_size, cfg.rope_theta, cfg.context_length, cfg.norm_eps) == (
        49152, 100000.0, 8192, 1e-5,
    )  # fmt: skip
    assert cfg.tie_embeddings and cfg.head_dim == 64
    assert cfg.hub_id == "HuggingFaceTB/SmolLM2-135M"
    assert get_config("gpt2-medium").hub_id == "openai-community/gpt2-medium"
    assert get_config("llama-3.2-1b").rope_scaling["factor"] == 32.0
    assert {n.replace("-instruct", "") for n in REGISTRY} == set(EXPECTED_PARAMS)


def test_get_config_overrides_and_errors():
    cfg = get_config("gpt2", drop_rate=0.1, n_layers=2)
    assert cfg.drop_rate == 0.1 and cfg.n_layers == 2
    assert REGISTRY["gpt2"].n_layers == 12  # the registry entry is untouched
    small = get_config("gpt2", emb_dim=64, n_heads=4)
    assert small.head_dim == 16 and small.hidden_dim == 256
    with pytest.raises(ModelLoadError, match="unknown model name 'gpt3'"):
        get_config("gpt3")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(arch="llama", vocab_size=8, context_length=8, emb_dim=12, n_layers=1,
                    n_heads=3, n_kv_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="llama3"):
        get_config("smollm2-135m", rope_scaling={"rope_type": "yarn", "factor": 2.0})


def tiny(arch: str, **kw) -> ModelConfig:
    if arch == "gpt2":
        base = dict(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4,
                    qkv_bias=True)  # fmt: skip
    else:
        base = dict(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, hidden_dim=48, rope_theta=10000.0)  # fmt: skip
    base.update(kw)
    return ModelConfig(arch=arch, **base)


ARCHS = [
    pytest.param(tiny("gpt2"), id="gpt2"),
    pytest.param(tiny("gpt2", tie_embeddings=False), id="gpt2-untied"),
    pytest.param(tiny("llama"), id="llama-gqa"),
    pytest.param(
        tiny(
            "llama",
            tie_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        id="llama-scaled-untied",
    ),  # fmt: skip
]


@pytest.mark.parametrize("cfg", ARCHS)
def test_forward_shapes_and_output_weight(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, cfg.vocab_size)
    hidden = model.forward_hidden(ids)
    assert hidden.shape == (2, 9, cfg.emb_dim)
    assert torch.allclose(hidden @ model.output_weight.T, logits, atol=1e-5)
    assert (model.output_weight is model.tok_emb.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("cfg", ARCHS)
def test_cache_prefill_then_one_token_at_a_time_equals_full_forward(cfg):
    torch.manual_seed(1)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :6], cache=cache)]
        steps.append(model(ids[:, 6:9], cache=cache))  # a multi-token step after a prefill
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 14)]
    assert cache.length == 14
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("cfg", ARCHS)
def test_left_padding_with_mask_and_positions_matches_unpadded(cfg):
    torch.manual_seed(2)
    model = build_model(cfg)
    short = torch.randint(0, cfg.vocab_size, (1, 5))
    long = torch.randint(0, cfg.vocab_size, (1, 8))
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=positions)
        alone = model(short)
        assert torch.allclose(padded[0, 3:], alone[0], atol=1e-5)
        assert torch.allclose(padded[1], model(long)[0], atol=1e-5)
        assert torch.isfinite(padded).all()  # padding rows must not produce NaN
        # The same batch decoded with the cache, the mask growing one column per step.
        cache = model.new_cache(2, 12)
        out = [model(batch[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4],
                     cache=cache)]  # fmt: skip
        for t in range(4, 8):
            out.append(model(batch[:, t : t + 1], attention_mask=mask[:, : t + 1],
                             position_ids=positions[:, t : t + 1], cache=cache))  # fmt: skip
    assert torch.allclose(torch.cat(out, 1)[mask], padded[mask], atol=1e-5)


def test_attention_mask_length_is_checked():
    model = build_model(tiny("gpt2"))
    with pytest.raises(ValueError, match="attention_mask covers 3 positions"):
        model(
            torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.bool)
        )


def test_cache_overflow_and_context_length_errors():
    model = build_model(tiny("gpt2"))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("cfg", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(cfg):
    torch.manual_seed(3)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))

    def grads():
        model.zero_grad()
        model(ids).float().logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        # A pre-hook: a recomputation stops as soon as it has what backward needs, so a
        # block's post-forward hook does not run the second time.
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    # True recomputes every block; an int k the first k only (each of those runs twice).
    for setting, recomputed in ((True, len(model.blocks)), (1, 1)):
        model.gradient_checkpointing = setting
        calls[:] = [0] * len(calls)
        checkpointed = grads()
        assert calls == [2] * recomputed + [1] * (len(calls) - recomputed)
        assert all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True)
        )


def test_dropout_is_active_only_in_training():
    torch.manual_seed(4)
    model = build_model(tiny("llama", drop_rate=0.5))
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))  # eval mode: deterministic
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_bf16_build_and_forward():
    model = build_model(tiny("llama"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(torch.randint(0, 97, (1, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.get_default_dtype() == torch.float32  # build_model restores the default


def test_random_init_is_seeded():
    torch.manual_seed(5)
    a = build_model(tiny("gpt2"))
    torch.manual_seed(5)
    b = build_model(tiny("gpt2"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_rope_llama3_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from instructune.models.layers import RotaryEmbedding

    cfg = get_config("llama-3.2-1b")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.emb_dim, num_attention_heads=cfg.n_heads, rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling), max_position_embeddings=cfg.context_length,
    )  # fmt: skip
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).inv_freq()
    assert torch.allclose(ours, hf_inv_freq.float(), rtol=1e-6)
    plain = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, None).inv_freq()
    assert not torch.allclose(ours, plain)  # the scaling changes the long wavelengths


def test_cache_reorder_and_reset():
    torch.manual_seed(6)
    model = build_model(tiny("llama"))
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        model(ids[:, :5], cache=cache)
        cache.reorder(torch.tensor([2, 0]))  # drop row 1, swap the others
        step = model(ids[[2, 0], 5:6], cache=cache)
        assert torch.allclose(step[:, 0], model(ids[[2, 0]])[:, 5], atol=1e-5)
        cache.reset()
        assert cache.length == 0 and cache.batch_size == 2
        assert torch.allclose(model(ids[[2, 0]], cache=cache), model(ids[[2, 0]]), atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_reorder_copies_the_filled_rows_and_decoding_goes_on_to_max_len(arch):
    # reorder copies only the filled positions into new max_len buffers: the kept rows' keys and
    # values must survive it, and decoding must still match a full forward up to max_len.
    torch.manual_seed(7)
    model = build_model(tiny(arch))
    ids = torch.randint(0, 97, (4, 12))
    rows = torch.tensor([3, 1])
    with torch.no_grad():
        cache = model.new_cache(4, 12)
        model(ids[:, :5], cache=cache)
        before_k = [k[rows, :, :5].clone() for k in cache.k]
        before_v = [v[rows, :, :5].clone() for v in cache.v]
        cache.reorder(rows)
        assert cache.batch_size == 2 and cache.length == 5
        for k, v, old_k, old_v in zip(cache.k, cache.v, before_k, before_v, strict=True):
            assert k.shape == v.shape == (2, old_k.shape[1], 12, old_k.shape[3])
            assert torch.equal(k[:, :, :5], old_k) and torch.equal(v[:, :, :5], old_v)
        kept = ids[rows]
        steps = [model(kept[:, t : t + 1], cache=cache) for t in range(5, 9)]
        assert torch.allclose(torch.cat(steps, dim=1), model(kept[:, :9])[:, 5:], atol=1e-5)
        cache.reorder(torch.tensor([1]))  # a second reorder, after more steps
        steps = [model(kept[1:, t : t + 1], cache=cache) for t in range(9, 12)]
        assert cache.length == 12  # filled to max_len
        assert torch.allclose(torch.cat(steps, dim=1), model(kept[1:])[:, 9:], atol=1e-5)


def test_linear_over_small_rows_runs_onednn_and_gives_f_linear_results():
    # Training-sized products go to oneDNN (forward) and MKL (backward): the values and all
    # three gradients must be F.linear's, a frozen weight must get none, and the route must be
    # the one taken (else this test would pass on F.linear alone).
    from instructune.models import layers

    assert layers._ONEDNN_LINEAR is not None, "this PyTorch build has no oneDNN"
    torch.manual_seed(0)
    rows = layers.SMALL_ROWS + 45
    x = torch.randn(3, rows // 3, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    with torch.profiler.profile() as prof:
        out = layers.linear(x, weight, bias)
    assert any("_linear_pointwise" in e.name for e in prof.events())
    want = F.linear(x, weight, bias)
    torch.testing.assert_close(out, want)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), upstream)
    expected = torch.autograd.grad(want, (x, weight, bias), upstream)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    frozen = weight.detach()
    (grad_x,) = torch.autograd.grad(layers.linear(x, frozen).sum(), (x,))
    torch.testing.assert_close(grad_x, torch.autograd.grad(F.linear(x, frozen).sum(), (x,))[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps F.linear's casting
        assert layers.linear(x, weight, bias).dtype == torch.bfloat16


def test_linear_pads_few_rows_and_gives_f_linear_results():
    # Few rows are computed as a padded, transposed product (faster on the CPU); every row
    # count up to past the padding limit, with and without bias, in and out of autograd, must
    # still be F.linear's answer for the rows asked.
    from instructune.models.layers import PAD_ROWS_UP_TO, linear, padded_rows

    assert [padded_rows(r) for r in (1, 2, 3, 4, 5, 16, 17, 24, 25, 64, 65, 300)] == [
        2, 2, 4, 4, 16, 16, 24, 24, 32, 64, 65, 300
    ]  # fmt: skip
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 20), torch.randn(48)
    for rows in range(1, PAD_ROWS_UP_TO + 3):
        x = torch.randn(rows, 20)
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
    x = torch.randn(3, 5, 20, requires_grad=True)  # 15 rows, in a batch shape
    w = weight.clone().requires_grad_()
    out = linear(x, w, bias)
    assert out.shape == (3, 5, 48)
    out.square().sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.clone().requires_grad_()
    F.linear(x_ref, w_ref, bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
