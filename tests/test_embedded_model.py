"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading."""

from __future__ import annotations

import time

import pytest
import torch

from instructune.checkpoints import load_model, save_model
from instructune.checkpoints.resolve import EMBEDDED_FILE, embedded_gguf_path
from instructune.errors import ModelLoadError

pytestmark = pytest.mark.embedded
transformers = pytest.importorskip("transformers")

# Tricky strings: accents, CJK, emoji, runs of spaces/newlines, tabs, digits, special tokens.
TRICKY = [
    "Hello, world!",
    "café naïve résumé Ångström",
    "東京は日本の首都です。北京 서울",
    "emoji 🙂🚀👩‍👩‍👧 and ∑∫√ math",
    "a  b   c    d\n\n\nnew\tlines\t\ttabs \n \n",
    "   leading and trailing   ",
    "3.14159 and 1234567890, 2024-05-17, $1,000,000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|endoftext|>more<|im_end|><|im_start|>",
    "def f(x):\n    return x ** 2  # comment\n",
    "It's we'll they've I'M DON'T",
    "",
]


@pytest.fixture(scope="module")
def embedded():
    try:
        path = embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    start = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct")
    print(f"\nembedded model loaded in {time.perf_counter() - start:.2f}s")
    return path, loaded


def test_logits_match_transformers_gguf_loading_and_save_roundtrip(embedded, tmp_path):
    path, loaded = embedded
    tok = loaded.tokenizer
    assert (tok.eos_token, tok.eos_id, tok.pad_id, tok.add_bos) == ("<|im_end|>", 2, 2, False)
    assert loaded.config.n_layers == 30 and loaded.config.tie_embeddings
    # The default model is 4-bit: said on load, and kept on the LoadedModel for run.json.
    assert loaded.weights == "Q4_1 GGUF (some tensors Q8_0), dequantised to fp32"
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
        "\n\n### Response:\n"
    )
    ids = torch.tensor([tok.encode(prompt)])
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=EMBEDDED_FILE, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        ours = loaded.model(ids)
    diff = (ours - expected).abs().max().item()
    print(f"max abs logit difference vs transformers' GGUF loading: {diff:.3g}")
    assert diff < 1e-5  # the same dequantised weights: measured 0 on torch 2.13 / CPU
    assert torch.equal(ours[0, -1].argmax(), expected[0, -1].argmax())

    # Saved as HF format, it loads back (ours and transformers') with the same logits.
    out = save_model(tmp_path / "saved", loaded.model, tok, loaded.config)
    again = load_model(out)
    assert (again.tokenizer.eos_id, again.tokenizer.add_bos) == (2, False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again.model(ids) - ours).abs().max().item() < 1e-5
        assert (theirs(ids).logits - ours).abs().max().item() < 1e-3
    assert theirs.generation_config.eos_token_id == 2
    assert again.tokenizer.encode(TRICKY[7]) == tok.encode(TRICKY[7])


def test_tokenizer_matches_transformers_gguf_tokenizer(embedded):
    path, loaded = embedded
    tok = loaded.tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=EMBEDDED_FILE)
    for text in TRICKY:
        ours = tok.encode(text)
        assert ours == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ours) == text
    # SmolLM2 splits digits one by one, and matches special tokens whole.
    assert len(tok.encode("1234567890")) == 10
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
