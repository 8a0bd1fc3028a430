"""The serving engine: continuous batching gives every request what it would get alone.

Tiny random models (2 layers, width 64, fp32, CPU) with a sharpened head, so greedy choices are
far from ties. Two ways to drive the engine: by hand (``engine.step()`` in the test's thread, so
the test decides exactly at which step each request joins), and with its own thread and clients
in threads, synchronised on the engine's events (never on sleeps).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from test_generation import PROMPTS as GENERATION_PROMPTS
from test_generation import tiny_model

from instructune.checkpoints.load import LoadedModel
from instructune.generation import ContextLengthError, GenerationError, generate
from instructune.generation.engine import Engine, EngineError, QueueFullError
from instructune.tokenization.gpt2 import GPT2Tokenizer

# test_generation's prompts, and more of them (16 concurrent clients).
PROMPTS = [
    *GENERATION_PROMPTS,
    "Once upon a time, in a land far away, there lived",
    "List the planets",
    "Why?",
    "Rewrite the sentence: the cake was baked by Sarah.",
    "Give an antonym of 'complicated'.",
    "Summarise the plot of Hamlet in one line.",
    "x = 1; y = 2; print(x + y)",
    "Good morning, how are you today?",
    "Explain photosynthesis.",
]


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def tiny_loaded(tok, arch: str = "gpt2") -> LoadedModel:
    """test_generation's tiny model (untied head scaled up, far from ties), loaded."""
    model = tiny_model(arch).eval()
    return LoadedModel(
        model=model,
        tokenizer=tok,
        config=model.cfg,
        prompt_format=None,
        source="test",
        weights="random",
    )


@pytest.fixture(scope="module")
def loaded(tok) -> LoadedModel:
    return tiny_loaded(tok)


def collect(request):
    """(joined text, joined token ids, finish reason, events) of a request."""
    events = list(request.events())
    return (
        "".join(e.text for e in events),
        [t for e in events for t in e.token_ids],
        events[-1].finish_reason,
        events,
    )


def alone(loaded, prompt_ids, **settings):
    """What ``generate`` answers for one prompt on its own."""
    return generate(loaded.model, loaded.tokenizer, [prompt_ids], batch_size=1, **settings)[0]


def settings_for(i: int) -> dict:
    """Different budgets (rows leave at different steps), some seeded sampled requests."""
    settings = {"max_new_tokens": 6 + (7 * i) % 23}
    if i % 3 == 1:
        settings.update(temperature=0.9, top_k=40, seed=100 + i)
    elif i % 3 == 2 and i % 2:
        settings.update(temperature=0.7, top_p=0.9, seed=7 * i)
    return settings


def assert_same_as_alone(loaded, prompt_ids, settings, got):
    want = alone(loaded, prompt_ids, **settings)
    text, ids, finish, events = got
    assert ids == want.token_ids, settings
    assert text == want.text
    assert finish == want.finish_reason
    assert all(e.finish_reason is None for e in events[:-1])
    assert events[-1].prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_requests_joining_at_different_steps_get_what_they_get_alone(tok, arch):
    loaded = tiny_loaded(tok, arch)
    engine = Engine(loaded, max_batch=6, max_queue=64)
    encoded = [tok.encode(p) for p in PROMPTS[:12]]
    requests = []
    # Submit in waves between steps: each wave joins a batch that is already decoding, some
    # wait in the queue for a free row (max_batch 6), rows leave at different steps.
    for wave, steps in ((range(0, 3), 2), (range(3, 7), 5), (range(7, 9), 1), (range(9, 12), 0)):
        for i in wave:
            requests.append(engine.submit(encoded[i], **settings_for(i)))
        for _ in range(steps):
            assert engine.step()
    while engine.step():
        pass
    stats = engine.stats()
    assert stats["running"] == stats["queued"] == 0
    assert stats["finished"] == 12 and stats["joined_running"] >= 4
    assert stats["max_running"] == 6 and stats["near_ties"] == 0
    for i, request in enumerate(requests):
        assert_same_as_alone(loaded, encoded[i], settings_for(i), collect(request))


