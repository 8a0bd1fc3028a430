"""GPT-2 (tiktoken, offline) and tokenizer.json tokenizers behind the Tokenizer protocol."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket

import pytest

from instructune.data.prompts import format_example
from instructune.errors import ModelLoadError, OfflineError
from instructune.tokenization import Tokenizer, load_tokenizer
from instructune.tokenization.gpt2 import (
    TIKTOKEN_GPT2_URLS,
    GPT2Tokenizer,
    byte_to_unicode,
    merges_to_ranks,
    ranks_to_merges,
    shipped_ranks_path,
)
from instructune.tokenization.hf import HFTokenizer


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def saved_gpt2(gpt2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2-tokenizer")
    gpt2.save(directory)
    return directory


def training_texts(records):
    return ["".join(format_example(r)) + "<|endoftext|>" for r in records]


def test_offline_gpt2_end_token_and_known_ids(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert (gpt2.eos_id, gpt2.pad_id, gpt2.eos_token) == (50256, 50256, "<|endoftext|>")
    assert gpt2.vocab_size == 50257 and gpt2.add_bos is False and gpt2.chat_template is None
    # Ids the book prints in chapter 2 for GPT-2's tiktoken encoding.
    assert gpt2.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces") == [
        15496,
        11,
        466,
        345,
        588,
        8887,
        30,
        220,
        50256,
        554,
        262,
        4252,
        18250,
        8812,
        2114,
    ]
    assert gpt2.decode([15496, 50256], skip_special=True) == "Hello"
    assert gpt2.decode([15496, 50256]) == "Hello<|endoftext|>"


def test_gpt2_round_trips_the_fixture(gpt2, fixtures):
    records = json.loads((fixtures / "instructions-40.json").read_text())
    for text in training_texts(records):
        ids = gpt2.encode(text)
        assert ids[-1] == 50256
        assert gpt2.decode(ids) == text


def test_gpt2_round_trips_the_books_data(gpt2, shared_data):
    records = json.loads((shared_data / "instruction-data.json").read_text())
    assert len(records) == 1100
    for text in training_texts(records):
        assert gpt2.decode(gpt2.encode(text)) == text


# sha256 of OpenAI's GPT-2 files as pinned in tiktoken_ext.openai_public.gpt2.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def test_saved_files_are_openais_gpt2_files_byte_for_byte(saved_gpt2):
    # The merge list recovered from the ranks is exactly OpenAI's vocab.bpe, and the
    # vocabulary is exactly its encoder.json: a strong check of the ranks <-> merges code.
    merges = (saved_gpt2 / "merges.txt").read_bytes()
    assert hashlib.sha256(merges).hexdigest() == VOCAB_BPE_SHA256
    vocab = json.loads((saved_gpt2 / "vocab.json").read_text())
    assert hashlib.sha256(json.dumps(vocab).encode()).hexdigest() == ENCODER_JSON_SHA256


def test_from_tiktoken_uses_tiktokens_own_gpt2_encoding(gpt2, saved_gpt2, tmp_path, monkeypatch):
    # Fill tiktoken's cache with the files it would download (their hashes are checked by
    # tiktoken), so get_encoding("gpt2") runs offline.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    vocab = json.loads((saved_gpt2 / "vocab.json").read_text())
    contents = [(saved_gpt2 / "merges.txt").read_bytes(), json.dumps(vocab).encode()]
    for url, data in zip(TIKTOKEN_GPT2_URLS, contents, strict=True):
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    assert GPT2Tokenizer.tiktoken_cached()
    reference = GPT2Tokenizer.from_tiktoken()
    assert reference.name == "gpt2 (tiktoken get_encoding)"
    assert reference._ranks == gpt2._ranks  # the shipped file is tiktoken's gpt2 encoding
    text = "Convert 45 kilometers to meters.<|endoftext|>  spaces\n\n naïve 東京 don't"
    assert reference.encode(text) == gpt2.encode(text)


def test_from_tiktoken_offline_is_a_clear_error(tmp_path, monkeypatch):
    # An empty tiktoken cache and a proxy on a closed local port: the download fails locally.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings built earlier
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not GPT2Tokenizer.tiktoken_cached()
    with pytest.raises(OfflineError, match="works offline from the shipped file"):
        GPT2Tokenizer.from_tiktoken()


def test_byte_to_unicode_is_a_bijection():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"  # 'Ġ', GPT-2's space


def test_merges_recovered_from_ranks_rebuild_the_ranks():
    # A toy ranks table: bytes in vocab.json order, then 'ab', 'abc'.
    ranks = merges_to_ranks([(b"a", b"b"), (b"ab", b"c")])
    assert ranks[b"ab"] == 256 and ranks[b"abc"] == 257
    assert ranks_to_merges(ranks) == [(b"a", b"b"), (b"ab", b"c")]


def test_save_writes_gpt2_checkpoint_files_that_load_back(gpt2, saved_gpt2):
    names = sorted(p.name for p in saved_gpt2.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((saved_gpt2 / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 50256 and vocab["\u0120the"] == 262 and len(vocab) == 50257
    assert (saved_gpt2 / "merges.txt").read_text().splitlines()[1] == "\u0120 t"
    again = GPT2Tokenizer.from_vocab_merges(saved_gpt2)
    assert again.eos_id == 50256
    text = "Convert 45 kilometers to meters.<|endoftext|> naïve café — 東京"
    assert again.encode(text) == gpt2.encode(text)
    assert isinstance(load_tokenizer(saved_gpt2), GPT2Tokenizer)


def test_saved_gpt2_loads_in_transformers_and_encodes_identically(gpt2, saved_gpt2, fixtures):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_gpt2))
    assert hf.eos_token_id == 50256 and hf.eos_token == "<|endoftext|>"
    records = json.loads((fixtures / "instructions-40.json").read_text())
    for text in [*training_texts(records), "  two spaces\n\nand\ttabs 123,456 don't"]:
        assert hf.encode(text) == gpt2.encode(text)


def test_vocab_not_in_merge_order_is_rejected(tmp_path, saved_gpt2):
    for name in ("merges.txt", "tokenizer_config.json"):
        shutil.copy(saved_gpt2 / name, tmp_path / name)
    vocab = json.loads((saved_gpt2 / "vocab.json").read_text())
    vocab["\u0120the"], vocab["\u0120t"] = vocab["\u0120t"], vocab["\u0120the"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        GPT2Tokenizer.from_vocab_merges(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(ModelLoadError, match="merges.txt is missing"):
        GPT2Tokenizer.from_vocab_merges(tmp_path)


def test_ranks_file_and_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer("gpt2"), GPT2Tokenizer)
    tok = load_tokenizer(shipped_ranks_path())
    assert tok.encode("<|endoftext|>") == [50256]
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not-base64!! x\n")
    with pytest.raises(ModelLoadError, match="line 1"):
        load_tokenizer(bad)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


# --- tokenizer.json ---------------------------------------------------------------------------


@pytest.fixture
def tiny(fixtures) -> HFTokenizer:
    return HFTokenizer.from_directory(fixtures / "tiny-tokenizer")


def test_hf_tokenizer_from_directory(tiny):
    assert isinstance(tiny, Tokenizer)
    assert (tiny.eos_token, tiny.eos_id, tiny.pad_id) == ("<|im_end|>", 2, 2)
    assert tiny.bos_id == 1 and tiny.add_bos is False
    assert tiny.chat_template.startswith("{% for message in messages %}")
    assert tiny.vocab_size == 400
    ids = tiny.encode("<|im_start|>user\nWhat is 9 times 7?<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special text maps to ids; no BOS added
    assert tiny.decode(ids) == "<|im_start|>user\nWhat is 9 times 7?<|im_end|>"
    assert tiny.decode(ids, skip_special=True) == "user\nWhat is 9 times 7?"


def test_hf_tokenizer_save_loads_in_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    names = tiny.save(tmp_path)
    assert set(names) <= {p.name for p in tmp_path.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2 and hf.pad_token_id == 2
    assert hf.chat_template == tiny.chat_template
    text = "<|im_start|>user\nConvert 3 kilometers to meters.<|im_end|>\n"
    assert hf.encode(text, add_special_tokens=False) == tiny.encode(text)
    again = HFTokenizer.from_directory(tmp_path)
    assert (again.eos_id, again.bos_id, again.add_bos) == (tiny.eos_id, tiny.bos_id, False)
    assert again.chat_template == tiny.chat_template


def test_hf_tokenizer_constructor_from_a_raw_tokenizer(tiny):
    # The GGUF loader builds HFTokenizer like this.
    tok = HFTokenizer(
        tiny.raw, eos_token="<|endoftext|>", bos_token="<|im_start|>", add_bos=True, name="gguf"
    )
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos) == (0, 0, 1, True)
    assert tok.encode("hi")[0] != 1  # encode never adds BOS, even when add_bos
    with pytest.raises(ModelLoadError, match="'<nope>' is not in the vocabulary"):
        HFTokenizer(tiny.raw, eos_token="<nope>")
    with pytest.raises(ModelLoadError, match="no BOS"):
        HFTokenizer(tiny.raw, eos_token="<|im_end|>", add_bos=True)


def test_hf_tokenizer_settings_files(tiny, tmp_path, fixtures):
    shutil.copy(fixtures / "tiny-tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")
    # No settings at all: the end token must come from somewhere.
    with pytest.raises(ModelLoadError, match="eos_token"):
        load_tokenizer(tmp_path)
    # config.json's eos_token_id names it; chat_template.jinja wins over the config's.
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"content": "<|endoftext|>"},
                "chat_template": [
                    {"name": "default", "template": "T"},
                    {"name": "x", "template": "X"},
                ],
            }
        )
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 0 and tok.chat_template == "T"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="cannot load"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json")


def test_bos_detected_from_the_post_processor(tiny, tmp_path):
    from tokenizers.processors import TemplateProcessing

    raw = tiny.raw
    raw.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos is True and tok.bos_id == 1
    assert tok.encode("hi")[0] != 1
