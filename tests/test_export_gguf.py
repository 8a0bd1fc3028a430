"""GGUF export on tiny models: the round trip through the gguf package, the tokenizer, the
generated templates (Jinja chat template and Ollama TEMPLATE), the Modelfile, the model card
and the command line. The real engines (llama.cpp, Go) are in test_export_interop.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_prompts import SMOLLM2

from instructune.checkpoints import load_model, save_model
from instructune.checkpoints.gguf import GGUFFile, config_from_gguf
from instructune.checkpoints.gguf_export import GGUF_TYPES, export_gguf, llama_quantizer
from instructune.checkpoints.load import LoadedModel
from instructune.checkpoints.model_card import card_from_run, card_text
from instructune.checkpoints.modelfile import read_template
from instructune.checkpoints.prompt_templates import (
    chat_message,
    check_prompt_pieces,
    jinja_chat_template,
    prompt_pieces,
    render_pieces,
)
from instructune.data.prompts import PromptFormat, format_prompt, prompt_format_for
from instructune.data.prompts import render_chat_template as render_jinja
from instructune.data.records import load_records
from instructune.data.sources import demo_path
from instructune.errors import InstructuneError
from instructune.models import build_model, get_config
from instructune.tokenization import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_TOKENIZER = FIXTURES / "tiny-tokenizer"
TEXTS = [
    "Hello world, this is a test of 123 things.",
    "  Leading spaces\n\nand new lines\tand tabs; café, naïve, 東京 🚀",
    "<|endoftext|> special text inside <|im_start|>user",
    "What's 2+2? It's 4!!! ... don't, won't, I'd",
]
# Records with a system turn, an input, odd characters and template-like text.
EXTRA_RECORDS = [
    {"instruction": "Be brief: what is {{ .Prompt }}?", "input": "", "output": "x"},
    {"instruction": "Translate", "input": "Bonjour\n\n### Input:\nnot a section", "output": "x"},
    {"instruction": "Say hi", "input": "", "output": "hi", "system": "You are terse."},
]


def tiny_gpt2(seed: int = 0) -> LoadedModel:
    """A random 2-layer GPT-2 with GPT-2's real tokenizer (vocabulary 50257)."""
    torch.manual_seed(seed)
    cfg = get_config("gpt2", n_layers=2, emb_dim=64, n_heads=2, hidden_dim=128, context_length=512)
    tok = load_tokenizer("gpt2")
    return LoadedModel(
        model=build_model(cfg).eval(),
        tokenizer=tok,
        config=cfg,
        prompt_format=prompt_format_for(tok, "alpaca"),
        source="tiny gpt2",
        weights="random init",
    )


def tiny_llama(tokenizer_dir: Path = TINY_TOKENIZER, seed: int = 0, **cfg_changes) -> LoadedModel:
    """A random 2-layer Llama (GQA, untied head) with the 400-token fixture tokenizer."""
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=416,  # more rows than tokens: the export pads the vocabulary
        n_layers=2,
        emb_dim=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        context_length=256,
        tie_embeddings=False,
    )
    cfg = get_config("smollm2-135m", **(shape | cfg_changes))
    tok = load_tokenizer(tokenizer_dir)
    model = build_model(cfg).eval()
    with torch.no_grad():  # random weights give near-flat logits; make them decisive
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        config=cfg,
        prompt_format=prompt_format_for(tok, "chat"),
        source="tiny llama",
        weights="random init",
    )


def demo_test_records() -> list[dict]:
    """The demo data's test split (the records the interop tests prompt with)."""
    from instructune.data.records import split_records

    _, test, _ = split_records(load_records(demo_path()))
    return test


def logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]))[0]


_GPT2_EXPORTS: list = []  # one export per pytest session, shared with test_export_interop


def exported_gpt2(tmp_path_factory):
    """The tiny GPT-2 and its f32, f16 and q8_0 exports, made once per session."""
    if not _GPT2_EXPORTS:
        out = tmp_path_factory.mktemp("gpt2")
        loaded = tiny_gpt2()
        files = {t: export_gguf(loaded, out, gguf_type=t, name="tiny") for t in GGUF_TYPES[:3]}
        _GPT2_EXPORTS.append((loaded, files))
    return _GPT2_EXPORTS[0]


@pytest.fixture
def gpt2_exports(tmp_path_factory):
    return exported_gpt2(tmp_path_factory)