def test_rows_leaving_together_and_a_long_prompt_joining_keep_every_answer(loaded, tok):
    # The batch's window moves: three rows leave at one step (the last rows fill their holes),
    # a prompt far longer than the running rows joins (the window widens to the left, past the
    # spare columns, so the buffers are laid out again), and long answers outgrow the spare
    # columns on the right. Every request still gets what it gets alone.
    engine = Engine(loaded, max_batch=8, max_queue=64)
    short = [tok.encode(p) for p in PROMPTS[:6]]
    long_prompt = tok.encode(" ".join(PROMPTS))[:100]
    assert len(long_prompt) == 100
    budgets = [3, 9, 3, 40, 3, 12]  # rows 0, 2 and 4 leave together after their 3rd token
    requests = [
        engine.submit(ids, max_new_tokens=b, stop_ids=[])
        for ids, b in zip(short, budgets, strict=True)
    ]
    for _ in range(4):
        assert engine.step()
    assert engine.stats()["running"] == 3
    layouts = engine.stats()["cache_relayouts"]
    late = engine.submit(long_prompt, max_new_tokens=20, stop_ids=[])
    while engine.step():
        pass
    assert engine.stats()["cache_relayouts"] > layouts
    for ids, budget, request in zip(short, budgets, requests, strict=True):
        assert_same_as_alone(
            loaded, ids, {"max_new_tokens": budget, "stop_ids": []}, collect(request)
        )
    assert_same_as_alone(loaded, long_prompt, {"max_new_tokens": 20, "stop_ids": []}, collect(late))


def test_sixteen_concurrent_clients_from_threads(loaded, tok):
    engine = Engine(loaded, max_batch=8, max_queue=64)
    engine.start()
    encoded = [tok.encode(p) for p in PROMPTS]
    results: dict[int, tuple] = {}
    started = [threading.Event() for _ in PROMPTS]

    def client(i: int) -> None:
        request = engine.submit(encoded[i], **{**settings_for(i), "max_new_tokens": 40})
        events = []
        for event in request.events():
            events.append(event)
            started[i].set()
        text = "".join(e.text for e in events)
        results[i] = (text, [t for e in events for t in e.token_ids], events[-1].finish_reason)

    try:
        first = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in first:
            t.start()
        for i in range(6):  # the first clients are being answered: the rest arrive mid-batch
            assert started[i].wait(timeout=60)
        rest = [threading.Thread(target=client, args=(i,)) for i in range(6, 16)]
        for t in rest:
            t.start()
        for t in first + rest:
            t.join(timeout=120)
            assert not t.is_alive()
    finally:
        engine.close()
    for i in range(16):
        settings = {**settings_for(i), "max_new_tokens": 40}
        want = alone(loaded, encoded[i], **settings)
        assert results[i] == (want.text, want.token_ids, want.finish_reason), i
    stats = engine.stats()
    assert stats["finished"] == 16 and stats["cancelled"] == 0 and stats["near_ties"] == 0


def test_cancel_frees_the_row_and_the_others_finish_unchanged(loaded, tok):
    engine = Engine(loaded, max_batch=3, max_queue=8)
    encoded = [tok.encode(p) for p in PROMPTS[:4]]
    requests = [engine.submit(ids, max_new_tokens=30) for ids in encoded]
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 3 and engine.stats()["queued"] == 1
    requests[1].cancel()
    engine.step()  # the cancelled row leaves; the queued request takes its place at once
    stats = engine.stats()
    assert stats["running"] == 3 and stats["queued"] == 0 and stats["cancelled"] == 1
    text, ids, finish, events = collect(requests[1])
    assert finish == "cancelled" and 0 < len(ids) <= 3
    while engine.step():
        pass
    for i in (0, 2, 3):
        assert_same_as_alone(loaded, encoded[i], {"max_new_tokens": 30}, collect(requests[i]))
    assert engine.stats()["finished"] == 4


def test_leaving_the_event_loop_early_cancels(loaded, tok):
    engine = Engine(loaded, max_batch=2)
    request = engine.submit(tok.encode("Hello"), max_new_tokens=100, stop_ids=[])
    for _ in range(5):  # five tokens: some text has come (the model is fixed)
        engine.step()
    for event in request.events():
        assert event.finish_reason is None and event.text
        break  # the client went away
    assert request.cancelled
    assert engine.stats()["running"] == 1
    engine.step()
    assert engine.stats()["running"] == 0 and engine.stats()["cancelled"] == 1
    assert list(request.events())[-1].finish_reason == "cancelled"


def test_queue_full_and_close(loaded, tok):
    engine = Engine(loaded, max_batch=1, max_queue=2)
    waiting = [engine.submit(tok.encode("Hi"), max_new_tokens=5) for _ in range(2)]
    with pytest.raises(QueueFullError) as info:
        engine.submit(tok.encode("Hi"), max_new_tokens=5)
    assert info.value.retry_after >= 1 and "2 requests wait" in str(info.value)
    assert engine.stats()["rejected"] == 1
    engine.close()
    assert [collect(r)[2] for r in waiting] == ["cancelled", "cancelled"]
    with pytest.raises(EngineError, match="closed"):
        engine.submit(tok.encode("Hi"))


