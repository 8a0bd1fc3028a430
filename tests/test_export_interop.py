"""Exports checked by the real engines: llama.cpp (llama-cpp-python) and Go's text/template
(Ollama's template engine). Each test skips with the reason when its engine is missing;
``make test-interop`` installs Go and runs them all.

Figures are printed (run with ``-s`` to see them): token-id equality, the share of greedy
answers equal to ours (f32, and q8_0), and the logit margin behind every difference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_export_gguf import (
    EXTRA_RECORDS,
    STYLE_IDS,
    TEXTS,
    demo_test_records,
    exported_gpt2,
    style_cases,
)

from instructune.checkpoints.gguf_export import export_gguf
from instructune.checkpoints.modelfile import modelfile_text
from instructune.checkpoints.prompt_templates import (
    chat_message,
    jinja_chat_template,
    prompt_pieces,
)
from instructune.data.prompts import format_prompt, prompt_format_for
from instructune.generation import generate
from instructune.tokenization.base import encode_prompt

pytestmark = pytest.mark.interop
GO_PROGRAM = Path(__file__).resolve().parent / "go" / "render_template.go"
NEW_TOKENS = 16
NEAR_TIE = 0.05  # logit margin under which two engines may pick different tokens (f32)


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (make test-interop installs it)")
    return llama_cpp


def open_llama(path: Path, n_ctx: int):
    llama_cpp = llama_cpp_or_skip()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=1,
        n_threads_batch=1,  # its default (every core) spins for seconds on a shared machine
        verbose=False,
        seed=0,
    )


def llama_greedy(llm, ids: list[int], eos: int) -> list[int]:
    """llama.cpp's greedy answer, at most NEW_TOKENS tokens: the argmax of the logits llama.cpp
    computes (llama-cpp-python's own sampler is the same at temperature 0, only slower)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < NEW_TOKENS:
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        token = int(np.argmax(row))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def compare_greedy(loaded, llm, prompts: list[str]) -> tuple[float, list[str]]:
    """Share of prompts whose greedy answers are equal, and one note per difference (with our
    logit margin between the two tokens at the first place they part)."""
    eos = loaded.prompt_format.eos_id
    all_ids = [
        encode_prompt(loaded.tokenizer, p, add_bos=loaded.prompt_format.add_bos) for p in prompts
    ]
    ours = generate(
        loaded.model, loaded.tokenizer, all_ids, max_new_tokens=NEW_TOKENS, stop_ids=[eos]
    )
    equal, notes = 0, []
    for ids, mine in zip(all_ids, ours, strict=False):
        theirs = llama_greedy(llm, ids, eos)
        if theirs == mine.token_ids:
            equal += 1
            continue
        k = next(
            (i for i, (a, b) in enumerate(zip(mine.token_ids, theirs, strict=False)) if a != b),
            min(len(mine.token_ids), len(theirs)),
        )
        with torch.no_grad():
            row = loaded.model(torch.tensor([ids + mine.token_ids[:k]]))[0, -1]
        a = mine.token_ids[k] if k < len(mine.token_ids) else eos
        b = theirs[k] if k < len(theirs) else eos
        notes.append(f"token {k}: ours {a}, llama.cpp {b}, margin {(row[a] - row[b]).item():.4g}")
    return equal / len(prompts), notes


def margins(notes: list[str]) -> list[float]:
    return [float(n.rsplit(" ", 1)[1]) for n in notes]


# --- llama.cpp ----------------------------------------------------------------------------------


@pytest.fixture
def gpt2_llama_cpp(tmp_path_factory):
    """The tiny GPT-2 and its f32 / q8_0 exports (made once, shared with test_export_gguf)."""
    llama_cpp_or_skip()
    loaded, exports = exported_gpt2(tmp_path_factory)
    return loaded, {t: e.gguf for t, e in exports.items()}


def test_llama_cpp_tokenizer_gives_our_ids(gpt2_llama_cpp):
    loaded, files = gpt2_llama_cpp
    llm = open_llama(files["f32"], 512)
    texts = TEXTS + [format_prompt(r) for r in demo_test_records()]
    same = sum(
        llm.tokenize(t.encode(), add_bos=False, special=True) == loaded.tokenizer.encode(t)
        for t in texts
    )
    print(f"llama.cpp token ids equal ours (GPT-2 BPE): {same}/{len(texts)} texts")
    assert same == len(texts)


def test_llama_cpp_greedy_answers_equal_ours(gpt2_llama_cpp):
    """f32: >= 95% of the demo test prompts answer identically, differences only at near ties;
    q8_0's share is reported."""
    loaded, files = gpt2_llama_cpp
    prompts = [format_prompt(r) for r in demo_test_records()]
    share, notes = compare_greedy(loaded, open_llama(files["f32"], 512), prompts)
    print(f"llama.cpp f32 greedy = ours on {share:.1%} of {len(prompts)} prompts; {notes}")
    assert share >= 0.95
    assert all(abs(m) < NEAR_TIE for m in margins(notes)), notes
    q8_share, q8_notes = compare_greedy(loaded, open_llama(files["q8_0"], 512), prompts)
    print(f"llama.cpp q8_0 greedy = our fp32 on {q8_share:.1%} of {len(prompts)} prompts")


def test_llama_cpp_chat_template_renders_our_prompt(gpt2_llama_cpp):
    """llama-cpp-python's chat formatting with the GGUF's chat_template gives our prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    loaded, files = gpt2_llama_cpp
    llm = open_llama(files["f32"], 512)
    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=eos)
    pieces = prompt_pieces(loaded.prompt_format)
    for record in demo_test_records() + EXTRA_RECORDS:
        message = chat_message(record, pieces)
        messages = [{"role": "user", "content": message["prompt"]}]
        assert formatter(messages=messages).prompt == format_prompt(record)


def test_llama_cpp_formats_a_trained_system_prompt_as_we_prompt():
    """The chat template a GGUF of a model trained with --system-prompt '' carries, in
    llama-cpp-python's own Jinja formatting: our prompts, with or without a system turn."""
    llama_cpp_or_skip()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt, template = style_cases()[3]
    formatter = Jinja2ChatFormatter(
        template=jinja_chat_template(fmt, template), eos_token="<|im_end|>", bos_token=""
    )
    pieces = prompt_pieces(fmt, template)
    for record in demo_test_records() + EXTRA_RECORDS:
        message = chat_message(record, pieces)
        messages = [{"role": "user", "content": message["prompt"]}]
        if message["system"]:
            messages.insert(0, {"role": "system", "content": message["system"]})
        want = format_prompt(record, "chat", chat_template=template, system_prompt="")
        assert formatter(messages=messages).prompt == want


@pytest.mark.embedded
def test_embedded_smollm2_f32_in_llama_cpp(tmp_path):
    """The real check: SmolLM2-135M-Instruct exported f32, its own chat format, in llama.cpp."""
    llama_cpp_or_skip()  # before any llama_cpp import: without it, this test skips
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from instructune.checkpoints import load_model

    loaded = load_model("smollm2-135m-instruct", log=None)
    loaded.prompt_format = prompt_format_for(loaded.tokenizer, "chat")
    path = export_gguf(loaded, tmp_path, gguf_type="f32", name="smollm2").gguf
    llm = open_llama(path, 1024)
    records = demo_test_records()[:3]
    prompts = [
        format_prompt(r, "chat", chat_template=loaded.tokenizer.chat_template) for r in records
    ]
    for text in prompts + TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == loaded.tokenizer.encode(
            text
        ), text
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token=""
    )
    pieces = prompt_pieces(loaded.prompt_format, loaded.tokenizer.chat_template)
    for record, prompt in zip(records, prompts, strict=False):
        message = chat_message(record, pieces)
        assert formatter(messages=[{"role": "user", "content": message["prompt"]}]).prompt == prompt
    share, notes = compare_greedy(loaded, llm, prompts)
    print(f"SmolLM2 f32: llama.cpp greedy = ours on {share:.0%} of {len(prompts)} prompts; {notes}")
    assert share >= 0.75 and all(abs(m) < NEAR_TIE for m in margins(notes)), notes