def test_gpt2_round_trip_logits(gpt2_exports):
    """f32 gives exactly our logits, f16 within 1e-2; q8_0's top-1 agreement is reported."""
    loaded, files = gpt2_exports
    ids = loaded.tokenizer.encode(format_prompt(demo_test_records()[0]))
    ours = logits(loaded, ids)
    back = {t: load_model(e.gguf, log=None) for t, e in files.items()}
    assert back["f32"].config == replace(loaded.config, name="", hub_id=None)
    assert torch.equal(logits(back["f32"], ids), ours)
    assert (logits(back["f16"], ids) - ours).abs().max().item() < 1e-2
    q8 = logits(back["q8_0"], ids)
    agree = (q8.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"q8_0 top-1 agreement with fp32 (tiny gpt2, {len(ids)} positions): {agree:.3f}")
    assert agree >= 0.9
    assert back["f32"].prompt_format == loaded.prompt_format  # rides along in the metadata


def test_gpt2_file_layout_is_llama_cpp_s(gpt2_exports):
    """llama.cpp's tensor names (gguf's TENSOR_NAMES) and metadata keys, norms kept in F32."""
    import gguf

    loaded, files = gpt2_exports
    g = GGUFFile(files["q8_0"].gguf)
    arch = gguf.MODEL_ARCH.GPT2
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for name, info in g.tensors.items():
        base = name.rsplit(".", 1)[0]
        assert base in allowed or base.split(".", 2)[-1] in {
            n.split(".", 2)[-1] for n in allowed if n.startswith("blk.")
        }, name
        kind = gguf.GGMLQuantizationType(info.qtype).name
        expected = "F32" if len(info.dims) == 1 or name == "position_embd.weight" else "Q8_0"
        assert kind == expected, name
    assert "output.weight" not in g.tensors  # tied: llama.cpp uses token_embd
    assert g.tensors["blk.0.attn_qkv.weight"].dims == (64, 192)  # (in, out), fastest first
    assert g.field("general.architecture") == "gpt2"
    assert g.field("gpt2.block_count") == 2
    assert g.field("general.file_type") == 7
    assert g.field("tokenizer.ggml.pre") == "gpt-2"
    assert g.field("tokenizer.ggml.eos_token_id") == 50256
    assert g.field("tokenizer.ggml.add_bos_token") is False
    assert len(g.field("tokenizer.ggml.merges")) == 50000
    assert config_from_gguf(g).tie_embeddings


def test_gpt2_tokenizer_round_trip(gpt2_exports):
    """The GGUF vocabulary rebuilds GPT-2's tokenisation exactly (tiktoken on one side)."""
    loaded, files = gpt2_exports
    back = load_model(files["f32"].gguf, log=None).tokenizer
    for text in TEXTS + [format_prompt(r) for r in demo_test_records()[:10]]:
        assert back.encode(text) == loaded.tokenizer.encode(text), text
    assert back.eos_id == 50256 and not back.add_bos


@pytest.mark.parametrize("tied", [False, True])
def test_llama_round_trip_logits(tmp_path, tied):
    """Llama: Q/K permuted for llama.cpp and back; f32 exact, f16 within 1e-2, vocabulary padded."""
    loaded = tiny_llama(tie_embeddings=tied)
    ids = loaded.tokenizer.encode(TEXTS[0] + TEXTS[1])
    ours = logits(loaded, ids)
    f32 = load_model(export_gguf(loaded, tmp_path, gguf_type="f32").gguf, log=None)
    assert torch.equal(logits(f32, ids), ours)
    f16 = load_model(export_gguf(loaded, tmp_path, gguf_type="f16").gguf, log=None)
    assert (logits(f16, ids) - ours).abs().max().item() < 1e-2
    for text in TEXTS:
        assert f32.tokenizer.encode(text) == loaded.tokenizer.encode(text), text
    g = GGUFFile(tmp_path / f"{tmp_path.name}-f32.gguf")
    assert g.field("tokenizer.ggml.tokens")[400:] == [f"[PAD{i}]" for i in range(400, 416)]
    assert ("output.weight" in g.tensors) is not tied
    assert g.field("tokenizer.ggml.eos_token_id") == loaded.tokenizer.eos_id