def test_stop_strings_and_end_tokens(loaded, tok):
    engine = Engine(loaded, max_batch=4)
    prompt = tok.encode(PROMPTS[2])
    free = alone(loaded, prompt, max_new_tokens=30, stop_ids=[])
    assert free.finish_reason == "length"
    stop_string = free.text[12:15]
    end = free.token_ids[8]
    # Two whole tokens: the first is held back entirely, then the second completes the stop.
    two_tokens = tok.decode(free.token_ids[5:7])
    cases = [
        {"max_new_tokens": 30, "stop_strings": [stop_string], "stop_ids": []},
        {"max_new_tokens": 30, "stop_strings": [two_tokens], "stop_ids": []},
        {"max_new_tokens": 30, "stop_ids": [end]},
        {"max_new_tokens": 30, "stop_ids": [], "stop_strings": ["no such text"]},
    ]
    requests = [engine.submit(prompt, **c) for c in cases]
    while engine.step():
        pass
    got = [collect(r) for r in requests]
    for case, result in zip(cases, got, strict=True):
        assert_same_as_alone(loaded, prompt, case, result)
    assert [g[2] for g in got] == ["stop", "stop", "eos", "length"]
    assert stop_string not in got[0][0]
    # The stop string's start was held back: no piece ever showed text past the cut.
    shown = ""
    for event in got[0][3]:
        shown += event.text
        assert got[0][0].startswith(shown)
    assert got[2][3][-1].completion_tokens == len(got[2][1]) + 1  # the end token took a step


def test_aevents_and_timings(loaded, tok):
    engine = Engine(loaded, max_batch=4)
    engine.start()
    prompts = [tok.encode(p) for p in PROMPTS[:4]]

    async def one(ids):
        request = engine.submit(ids, max_new_tokens=12)
        return [event async for event in request.aevents()]

    async def main():
        return await asyncio.gather(*(one(ids) for ids in prompts))

    try:
        answers = asyncio.run(main())
    finally:
        engine.close()
    for ids, events in zip(prompts, answers, strict=True):
        want = alone(loaded, ids, max_new_tokens=12)
        assert "".join(e.text for e in events) == want.text
        last = events[-1]
        assert last.finish_reason == "length" and last.completion_tokens == 12
        assert last.prefill_s > 0 and last.decode_s > 0 and last.queued_s >= 0


def test_penalties_do_not_depend_on_neighbours(loaded, tok):
    prompt = tok.encode(PROMPTS[7])
    penalised = {"max_new_tokens": 25, "repeat_penalty": 1.3, "frequency_penalty": 0.5,
                 "presence_penalty": 0.4}  # fmt: skip
    solo = Engine(loaded, max_batch=1)
    request = solo.submit(prompt, **penalised)
    while solo.step():
        pass
    want = collect(request)
    engine = Engine(loaded, max_batch=5)
    others = [engine.submit(tok.encode(p), max_new_tokens=10) for p in PROMPTS[:3]]
    engine.step()
    request = engine.submit(prompt, **penalised)
    while engine.step():
        pass
    assert collect(request)[:3] == want[:3]
    assert all(collect(r)[2] == "length" for r in others)


@pytest.mark.parametrize(
    ("prompt", "settings", "match"),
    [
        ([1, 2], {"temperature": -1}, "temperature"),
        ([1, 2], {"top_p": 1.5}, "top_p"),
        ([1, 2], {"top_k": 0}, "top_k"),
        ([1, 2], {"max_new_tokens": -1}, "max_new_tokens"),
        ([1, 2], {"repeat_penalty": 0}, "repeat_penalty"),
        ([1, 2], {"frequency_penalty": 3}, "frequency_penalty"),
        ([], {}, "empty"),
        ([1, 99999999], {}, "outside the model's vocabulary"),
    ],
)
def test_bad_settings_are_clear_errors(loaded, prompt, settings, match):
    engine = Engine(loaded)
    with pytest.raises(GenerationError, match=match):
        engine.submit(prompt, **{"max_new_tokens": 10, **settings})
    assert engine.stats()["queued"] == 0


def test_a_prompt_too_long_for_the_context(loaded):
    engine = Engine(loaded)
    with pytest.raises(ContextLengthError, match="context length of 128"):
        engine.submit([1] * 100, max_new_tokens=40)