# --- Go text/template (Ollama) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """The Go program, built once (``go build``), as a path to run."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (apt-get install -y golang-go; make test-interop does)")
    out = tmp_path_factory.mktemp("go")
    env = dict(os.environ)
    if "GOCACHE" not in env and not env.get("HOME"):
        env["GOCACHE"] = str(out / "cache")
    binary = out / "render_template"
    subprocess.run(
        [go, "build", "-o", str(binary), str(GO_PROGRAM)], check=True, env=env, cwd=out, timeout=300
    )
    return binary


def go_render(binary: Path, modelfile: Path, exchanges: list[dict]) -> list[str]:
    done = subprocess.run(
        [str(binary), str(modelfile)],
        input=json.dumps(exchanges),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


def embedded_chat_case():
    """SmolLM2's own chat template (with its default system prompt), when the package is here."""
    from instructune.checkpoints.gguf import GGUFFile, load_gguf_tokenizer
    from instructune.checkpoints.resolve import embedded_gguf_path
    from instructune.errors import ModelLoadError

    try:
        tok = load_gguf_tokenizer(GGUFFile(embedded_gguf_path()))
    except ModelLoadError:
        return pytest.param(None, marks=pytest.mark.skip(reason="embedded model not installed"))
    return (prompt_format_for(tok, "chat"), tok.chat_template)


@pytest.mark.parametrize(
    "case", [*style_cases(), embedded_chat_case()], ids=[*STYLE_IDS, "smollm2"]
)
def test_go_renders_the_modelfile_template_as_we_prompt(go_renderer, tmp_path, case):
    """Every demo test record (and a few odd ones): Go's rendering == format_prompt, exactly."""
    fmt, template = case
    pieces = prompt_pieces(fmt, template)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(modelfile_text("m.gguf", fmt, pieces, context_length=2048))
    records = demo_test_records() + EXTRA_RECORDS
    rendered = go_render(go_renderer, modelfile, [chat_message(r, pieces) for r in records])
    for record, text in zip(records, rendered, strict=False):
        assert text == format_prompt(
            record, fmt.style, chat_template=template, system_prompt=fmt.system_prompt
        )
    print(f"Go text/template == format_prompt for {len(records)} records ({fmt.style})")


def test_go_template_escapes_template_delimiters(go_renderer, tmp_path):
    """Fixed text holding ``{{`` stays literal text in Go."""
    fmt, template = style_cases()[2]
    odd = template.replace(
        "'<|im_start|>' + message['role']", "'{{x}}<|im_start|>' + message['role']"
    )
    fmt = replace(fmt)
    pieces = prompt_pieces(fmt, odd)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(modelfile_text("m.gguf", fmt, pieces, context_length=2048))
    record = {"instruction": "Hi", "input": "", "output": ""}
    [text] = go_render(go_renderer, modelfile, [chat_message(record, pieces)])
    assert text == format_prompt(record, "chat", chat_template=odd)
    assert "{{x}}" in text
