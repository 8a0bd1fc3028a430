"""generate() and stream(): cache, batching, sampling, stopping, context, streaming.

Two kinds of tiny real models are used: random ones (2 layers, width 64) with a sharpened head,
so greedy choices are not near-ties; and "scripted" ones, GPT-2s whose weights are set so that
greedy decoding follows a chosen chain of tokens. The scripted models make stop strings, end
tokens and multi-byte characters happen exactly when a test needs them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from instructune.generation import (
    ContextLengthError,
    GenerationError,
    GenerationResult,
    generate,
    stream,
)
from instructune.generation.text import held_back
from instructune.models import build_model, get_config
from instructune.tokenization.gpt2 import GPT2Tokenizer

EOS = 50256
PROMPTS = [
    "Below is an instruction that describes a task. Write a response.",
    "Hi",
    "The quick brown fox jumps over",
    "A",
    "Name three colours of the rainbow, please, and say why the sky is blue.",
    "What is 2 + 2?",
    "Translate 'good morning' into German.",
]


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def tiny_model(arch: str = "gpt2", *, seed: int = 0, context_length: int = 128):
    """A random 2-layer model whose untied head is scaled up, so logits are far from ties."""
    name = "gpt2" if arch == "gpt2" else "smollm2-135m"
    overrides = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=context_length)
    if arch == "llama":
        overrides.update(n_kv_heads=2, hidden_dim=128, vocab_size=50257)
    torch.manual_seed(seed)
    model = build_model(get_config(name, tie_embeddings=False, **overrides))
    with torch.no_grad():
        model.out_head.weight.mul_(30)
    return model


def scripted_model(successor: dict[int, int], *, context_length: int = 64):
    """A real GPT-2 whose greedy next token after ``a`` is ``successor[a]``.

    The blocks are zeroed (each is then the identity) and positions are zero, so the final
    hidden state is the normalised embedding of the current token; head row ``b`` is the sum of
    the normalised embeddings of the tokens that ``b`` follows, which makes ``b`` win by far.
    """
    torch.manual_seed(0)
    cfg = get_config(
        "gpt2", n_layers=1, emb_dim=64, n_heads=4, context_length=context_length,
        tie_embeddings=False,
    )  # fmt: skip
    model = build_model(cfg)
    with torch.no_grad():
        model.tok_emb.weight.normal_()
        model.pos_emb.weight.zero_()
        for block in model.blocks:
            for layer in (block.attn.proj, block.ff.proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.out_head.weight.zero_()
        normed = F.layer_norm(model.tok_emb.weight, (64,))
        for a, b in successor.items():
            model.out_head.weight[b] += 10 * normed[a]
    return model


def chain(ids: list[int], end: int | None = None) -> dict[int, int]:
    """successor map following ``ids`` in order, then ``end``."""
    assert len(set(ids)) == len(ids), "a chain needs distinct tokens"
    steps = dict(zip(ids, ids[1:], strict=False))
    if end is not None:
        steps[ids[-1]] = end
    return steps


def with_end(result: GenerationResult, end_id: int = EOS) -> list[int]:
    return result.token_ids + ([end_id] if result.finish_reason == "eos" else [])


def greedy_differences(model, tokenizer, prompts, got, want, *, tol=1e-4):
    """Compare two greedy runs; for each prompt that differs, find the first step that does
    and the top two logits there (one-at-a-time prefix). Returns (record, step, l1, l2) rows."""
    rows = []
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        a_ids, b_ids = with_end(a, tokenizer.eos_id), with_end(b, tokenizer.eos_id)
        if a_ids == b_ids:
            continue
        step = next(
            (i for i, (x, y) in enumerate(zip(a_ids, b_ids, strict=False)) if x != y),
            min(len(a_ids), len(b_ids)),
        )
        prompt = prompts[k]
        prefix = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
            prefix = [tokenizer.bos_id, *prefix]
        with torch.inference_mode():
            logits = model(torch.tensor([prefix + b_ids[:step]]))[0, -1].float()
        top = torch.topk(logits, 2).values.tolist()
        rows.append((k, step, top[0], top[1]))
    too_far = [r for r in rows if r[2] - r[3] > tol]
    assert not too_far, f"greedy outputs differ beyond a near-tie: {too_far}"
    return rows


# ---------------------------------------------------------------------------------------------
# Cache and batching


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_and_no_cache_give_the_same_greedy_answers(tok, arch):
    model = tiny_model(arch)
    cached = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    recomputed = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 12 for r in cached)
    assert len({tuple(r.token_ids) for r in cached}) > 1  # not a degenerate model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_equals_one_at_a_time(tok, arch):
    model = tiny_model(arch, seed=1)
    batched = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    ties = greedy_differences(model, tok, PROMPTS, batched, single)
    if ties:
        print(f"near-ties (record, step, top logit, second): {ties}")
    assert [r.prompt_tokens for r in batched] == [len(tok.encode(p)) for p in PROMPTS]


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading ids every row shares, short of the shortest row's last id."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_shared_prefix_is_run_once_and_changes_nothing(tok, arch):
    model = tiny_model(arch, seed=4)
    preamble = "Below is an instruction that describes a task. Write a response.\n\n"
    prompts = [preamble + p for p in PROMPTS]
    ids = [tok.encode(p) for p in prompts]
    shared = common_prefix(ids)
    assert shared >= len(tok.encode(preamble.rstrip())) > 10
    # Every token id the model embeds, row by row, during one prefill of the whole batch.
    embedded: list[list[int]] = []
    hook = model.tok_emb.register_forward_hook(lambda _m, a, _o: embedded.extend(a[0].tolist()))
    try:
        generate(model, tok, ids, max_new_tokens=1, batch_size=len(ids))
    finally:
        hook.remove()
    # The prefix runs once, alone; then each row runs only its own rest (left-padded with EOS).
    assert embedded[0] == ids[0][:shared]
    rests = [row[next(k for k, t in enumerate(row) if t != EOS) :] for row in embedded[1:]]
    assert sorted(rests) == sorted(p[shared:] for p in ids)
    # And it changes no answer.
    batched = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    ties = greedy_differences(model, tok, prompts, batched, single)
    if ties:
        print(f"near-ties (record, step, top logit, second): {ties}")


def test_rows_that_finish_early_leave_the_others_unchanged(tok):
    # One chain; prompts start at different points of it, so rows end at different steps and
    # are dropped from the batch while the others go on.
    ids = tok.encode(" one two three four five six seven eight nine ten")
    model = scripted_model(chain(ids, end=EOS))
    prompts = [[t] for t in ids]
    batched = generate(model, tok, prompts, max_new_tokens=20, batch_size=8)
    for k, result in enumerate(batched):
        assert result.token_ids == ids[k + 1 :]
        assert result.finish_reason == "eos"
    single = [generate(model, tok, [p], max_new_tokens=20)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    # The same without a cache (rows are dropped from the recomputed sequences).
    recomputed = generate(model, tok, prompts, max_new_tokens=20, batch_size=8, use_cache=False)
    assert [r.token_ids for r in recomputed] == [r.token_ids for r in batched]


def test_generation_restores_training_mode(tok):
    model = tiny_model()
    model.train()
    generate(model, tok, ["Hi"], max_new_tokens=2)
    assert model.training
    model.eval()
    list(stream(model, tok, "Hi", max_new_tokens=2))
    assert not model.training


# ---------------------------------------------------------------------------------------------
# Sampling


def test_same_seed_same_answers_whatever_the_batch_size(tok):
    model = tiny_model()
    options = dict(max_new_tokens=10, temperature=1.0, top_k=50)
    first = generate(model, tok, PROMPTS, seed=7, batch_size=4, **options)
    again = generate(model, tok, PROMPTS, seed=7, batch_size=1, **options)
    other = generate(model, tok, PROMPTS, seed=8, batch_size=4, **options)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    greedy = generate(model, tok, PROMPTS, max_new_tokens=10)
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]


def test_one_seed_per_prompt(tok):
    # answer_records seeds each record by its index, so its answer never depends on its batch.
    model = tiny_model()
    options = dict(max_new_tokens=6, temperature=1.0)
    by_offset = generate(model, tok, PROMPTS[:4], seed=7, **options)
    by_prompt = generate(model, tok, PROMPTS[:4], seed=[7, 8, 9, 10], batch_size=2, **options)
    assert [r.token_ids for r in by_prompt] == [r.token_ids for r in by_offset]
    (third,) = generate(model, tok, PROMPTS[2:3], seed=[9], **options)
    assert third.token_ids == by_offset[2].token_ids
    with pytest.raises(GenerationError, match="2 seeds for 4 prompts"):
        generate(model, tok, PROMPTS[:4], seed=[1, 2], **options)


def test_top_k_one_and_a_tiny_top_p_are_greedy(tok):
    model = tiny_model(seed=2)
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8)
    top_k = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=5.0, top_k=1, seed=1)
    top_p = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=5.0, top_p=1e-6, seed=1)
    assert [r.token_ids for r in top_k] == [r.token_ids for r in greedy]
    assert [r.token_ids for r in top_p] == [r.token_ids for r in greedy]


def test_sampling_at_high_temperature_spreads_over_tokens(tok):
    # A sanity check that sampling samples: at temperature 100 the answers vary a lot.
    model = tiny_model()
    results = generate(model, tok, ["Hi"] * 4, max_new_tokens=6, temperature=100.0, seed=0)
    assert len({tuple(r.token_ids) for r in results}) == 4


@pytest.mark.parametrize(
    "options",
    [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(batch_size=0)],
)
def test_bad_settings_are_refused_clearly(tok, options):
    with pytest.raises(GenerationError):
        generate(tiny_model(), tok, ["Hi"], max_new_tokens=2, **options)


def test_a_single_string_is_refused(tok):
    with pytest.raises(GenerationError, match="list"):
        generate(tiny_model(), tok, "Hi", max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# Stopping


def test_stops_at_the_end_token_which_is_not_in_the_answer(tok):
    ids = tok.encode("The answer is 42.")
    model = scripted_model(chain(ids, end=EOS))
    (result,) = generate(model, tok, [ids[:1]], max_new_tokens=50)
    assert result == GenerationResult(tok.decode(ids[1:]), ids[1:], "eos", 1)


def test_several_end_tokens(tok):
    ids = tok.encode(" alpha beta gamma delta")
    model = scripted_model(chain(ids))  # no end token: the chain stops at " delta"
    other_end = ids[-1]
    (result,) = generate(model, tok, [ids[:1]], max_new_tokens=50, stop_ids=[EOS, other_end])
    assert result.finish_reason == "eos"
    assert result.token_ids == ids[1:-1]


def test_stop_string_is_cut_from_the_text(tok):
    ids = tok.encode("Answer - yes, surely.\n### Instruction: go on")
    model = scripted_model(chain(ids, end=EOS))
    (result,) = generate(
        model, tok, [ids[:1]], max_new_tokens=50, stop_strings=["\n### Instruction:"]
    )
    assert result.finish_reason == "stop"
    assert result.text == " - yes, surely."
    # The token ids cover exactly what led to the text, not the rest of the answer.
    assert tok.decode(result.token_ids).startswith(result.text)
    assert len(result.token_ids) < len(ids) - 3


def test_max_new_tokens(tok):
    model = tiny_model()
    results = generate(model, tok, PROMPTS[:3], max_new_tokens=5)
    assert all(len(r.token_ids) == 5 and r.finish_reason == "length" for r in results)
    (none,) = generate(model, tok, ["Hi"], max_new_tokens=0)
    assert none == GenerationResult("", [], "length", 1)


def test_end_token_beats_the_token_budget(tok):
    ids = tok.encode(" a b c")
    model = scripted_model(chain(ids, end=EOS))
    (result,) = generate(model, tok, [ids[:1]], max_new_tokens=len(ids) - 1)
    assert result.finish_reason == "length" and result.token_ids == ids[1:]
    (result,) = generate(model, tok, [ids[:1]], max_new_tokens=len(ids))
    assert result.finish_reason == "eos" and result.token_ids == ids[1:]


# ---------------------------------------------------------------------------------------------
# Context length


def test_long_prompt_is_cropped_from_the_left_with_a_warning(tok):
    model = tiny_model(context_length=32)
    prompt = list(range(100, 140))  # 40 tokens
    with pytest.warns(UserWarning, match="dropped its first 16 of 40 tokens"):
        (cropped,) = generate(model, tok, [prompt], max_new_tokens=8)
    assert cropped.prompt_tokens == 24 and len(cropped.token_ids) == 8
    (same,) = generate(model, tok, [prompt[16:]], max_new_tokens=8)
    assert same.token_ids == cropped.token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, tok, [prompt[:24]], max_new_tokens=8)  # fits exactly: no warning


def test_long_prompt_is_refused_with_context_error(tok):
    model = tiny_model(context_length=32)
    with pytest.raises(ContextLengthError, match="prompt 1 has 40 tokens.*context length of 32"):
        generate(model, tok, [[1, 2], list(range(40))], max_new_tokens=8, context="error")
    with pytest.raises(ContextLengthError, match="no room"):
        generate(model, tok, [[1, 2]], max_new_tokens=32)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tok, [[]], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_pieces_join_to_the_generated_text(tok):
    model = tiny_model(seed=3)
    for prompt in PROMPTS[:3]:
        pieces = list(stream(model, tok, prompt, max_new_tokens=15))
        assert len(pieces) > 1
        assert "".join(pieces) == generate(model, tok, [prompt], max_new_tokens=15)[0].text
    sampled = list(stream(model, tok, "Hi", max_new_tokens=15, temperature=1.0, seed=4))
    again = generate(model, tok, ["Hi"], max_new_tokens=15, temperature=1.0, seed=4)[0]
    assert "".join(sampled) == again.text


def _byte_tokens(tok, char: str) -> list[int]:
    """The single-byte token ids that spell ``char`` (each alone decodes to U+FFFD)."""
    for i in range(256):
        text = tok.decode([i])
        if text != "\ufffd":
            continue
        for j in range(256):
            if tok.decode([i, j]) == char:
                return [i, j]
    raise AssertionError(f"no two byte tokens spell {char!r}")


def test_stream_never_yields_half_a_multibyte_character(tok):
    lead, tail = _byte_tokens(tok, "é")
    space = tok.encode(" x")[0]
    # " x", then the two halves of "é", then " x" again...
    model = scripted_model({space: lead, lead: tail, tail: space})
    pieces = list(stream(model, tok, [space], max_new_tokens=12))
    full = generate(model, tok, [[space]], max_new_tokens=12)[0]
    assert full.text == "é xé xé xé x"
    assert "".join(pieces) == full.text
    assert not any("\ufffd" in p for p in pieces)
    # Cut after the first half of "é": the last, incomplete character is all that is held back.
    (cut,) = generate(model, tok, [[space]], max_new_tokens=4)
    assert cut.text == "é x\ufffd"
    assert "".join(stream(model, tok, [space], max_new_tokens=4)) == cut.text


def test_stream_holds_back_a_possible_stop_string_and_cuts_it(tok):
    ids = tok.encode("Sure, yes\n### Instruction: more")
    model = scripted_model(chain(ids, end=EOS))
    stops = ["\n### Instruction:"]
    pieces = list(stream(model, tok, ids[:1], max_new_tokens=50, stop_strings=stops))
    assert "".join(pieces) == ", yes"
    assert not any("#" in p or "\n" in p for p in pieces)


def test_held_back():
    assert held_back("abc", []) == 0
    assert held_back("ab\ufffd\ufffd", []) == 2
    assert held_back("done\n##", ["\n### Instruction:"]) == 3
    assert held_back("done\n# x", ["\n### Instruction:"]) == 0
    assert held_back("ok <|im", ["<|im_end|>", "<|user|>"]) == 4


@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_encode_prompt_gives_one_bos_and_the_ids_training_saw(bos_tokenizer_dir, style):
    from instructune.data.dataset import tokenize_record
    from instructune.data.prompts import format_prompt
    from instructune.generation import encode_prompt
    from instructune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(bos_tokenizer_dir)
    bos = tokenizer.bos_id
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    prompt = format_prompt(record, style, chat_template=tokenizer.chat_template)
    # The chat template renders BOS (<|im_start|>) as text; alpaca's prompt has none.
    assert (tokenizer.encode(prompt)[:1] == [bos]) == (style == "chat")

    ids = encode_prompt(tokenizer, prompt)
    assert ids[0] == bos and ids[1] != bos
    assert ids == tokenize_record(record, tokenizer, style).ids[: len(ids)]
    assert encode_prompt(tokenizer, prompt, add_bos=False) == tokenizer.encode(prompt)


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct (loads a 270 MB GGUF: marked, and kept to two tests)


@pytest.fixture(scope="module")
def smollm2():
    from instructune.checkpoints import load_model

    return load_model("smollm2-135m-instruct")


@pytest.mark.embedded
def test_embedded_model_answers_an_antonym_question(smollm2):
    from instructune.data.prompts import extract_response, format_prompt
    from instructune.generation import stop_ids_for

    record = {"instruction": "What is an antonym of 'complicated'?", "input": ""}
    prompt = format_prompt(record, "alpaca")
    (result,) = generate(
        smollm2.model, smollm2.tokenizer, [prompt], max_new_tokens=40,
        stop_ids=stop_ids_for(smollm2),
    )  # fmt: skip
    answer = extract_response(result.text, "alpaca").lower()
    assert result.finish_reason == "eos", result
    assert any(w in answer for w in ("simple", "easy", "uncomplicated", "straightforward")), answer


@pytest.mark.embedded
def test_embedded_batched_greedy_equals_one_at_a_time(smollm2):
    from instructune.data.prompts import format_prompt

    model, tok = smollm2.model, smollm2.tokenizer
    records = [
        ("Name a primary colour.", ""),
        ("Convert the sentence to passive voice.", "The chef cooked a delicious meal for the guests."),
        ("What is the capital of France?", ""),
        ("Summarise the text in one sentence.", "The meeting was moved from Monday to Wednesday "
         "because the manager was travelling; everyone should bring the quarterly figures."),
        ("Give a synonym for 'happy'.", ""),
        ("Translate to German.", "Good morning, how are you?"),
        ("List three fruits.", ""),
        ("Correct the spelling.", "I recieved the pakage yesturday."),
    ]  # fmt: skip
    prompts = [format_prompt({"instruction": i, "input": x}, "alpaca") for i, x in records]
    lengths = {len(tok.encode(p)) for p in prompts}
    assert max(lengths) - min(lengths) > 20  # varied lengths: real left-padding
    options = dict(max_new_tokens=24, stop_ids=[tok.eos_id])
    batched = generate(model, tok, prompts, batch_size=8, **options)
    single = [generate(model, tok, [p], **options)[0] for p in prompts]
    ties = greedy_differences(model, tok, prompts, batched, single)
    if ties:
        message = f"batched vs one-at-a-time near-ties (record, step, top, second): {ties}"
        warnings.warn(message, stacklevel=1)