def test_llama3_rope_scaling_round_trips(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    loaded = tiny_llama(rope_scaling=scaling, rope_theta=500000.0)
    back = load_model(export_gguf(loaded, tmp_path, gguf_type="f32").gguf, log=None)
    assert back.config.rope_scaling == scaling
    ids = loaded.tokenizer.encode(TEXTS[0])
    assert torch.equal(logits(back, ids), logits(loaded, ids))


def test_add_bos_follows_the_prompt_format(tmp_path, bos_tokenizer_dir):
    loaded = tiny_llama(bos_tokenizer_dir)
    assert loaded.prompt_format.add_bos
    g = GGUFFile(export_gguf(loaded, tmp_path, gguf_type="f32").gguf)
    assert g.field("tokenizer.ggml.add_bos_token") is True
    assert g.field("tokenizer.ggml.bos_token_id") == loaded.tokenizer.bos_id
    fmt = replace(loaded.prompt_format, add_bos=False, bos_id=None)
    g = GGUFFile(export_gguf(loaded, tmp_path / "b", gguf_type="f32", prompt_format=fmt).gguf)
    assert g.field("tokenizer.ggml.add_bos_token") is False


# --- templates --------------------------------------------------------------------------------


def style_cases():
    chat_template = load_tokenizer(TINY_TOKENIZER).chat_template
    gpt2 = prompt_format_for(load_tokenizer("gpt2"), "alpaca")
    return [
        (gpt2, None),
        (replace(gpt2, style="phi3", stop_strings=["<|user|>", "<|assistant|>"]), None),
        (PromptFormat(style="chat", eos_token="<|im_end|>", eos_id=2), chat_template),
        # Trained with an empty system turn (finetune --system-prompt ''), under a template
        # whose own default system prompt it replaces.
        (PromptFormat(style="chat", eos_token="<|im_end|>", eos_id=2, system_prompt=""), SMOLLM2),
    ]


STYLE_IDS = ["alpaca", "phi3", "chat", "chat-system-prompt"]


@pytest.mark.parametrize("case", style_cases(), ids=STYLE_IDS)
def test_generated_templates_render_the_trained_prompt(case):
    """Jinja chat template and the Go template's pieces give format_prompt for every record."""
    fmt, template = case
    records = demo_test_records() + EXTRA_RECORDS
    pieces = prompt_pieces(fmt, template)
    check_prompt_pieces(pieces, records, template)
    jinja = jinja_chat_template(fmt, template)
    for record in records:
        message = chat_message(record, pieces)
        want = format_prompt(
            record, fmt.style, chat_template=template, system_prompt=fmt.system_prompt
        )
        turns = [{"role": "user", "content": message["prompt"]}]
        if message["system"]:
            turns.insert(0, {"role": "system", "content": message["system"]})
        assert render_jinja(jinja, turns) == want
        assert render_pieces(pieces, message["prompt"], message["system"]) == want


def test_modelfile(gpt2_exports):
    loaded, files = gpt2_exports
    modelfile = files["q8_0"].modelfile
    text = modelfile.read_text()
    assert "FROM ./tiny-q8_0.gguf\n" in text
    for stop in ("<|endoftext|>", "### Instruction:", "### Input:", "### Response:"):
        assert f"PARAMETER stop {json.dumps(stop)}\n" in text
    assert "PARAMETER temperature 0\n" in text
    template = read_template(modelfile)
    assert template.endswith("### Response:\n{{ .Response }}")
    assert "{{ .System }}" not in template  # alpaca has no system turn


def test_chat_style_template_uses_system():
    fmt, template = style_cases()[2]
    from instructune.checkpoints.prompt_templates import ollama_template

    go = ollama_template(prompt_pieces(fmt, template))
    assert go.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n")
    assert go.endswith("<|im_end|>\n<|im_start|>assistant\n{{ .Response }}")


def test_trained_system_prompt_replaces_the_template_default_in_every_engine():
    fmt, template = style_cases()[3]
    from instructune.checkpoints.prompt_templates import ollama_template

    empty_turn = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    jinja = jinja_chat_template(fmt, template)
    assert render_jinja(jinja, [{"role": "user", "content": "Hi"}]).startswith(empty_turn)
    # A system message of the user's own still wins, and nothing else changes.
    terse = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert render_jinja(jinja, terse) == render_jinja(template, terse)
    go = ollama_template(prompt_pieces(fmt, template))
    assert "{{ else }}<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{{ end }}" in go
    assert "SmolLM" not in go and "SmolLM" in template
    # Without one, the template's own default stays (and the template is kept as it is).
    assert jinja_chat_template(replace(fmt, system_prompt=None), template) == template


def test_template_that_cannot_be_cut_is_refused():
    bad = "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"
    with pytest.raises(InstructuneError, match="exactly once"):
        prompt_pieces(PromptFormat(style="chat", eos_token="<|im_end|>", eos_id=2), bad)


def test_q4_k_m(tmp_path):
    loaded = tiny_llama(emb_dim=256, n_heads=4, head_dim=64, hidden_dim=256)
    if llama_quantizer() is None:
        with pytest.raises(InstructuneError, match="llama.cpp's quantiser"):
            export_gguf(loaded, tmp_path, gguf_type="q4_k_m")
        return
    result = export_gguf(loaded, tmp_path, gguf_type="q4_k_m")
    g = GGUFFile(result.gguf)
    assert g.field("general.file_type") == 15
    kinds = {info.qtype for info in g.tensors.values()}
    assert 12 in kinds  # Q4_K
    back = load_model(result.gguf, log=None)
    assert "Q4_K" in back.weights
    assert not list(tmp_path.glob(".*"))  # the f16 intermediate is gone


# --- model card and command line --------------------------------------------------------------


def test_saved_model_gets_a_card(tmp_path):
    loaded = tiny_llama()
    loaded.prompt_format = replace(loaded.prompt_format, style="alpaca")
    save_model(tmp_path, loaded.model, loaded.tokenizer, loaded.config, loaded.prompt_format)
    card = (tmp_path / "README.md").read_text()
    head = f'---\nbase_model: "{loaded.config.hub_id}"\nlicense: "apache-2.0"\n'
    assert card.startswith(head)
    assert 'library_name: "instructune"' in card and '  - "prompt-alpaca"' in card
    assert "### Response:\n<answer>" in card
    (tmp_path / "README.md").write_text("my own notes\n")
    save_model(tmp_path, loaded.model, loaded.tokenizer, loaded.config, loaded.prompt_format)
    assert (tmp_path / "README.md").read_text() == "my own notes\n"  # not ours: kept


def test_card_from_run_has_losses_and_settings():
    loaded = tiny_gpt2()
    run_info = {
        "config": {"model": "gpt2", "data": "demo", "lr": 5e-05, "epochs": 2, "batch_size": 8},
        "results": {"train_loss": 0.51234, "val_loss": 0.7, "evaluation": {"exact_match": 0.25}},
    }
    text = card_text(card_from_run(run_info, loaded.config, loaded.prompt_format))
    assert "| val_loss | 0.7 |" in text and "| train_loss | 0.5123 |" in text
    assert "| exact_match | 0.25 |" in text and "| lr | 5e-05 |" in text
    assert 'datasets:\n  - "demo"' in text and "licensed apache-2.0" in text


def test_cli_export(tmp_path):
    from instructune.cli.main import main

    loaded = tiny_llama()
    model_dir = tmp_path / "model"
    save_model(model_dir, loaded.model, loaded.tokenizer, loaded.config, loaded.prompt_format)
    out = tmp_path / "exported"
    assert main(["export", str(model_dir), "--to", "gguf", "--type", "f32", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "exported-f32.gguf"]
    assert "ollama create exported -f Modelfile" in (out / "README.md").read_text()
    back = load_model(out / "exported-f32.gguf", log=None)
    ids = loaded.tokenizer.encode(TEXTS[0])
    assert torch.equal(logits(back, ids), logits(loaded, ids))
    assert np.isfinite(logits(back, ids).numpy()).all()


@pytest.mark.slow
def test_finetune_run_card_has_final_losses(tmp_path):
    """A run's directory gets a card with its data, settings and final losses."""
    from helpers import tiny_config

    from instructune.pipeline import run_finetune

    summary = run_finetune(tiny_config(tmp_path / "run"))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "instructions-40.json" in card and "| batch_size | 4 |" in card
    assert f"| val_loss | {summary['val_loss']:.4g} |" in card
    assert "| steps | 1 |" in card


def test_lora_adapter_exports_merged(tmp_path):
    """An adapter directory (head adapted too) exports as its merged model: same logits."""
    from instructune.checkpoints.adapter import save_adapter
    from instructune.cli.main import main
    from instructune.models.lora import LoraSettings, apply_lora

    loaded = tiny_llama(tie_embeddings=True)
    base = tmp_path / "base"
    save_model(base, loaded.model, loaded.tokenizer, loaded.config, loaded.prompt_format)
    model = apply_lora(loaded.model, LoraSettings(rank=4, targets=("attn", "mlp", "head")))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: give the adapter an effect to keep
    save_adapter(tmp_path / "adapter", model, loaded.config, base=str(base))
    ids = loaded.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        adapted = model(torch.tensor([ids]))[0]
    out = tmp_path / "exported"
    args = ["export", str(tmp_path / "adapter"), "--type", "f32", "--out", str(out)]
    assert main(args) == 0
    back = load_model(out / "exported-f32.gguf", log=None)
    assert not back.config.tie_embeddings  # the head adapter went into an untied output
    assert (logits(back, ids) - adapted).abs().max().item() < 1e-5