def test_generate_continuous_answers_as_generate_does(loaded, tok):
    from instructune.generation.refill import generate_continuous

    encoded = [tok.encode(p) for p in PROMPTS[:10]]
    for settings in ({}, {"temperature": 0.8, "top_k": 20, "seed": 5}):
        want = generate(loaded.model, tok, encoded, max_new_tokens=20, batch_size=4, **settings)
        got = generate_continuous(loaded, encoded, max_batch=4, max_new_tokens=20, **settings)
        assert got == want
    # Mid-training (the per-epoch sample) the model goes back to training mode afterwards.
    loaded.model.train()
    try:
        assert generate_continuous(loaded, encoded[:2], max_new_tokens=3) == generate(
            loaded.model, tok, encoded[:2], max_new_tokens=3
        )
        assert loaded.model.training
    finally:
        loaded.model.eval()
    # A prompt too long for the context is cropped from the left, as generate does.
    with pytest.warns(UserWarning, match="dropped its first"):
        (cropped,) = generate_continuous(loaded, [list(range(1, 121))], max_new_tokens=20)
    assert cropped.prompt_tokens == 108 and len(cropped.token_ids) == 20


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_prefix_shared_with_an_earlier_prompt_is_reused(tok, arch):
    loaded = tiny_loaded(tok, arch)
    preamble = "Below is an instruction that describes a task.\n\n### Instruction:\n"
    tails = ["Name a colour.", "Say hi", "Add 2 and 2, then explain.", "Why?", "List three fruits"]
    encoded = [tok.encode(preamble + t) for t in tails] + [tok.encode("Unrelated start")]
    engine = Engine(loaded, max_batch=4)
    requests = [engine.submit(encoded[0], max_new_tokens=15)]
    engine.step()
    requests += [engine.submit(ids, max_new_tokens=9 + i) for i, ids in enumerate(encoded[1:])]
    while engine.step():
        pass
    # Four later prompts start with the first one's preamble (and the unrelated one does not).
    assert engine.stats()["prefix_reused_tokens"] >= 4 * len(tok.encode(preamble)) - 4
    for i, request in enumerate(requests):
        settings = {"max_new_tokens": 15 if i == 0 else 8 + i}
        assert_same_as_alone(loaded, encoded[i], settings, collect(request))


def test_ids_held_back_with_a_stop_string_are_not_sent(tok):
    # A scripted model answers "Hello world\n" "\n\n" "X end...": at "\n\n" the first "\n" is
    # released but "\n\n" may start the stop string "\n\nX", so that token is held back; the
    # stop then cuts before it, and its id must not have been sent either.
    from test_generation import chain, scripted_model

    model = scripted_model(chain([31373, 15496, 995, 198, 628, 55, 886]))
    loaded = LoadedModel(
        model=model, tokenizer=tok, config=model.cfg, prompt_format=None, source="t", weights="-"
    )
    engine = Engine(loaded)
    settings = {"max_new_tokens": 10, "stop_strings": ["\n\nX"], "stop_ids": []}
    request = engine.submit([31373], **settings)
    while engine.step():
        pass
    text, ids, finish, events = collect(request)
    assert (text, ids, finish) == ("Hello world\n", [15496, 995, 198], "stop")
    assert_same_as_alone(loaded, [31373], settings, (text, ids, finish, events))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_joining_prompts_run_in_the_same_model_call_as_the_running_rows(tok, arch):
    # A step with running rows and joining prompts is one model call (the weights are read once),
    # and gives the logits the two separate calls give: running rows (one of them padded, as a
    # later joiner is) first, then the joining prompts (sharing the kept prefix, of unequal
    # lengths, so they are left-padded).
    from instructune.generation.continuous import ContinuousBatch

    model = tiny_model(arch).eval()
    calls = []
    model.forward_hidden = _counted(model.forward_hidden, calls)
    first = [tok.encode(p) for p in PROMPTS[:2]]
    later = [tok.encode(p) for p in PROMPTS[2:3]]
    kept = PROMPTS[2]  # the latest prefill that reused nothing is kept
    joining = [tok.encode(kept + " and more"), tok.encode(kept + ", then " + PROMPTS[5])]
    batches = [ContinuousBatch(model, pad_id=0) for _ in range(2)]
    for batch in batches:
        batch.step(first)
        batch.accept(torch.tensor([11, 12]))
        batch.step(later)
        batch.accept(torch.tensor([13, 14, 15]))
    calls.clear()
    joint, _ = batches[0].step(joining)
    assert len(calls) == 1
    with torch.inference_mode():  # as step() runs them
        apart = torch.cat([batches[1]._advance(), batches[1]._prefill(joining)])
    assert len(calls) == 3
    assert batches[0].reused_tokens == batches[1].reused_tokens > 0
    torch.testing.assert_close(joint, apart, rtol=1e-5, atol=1e-5)
    # Both batches hold the same rows afterwards: the next step agrees too.
    for batch in batches:
        batch.accept(torch.arange(5) + 20)
    torch.testing.assert_close(batches[0].step([])[0], batches[1].step([])[0], rtol=1e-5, atol=1e-5)


def _counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper
