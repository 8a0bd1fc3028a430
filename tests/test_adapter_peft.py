"""LoRA adapters in PEFT's format: the real ``peft`` package loads ours with the same logits.

Each case starts from a tiny transformers model saved with ``save_pretrained`` (the base both
sides load), adapts it here, saves the adapter, and compares ``PeftModel.from_pretrained`` on
the transformers model with ours (fp32, < 1e-4).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import FIXTURES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 512  # the fixture tokenizer has 403 tokens


def hf_base(arch: str, tmp_path, *, tie: bool = True):
    """A saved tiny transformers model (with the fixture tokenizer) and the model itself."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=tie,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    path = tmp_path / f"base-{arch}"
    model.eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-tokenizer" / name, path / name)
    return path


def adapted(base_path, settings):
    """Our model of ``base_path`` with adapters whose B is non-zero (a trained adapter)."""
    from instructune.checkpoints import load_model
    from instructune.models.lora import apply_lora, lora_modules

    loaded = load_model(base_path, log=None)
    apply_lora(loaded.model, settings)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, module in lora_modules(loaded.model):
            module.lora_B.normal_(std=0.05)
    return loaded


@pytest.mark.parametrize(
    "arch,tie,targets",
    [
        ("llama", True, ("attn", "mlp", "head")),
        ("llama", False, ("attn", "head")),
        ("gpt2", True, ("attn", "mlp", "head")),
    ],
)
def test_peft_loads_our_adapter_with_our_logits(tmp_path, arch, tie, targets):
    from instructune.checkpoints import load_model
    from instructune.checkpoints.adapter import save_adapter
    from instructune.data.prompts import PromptFormat
    from instructune.models.lora import LoraSettings

    base = hf_base(arch, tmp_path, tie=tie)
    settings = LoraSettings(rank=4, alpha=8, dropout=0.1, targets=targets)
    ours = adapted(base, settings)
    fmt = PromptFormat(style="alpaca", eos_token="<|im_end|>", eos_id=402)
    out = save_adapter(tmp_path / "adapter", ours.model, ours.config, base=str(base),
                       prompt_format=fmt)  # fmt: skip

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["base_model_name_or_path"] == str(base)
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    if arch == "llama":  # the fused q/k/v and gate/up split into PEFT's projections
        assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in keys
        up = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
        assert (up in keys) is ("mlp" in targets)
    else:  # c_attn is fused in HF too: one adapter
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
        assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys

    ids = torch.tensor([[5, 77, 300, 12, 9, 401, 3], [250, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = ours.model(ids)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        theirs = peft.PeftModel.from_pretrained(hf_model, out).eval()
        got = theirs(input_ids=ids).logits
        # The adapter changes the output (a test of a zero adapter would prove nothing).
        plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids)
    assert (plain.logits - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # Loading the directory here gives the base with the adapter, and the saved prompt format.
    again = load_model(out, log=None)
    assert again.prompt_format == fmt
    assert "LoRA adapter r=4" in again.weights
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), expected, atol=1e-6, rtol=0)


def test_peft_written_adapter_loads_here(tmp_path):
    """The other direction: an adapter PEFT itself made and saved loads with its logits, here
    on q_proj and v_proj only (PEFT's usual Llama targets: k and o get zero adapters)."""
    from instructune.checkpoints import load_model

    base = hf_base("llama", tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(hf_model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(tmp_path / "theirs")
    ids = torch.tensor([[7, 8, 9, 10, 300]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        ours = load_model(tmp_path / "theirs", log=None)
        torch.testing.assert_close(ours.model(ids), expected, atol=1e-4, rtol=0)
        plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids)
    assert (plain.logits - expected).abs().max() > 1e-3


def test_adapter_errors_name_the_file_and_field(tmp_path):
    from instructune.checkpoints import load_model
    from instructune.errors import ModelLoadError

    base = hf_base("llama", tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(base),
    }  # fmt: skip
    cases = [
        ({"peft_type": "IA3"}, "'peft_type'"),
        ({"r": 0}, "'r'"),
        ({"use_dora": True}, "'use_dora'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "'target_modules'"),
    ]
    for change, field in cases:
        (bad / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelLoadError) as info:
            load_model(bad, log=None)
        assert "adapter_config.json" in str(info.value) and field in str(info.value)
    # Right config, wrong tensors: named with the file.
    config = {**good, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)},
              str(bad / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors.*missing"):
        load_model(bad, log=None)
