"""GGUF in: write small random Llama models with gguf.GGUFWriter (permuted as llama.cpp does),
in every type gguf can quantise, and load them back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructune.checkpoints import load_model
from instructune.checkpoints.gguf import GGUFFile, config_from_gguf, permute_rows, unpermute_rows
from instructune.errors import ModelLoadError
from instructune.models import ModelConfig, build_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

# Small, but every quantised row is a whole number of 32-value blocks.
CFG = ModelConfig(
    arch="llama", vocab_size=288, context_length=128, emb_dim=64, n_layers=2, n_heads=4,
    n_kv_heads=2, hidden_dim=96, rope_theta=10000.0, tie_embeddings=True,
)  # fmt: skip

# Max abs logit error against the unquantised model that each type may cause, on these shapes.
TYPE_TOLERANCE = {
    Q.F32: 1e-5, Q.F16: 5e-3, Q.BF16: 5e-2, Q.Q8_0: 5e-2,
    Q.Q5_0: 0.25, Q.Q5_1: 0.25, Q.Q4_0: 0.5, Q.Q4_1: 0.5,
}  # fmt: skip


def toy_vocab():
    """A byte-level vocabulary: 256 bytes, some merges, and control tokens (like SmolLM2's)."""
    from instructune.tokenization.gpt2 import byte_to_unicode

    chars = list(byte_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
    tokens = specials + chars + merged
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    types = [3] * len(specials) + [1] * (len(chars) + len(merged))
    return tokens, merges, types


def write_gguf(path, cfg: ModelConfig, hf_state: dict[str, np.ndarray], qtype, *, pre="smollm",
               rope_freqs: np.ndarray | None = None, raw_blocks: dict | None = None):  # fmt: skip
    """A GGUF file as llama.cpp's converter writes one: llama.* metadata, permuted Q/K rows.

    ``raw_blocks`` maps HF names to already-quantised (bytes, type) pairs written as they are.
    """
    tokens, merges, types = toy_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for hf_name, arr in hf_state.items():
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        name = GGUF_NAMES.get(hf_name) or f"blk.{layer}.{GGUF_NAMES[rest]}"
        arr = permute_like(hf_name, arr, cfg)
        if raw_blocks and hf_name in raw_blocks:
            data, kind = raw_blocks[hf_name]
            w.add_tensor(
                name, np.ascontiguousarray(permute_like(hf_name, data, cfg)), raw_dtype=kind
            )
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms in F32
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_row_order(n_heads: int, rows: int) -> list[int]:
    """The HF row that lands at each GGUF row, written out from llama.cpp's rule.

    llama.cpp's converter (``LlamaModel.permute`` in convert_hf_to_gguf.py) reorders the Q and
    K rows of each head so that its RoPE, which rotates neighbouring rows, pairs what HF's
    ``rotate_half`` pairs: rows ``i`` and ``i + head_dim / 2``. So GGUF rows ``2i`` and ``2i + 1``
    of a head are HF rows ``i`` and ``i + head_dim / 2``. Built with loops on purpose, not with
    the reshape that ``permute_rows`` uses, so the two are independent.
    """
    head_dim = rows // n_heads
    order = []
    for head in range(n_heads):
        for i in range(head_dim // 2):
            order += [head * head_dim + i, head * head_dim + head_dim // 2 + i]
    return order


def permute_like(hf_name: str, arr, cfg: ModelConfig):
    """llama.cpp's converter permutes the Q and K rows (per head) for its RoPE layout."""
    if ".q_proj." in hf_name:
        return arr[llama_cpp_row_order(cfg.n_heads, arr.shape[0])]
    if ".k_proj." in hf_name:
        return arr[llama_cpp_row_order(cfg.n_kv_heads, arr.shape[0])]
    return arr


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_reference(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.context_length,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1, so a mix-up of norm tensors shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def hf_state(model, cfg) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.mark.parametrize("qtype", list(TYPE_TOLERANCE), ids=lambda q: q.name)
def test_gguf_roundtrip_every_writable_type(tmp_path, qtype):
    ref = hf_reference(CFG)
    state = hf_state(ref, CFG)
    path = write_gguf(tmp_path / f"m.{qtype.name}.gguf", CFG, state, qtype)
    loaded = load_model(path)
    assert loaded.config.replace(name="") == CFG.replace(name="")
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        ours = loaded.model(ids)
        # Exactly the quantised weights in transformers: only float rounding may differ.
        if qtype not in (Q.F32, Q.F16):
            for p in ref.parameters():
                if p.ndim == 2:
                    deq = gguf.quants.dequantize(
                        gguf.quants.quantize(p.detach().numpy(), qtype), qtype
                    )
                    p.copy_(torch.from_numpy(np.asarray(deq, dtype=np.float32)))
        elif qtype == Q.F16:
            for p in ref.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
        same_weights = ref(ids).logits
    assert (ours - same_weights).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype", list(TYPE_TOLERANCE), ids=lambda q: q.name)
def test_gguf_logits_close_to_the_unquantised_model(tmp_path, qtype):
    ref = hf_reference(CFG, seed=1)
    path = write_gguf(tmp_path / "m.gguf", CFG, hf_state(ref, CFG), qtype)
    ids = torch.randint(0, CFG.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (load_model(path).model(ids) - ref(ids).logits).abs().max().item()
    assert diff < TYPE_TOLERANCE[qtype]


def test_untied_head_and_llama3_rope_freqs(tmp_path):
    from instructune.models.layers import llama3_inv_freq

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = CFG.replace(tie_embeddings=False, rope_scaling=scaling, context_length=65536,
                      rope_theta=500000.0, n_heads=2, n_kv_heads=1)  # fmt: skip
    ref = hf_reference(cfg)
    hd = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    factors = (base / llama3_inv_freq(base, scaling)).numpy()  # what llama.cpp stores
    path = write_gguf(tmp_path / "m.gguf", cfg, hf_state(ref, cfg), Q.F32, rope_freqs=factors)
    loaded = load_model(path)
    assert loaded.config.rope_scaling == scaling and not loaded.config.tie_embeddings
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    pos = torch.arange(20000, 20012)[None]  # far out, where the scaling matters
    with torch.no_grad():
        diff = loaded.model(ids, position_ids=pos) - ref(ids, position_ids=pos).logits
    assert diff.abs().max().item() < 1e-4


def test_permutation_is_inverted():
    w = np.arange(4 * 16 * 3).reshape(64, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not np.array_equal(permute_rows(w, 4), w)


# Two heads of head_dim 6, worked by hand from llama.cpp's rule: in each head, GGUF rows
# (0, 1), (2, 3), (4, 5) are the RoPE pairs, which in HF's layout are rows (0, 3), (1, 4), (2, 5).
HF_ROWS = np.arange(12)
GGUF_ROWS = np.array([0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])


def test_permutation_matches_a_hand_worked_two_head_example():
    assert llama_cpp_row_order(2, 12) == GGUF_ROWS.tolist()
    assert np.array_equal(permute_rows(HF_ROWS, 2), GGUF_ROWS)
    assert np.array_equal(unpermute_rows(GGUF_ROWS, 2), HF_ROWS)  # what the loader does
    w = np.arange(12 * 2).reshape(12, 2)  # whole rows move, columns stay
    assert np.array_equal(unpermute_rows(w[GGUF_ROWS], 2), w)
    assert np.array_equal(permute_rows(torch.from_numpy(w), 2).numpy(), w[GGUF_ROWS])


def test_permutation_turns_hf_rope_into_llama_cpp_rope():
    """The reason for the permutation: llama.cpp's RoPE (rotate neighbouring pairs) on the
    GGUF rows equals HF's RoPE (rotate the two halves) on the HF rows, permuted."""
    n_heads, head_dim, pos = 2, 6, 5
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    cos, sin = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
    q = np.random.default_rng(0).standard_normal(n_heads * head_dim)

    def hf_rope(x):  # per head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        out = []
        for h in x.reshape(n_heads, head_dim):
            x1, x2 = h[: head_dim // 2], h[head_dim // 2 :]
            out.append(np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin]))
        return np.concatenate(out)

    def llama_cpp_rope(x):  # per head: each neighbouring pair (a, b) rotated by its angle
        out = x.copy().reshape(n_heads, head_dim)
        for h in out:
            a, b = h[0::2].copy(), h[1::2].copy()
            h[0::2], h[1::2] = a * cos - b * sin, b * cos + a * sin
        return out.reshape(-1)

    assert np.allclose(llama_cpp_rope(q[GGUF_ROWS]), hf_rope(q)[GGUF_ROWS])
    assert np.allclose(llama_cpp_rope(permute_rows(q, n_heads)), hf_rope(q)[GGUF_ROWS])
    assert not np.allclose(llama_cpp_rope(q), hf_rope(q))  # the layouts really differ


@pytest.mark.parametrize(
    ("qtype", "weights"),
    [
        (Q.Q4_1, "Q4_1 GGUF, dequantised to fp32"),
        (Q.Q8_0, "Q8_0 GGUF, dequantised to fp32"),
        (Q.F16, "F16 GGUF, loaded as fp32"),
        (Q.F32, "F32 GGUF, loaded as fp32"),
    ],
    ids=["Q4_1", "Q8_0", "F16", "F32"],
)
def test_gguf_weights_are_described(tmp_path, qtype, weights):
    path = write_gguf(tmp_path / "m.gguf", CFG, hf_state(hf_reference(CFG), CFG), qtype)
    said: list[str] = []
    assert load_model(path, log=said.append).weights == weights
    assert said == [f"weights: {weights}"]


def test_mixed_gguf_names_every_weight_type(tmp_path):
    ref = hf_reference(CFG)
    state = hf_state(ref, CFG)
    embed = state["model.embed_tokens.weight"]
    raw = {"model.embed_tokens.weight": (gguf.quants.quantize(embed, Q.Q8_0), Q.Q8_0)}
    path = write_gguf(tmp_path / "m.gguf", CFG, state, Q.Q4_1, raw_blocks=raw)
    loaded = load_model(path, dtype=torch.bfloat16, log=None)
    # The norms are F32 in every GGUF and are not named; the type of most weights comes first.
    assert loaded.weights == "Q4_1 GGUF (some tensors Q8_0), dequantised to bf16"


def test_gguf_tokenizer_from_metadata(tmp_path):
    ref = hf_reference(CFG)
    path = write_gguf(tmp_path / "m.gguf", CFG, hf_state(ref, CFG), Q.F32)
    tok = load_model(path).tokenizer
    assert (tok.eos_token, tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos) == (
        "<|im_end|>", 2, 2, 1, False,
    )  # fmt: skip
    assert tok.chat_template.startswith("{% for m in messages %}")
    ids = tok.encode("hello world<|im_end|>12")
    assert ids[-3] == 2  # the control token is matched whole
    tokens, _, _ = toy_vocab()
    assert [tokens[i] for i in ids[:2]] == ["hello", "Ġworld"]  # merges applied
    assert [tokens[i] for i in ids[-2:]] == ["1", "2"]  # smollm: one digit per piece
    assert tok.decode(ids) == "hello world<|im_end|>12"
    assert tok.decode(ids, skip_special=True) == "hello world12"
    # The same metadata through transformers' own GGUF tokenizer gives the same ids.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["hello world", "héllo  wörld\n\n\tx", "<|im_start|>hi<|im_end|>"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_gguf_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bad)
    ref = hf_reference(CFG)
    state = hf_state(ref, CFG)
    state.pop("model.layers.1.mlp.up_proj.weight")
    path = write_gguf(tmp_path / "m.gguf", CFG, state, Q.F32)
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors: model.layers.1.mlp.up_proj"):
        load_model(path)
    path = write_gguf(tmp_path / "p.gguf", CFG, hf_state(ref, CFG), Q.F32, pre="qwen2")
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'qwen2' is not supported"):
        load_model(path)


def test_metadata_only_read_is_cheap(tmp_path):
    """Opening a GGUF parses the header; the config comes without touching tensor data."""
    ref = hf_reference(CFG)
    path = write_gguf(tmp_path / "m.gguf", CFG, hf_state(ref, CFG), Q.Q8_0)
    g = GGUFFile(path)
    assert g.field("general.architecture") == "llama"
    assert config_from_gguf(g).n_kv_heads == 2
    assert len(g.fields["tokenizer.ggml.tokens"]) == len(toy_vocab()[0])
    model = build_model(config_from_gguf(g), device="meta")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_types_gguf_cannot_write_are_dequantised(tmp_path, qtype):
    """gguf cannot quantise K-types, so write raw blocks and compare with gguf's dequantisation."""
    cfg = CFG.replace(emb_dim=256, hidden_dim=256, n_layers=1)  # rows of whole 256-value blocks
    ref = hf_reference(cfg)
    rng = np.random.default_rng(0)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2 and name != "lm_head.weight":
                rows, cols = p.shape
                # Bytes <= 0x3B keep every fp16 scale finite and below 1.
                data = rng.integers(
                    0, 0x3C, size=(rows, cols // block * block_bytes), dtype=np.uint8
                )
                raw[name] = data
                p.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)))
    blocks = {name: (data, qtype) for name, data in raw.items()}
    path = write_gguf(tmp_path / "k.gguf", cfg, hf_state(ref, cfg), Q.F32, raw_blocks=blocks)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        ours, theirs = load_model(path).model(ids), ref(ids).logits
    # Relative to the logits' size: these weights are far larger than a trained model's, and
    # fp32 sums taken in another order (our small-batch matmul orientation) differ by ~1e-7 of
    # it, where a wrong dequantisation differs by the size of a block's scale.
    assert (ours - theirs).abs().max().item() < 1e-6 * theirs.abs().max().item() + 1e-5


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "smollm"])
def test_gguf_pre_tokenizers_match_transformers(tmp_path, pre):
    ref = hf_reference(CFG)
    write_gguf(tmp_path / "m.gguf", CFG, hf_state(ref, CFG), Q.F32, pre=pre)
    tok = GGUFFile(tmp_path / "m.gguf")
    from instructune.checkpoints.gguf import load_gguf_tokenizer

    ours = load_gguf_tokenizer(tok)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    texts = [
        "hello world  hello\n\n world",
        "It's 2024: 12345!",
        "x\t\ty \u00e9t\u00e9 \u6771\u4eac",
    ]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ours.encode(text)) == text
    # Llama 3 groups digits by three; SmolLM2 one by one (both single tokens in this toy vocab,
    # so the pieces are seen through the pre-tokenizer itself).
    pieces = [p for p, _ in ours.raw.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == {"gpt2": ["12345"], "llama-bpe": ["123", "45"], "smollm": list("12345")}[pre]
