"""``instructune serve`` through the official ``ollama`` and ``openai`` clients, against a real
uvicorn server on 127.0.0.1 (a free port), serving tiny random models saved to a temporary
folder: a GPT-2 saved with the alpaca prompt format and a Llama with a chat template."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch
from helpers import Server

from instructune.checkpoints import save_model
from instructune.cli.main import main
from instructune.data.conversation import format_conversation
from instructune.data.prompts import format_prompt, prompt_format_for
from instructune.generation import encode_prompt, generate, stop_ids_for
from instructune.generation.engine import Engine
from instructune.models import build_model, get_config
from instructune.serving.app import create_app
from instructune.serving.models import ModelRegistry, ServedModel, load_served, parse_model_specs
from instructune.tokenization import load_tokenizer
from instructune.utils.io import sha256_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A 512-token context: room for the judge's prompt in the evaluate test.
TINY = dict(n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64, context_length=512)
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}  # Ollama's defaults sample; these don't
MAX_BODY = 16 * 1024


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random models saved as ``save_model`` saves a fine-tuned one."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gpt2_tok = load_tokenizer("gpt2")
    cfg = get_config("gpt2", **TINY)
    book = save_model(
        root / "book", build_model(cfg), gpt2_tok, cfg, prompt_format_for(gpt2_tok, "alpaca")
    )
    chat_tok = load_tokenizer(FIXTURES / "tiny-tokenizer")
    cfg = get_config(
        "smollm2-135m", vocab_size=chat_tok.vocab_size, n_kv_heads=1, tie_embeddings=True, **TINY
    )
    chat = save_model(
        root / "chatty", build_model(cfg), chat_tok, cfg, prompt_format_for(chat_tok, "chat")
    )
    return {"book": Path(book), "chatty": Path(chat)}


@pytest.fixture(scope="module")
def served(model_dirs):
    """The server, with ``book``, ``chatty``, and book's weights behind two more engines:
    ``busy``, whose queue holds nothing (every request is refused as over the queue limit), and
    ``solo``, which decodes one request at a time."""
    registry = ModelRegistry(
        load_served(name, str(path), max_batch=4, max_queue=16) for name, path in model_dirs.items()
    )
    book = registry.find("book")
    for name, engine in (
        ("busy", Engine(book.loaded, max_batch=1, max_queue=0)),
        ("solo", Engine(book.loaded, max_batch=1, max_queue=4)),
    ):
        registry.add(ServedModel(**{**book.__dict__, "name": name, "engine": engine}))
    with Server(create_app(registry, max_body=MAX_BODY)) as server:
        server.registry = registry
        yield server


@pytest.fixture(scope="module")
def ollama_client(served):
    return ollama.Client(host=served.url, timeout=60)


@pytest.fixture(scope="module")
def openai_client(served):
    # max_retries=0: a 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(m: ServedModel, prompt: str, n: int) -> str:
    """What ``generate`` answers for an already formatted prompt, greedily, on its own."""
    ids = encode_prompt(m.loaded.tokenizer, prompt, add_bos=m.prompt_format.add_bos)
    [result] = generate(
        m.loaded.model,
        m.loaded.tokenizer,
        [ids],
        max_new_tokens=n,
        stop_ids=stop_ids_for(m.loaded),
        stop_strings=m.prompt_format.stop_strings,
    )
    return result.text


MESSAGES = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


@pytest.mark.parametrize("name", ["book", "chatty"])
def test_ollama_chat_is_generate_on_the_saved_format(served, ollama_client, name):
    m = served.registry.find(name)
    r = ollama_client.chat(model=name, messages=MESSAGES, options={**GREEDY, "num_predict": 8})
    prompt = format_conversation(MESSAGES, m.prompt_format, m.loaded.tokenizer.chat_template)
    assert r.message.role == "assistant"
    assert r.message.content == _alone(served.registry.find(name), prompt, 8)
    assert r.done and r.done_reason in ("stop", "length") and r.model == f"{name}:latest"
    assert r.prompt_eval_count == len(m.loaded.tokenizer.encode(prompt))
    assert 1 <= r.eval_count <= 8
    assert r.total_duration >= r.eval_duration >= 0 and r.prompt_eval_duration > 0
    assert r.load_duration >= 0


def test_ollama_streams_ndjson_that_joins_to_the_whole_answer(ollama_client):
    options = {**GREEDY, "num_predict": 12}
    whole = ollama_client.chat(model="book", messages=MESSAGES, options=options)
    parts = list(ollama_client.chat(model="book", messages=MESSAGES, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_ollama_generate_raw_system_and_load(served, ollama_client):
    tok = served.registry.find("chatty").loaded.tokenizer
    raw = ollama_client.generate(
        model="chatty", prompt="once upon", raw=True, options={**GREEDY, "num_predict": 6}
    )
    assert raw.prompt_eval_count == len(tok.encode("once upon"))
    assert raw.response == _alone(served.registry.find("chatty"), "once upon", 6)
    # Not raw: the prompt is the instruction, formatted like a one-turn chat (system first).
    formatted = ollama_client.generate(
        model="chatty", prompt="once upon", system="Be brief.", options={**GREEDY, "num_predict": 6}
    )
    prompt = format_conversation(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "once upon"}],
        "chat",
        tok.chat_template,
    )
    assert formatted.prompt_eval_count == len(tok.encode(prompt))
    assert formatted.response == _alone(served.registry.find("chatty"), prompt, 6)
    parts = list(
        ollama_client.generate(
            model="book", prompt="Say hi.", stream=True, options={**GREEDY, "num_predict": 5}
        )
    )
    book_prompt = format_prompt({"instruction": "Say hi.", "input": ""}, "alpaca")
    assert "".join(p.response for p in parts) == _alone(
        served.registry.find("book"), book_prompt, 5
    )
    # Ollama's way to load a model: an empty prompt is answered "done" at once.
    loaded = ollama_client.generate(model="book", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_ollama_sampling_options_and_seed(ollama_client):
    options = {
        "temperature": 1.5,
        "top_k": 50,
        "top_p": 0.95,
        "seed": 7,
        "num_predict": 10,
        "stop": ["zzz"],
        "num_ctx": 100,
    }
    a = ollama_client.generate(model="book", prompt="Pick a word.", options=options)
    b = ollama_client.generate(model="book", prompt="Pick a word.", options=options)
    assert a.response == b.response and a.eval_count == b.eval_count


def test_ollama_listing_reports_the_weights_digest(served, model_dirs, ollama_client):
    digest = sha256_file(model_dirs["book"] / "model.safetensors")
    listed = {m.model: m for m in ollama_client.list().models}
    assert set(listed) == {"book:latest", "chatty:latest", "busy:latest", "solo:latest"}
    assert listed["book:latest"].digest == digest
    assert listed["book:latest"].details.family == "gpt2"
    assert listed["book:latest"].size == (model_dirs["book"] / "model.safetensors").stat().st_size
    shown = ollama_client.show("book")
    assert shown.modelinfo["instructune.weights_sha256"] == digest
    # Ollama's show has no digest field (the client drops it); the raw answer carries one too.
    raw = httpx.post(f"{served.url}/api/show", json={"model": "book:latest"}).json()
    assert raw["digest"] == digest
    assert shown.modelinfo["gpt2.context_length"] == 512
    assert shown.parameters.splitlines()[-2:] == ['stop "\\n### Response:"', 'stop "<|endoftext|>"']
    assert ollama_client.show("chatty").template.startswith("{% for message")
    ps = {m.model: m for m in ollama_client.ps().models}
    assert ps["chatty:latest"].context_length == 512 and ps["book:latest"].digest == digest
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["engines"]["solo"]["max_batch"] == 1
    version = httpx.get(f"{served.url}/api/version").json()
    assert isinstance(version["version"], str)


def test_ollama_errors_name_the_field(served, ollama_client):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="nope", messages=MESSAGES)
    assert e.value.status_code == 404 and "nope" in e.value.error and "book:latest" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="book", messages=MESSAGES, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="book", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.status_code == 400 and "messages[0].role" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="book", messages=MESSAGES, options={"num_predict": 1000})
    assert e.value.status_code == 400 and "options.num_predict=1000" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.generate(model="book", prompt="word " * 600, raw=True)
    assert e.value.status_code == 400 and "context window is 512" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.generate(model="book", prompt="x", format="json")
    assert e.value.status_code == 400 and e.value.error.startswith("format:")
    bad = httpx.post(f"{served.url}/api/chat", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    big = httpx.post(f"{served.url}/api/generate", json={"model": "book", "prompt": "a" * MAX_BODY})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    missing = httpx.get(f"{served.url}/api/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.parametrize("client", ["ollama", "openai"])
def test_a_full_queue_is_503_with_retry_after(served, client):
    if client == "ollama":
        r = httpx.post(f"{served.url}/api/generate", json={"model": "busy", "prompt": "hi"})
        assert "busy" in r.json()["error"]
    else:
        r = httpx.post(f"{served.url}/v1/completions", json={"model": "busy", "prompt": "hi"})
        assert r.json()["error"]["code"] == "queue_full"
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1


def test_a_client_that_goes_away_frees_its_row(served):
    """``solo`` decodes one request at a time, so the second request below runs only once the
    first has left the batch; the engine's counters then say it left cancelled, long before its
    400 tokens were done."""
    engine = served.registry.find("solo").engine
    before = engine.stats()
    body = {"model": "solo", "prompt": "Go on.", "options": {**GREEDY, "num_predict": 400}}
    with httpx.stream("POST", f"{served.url}/api/generate", json=body, timeout=60) as r:
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False
    after = httpx.post(
        f"{served.url}/api/generate",
        timeout=60,
        json={
            "model": "solo",
            "prompt": "Hi.",
            "stream": False,
            "options": {**GREEDY, "num_predict": 3},
        },
    )
    assert after.json()["done"]
    stats = engine.stats()
    assert stats["cancelled"] - before["cancelled"] == 1
    assert stats["tokens"] - before["tokens"] < 400


def test_concurrent_clients_get_their_answers_alone(served, ollama_client):
    """Four clients at once share ``book``'s batch; each greedy answer is its answer alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Count to {i}." for i in range(4)]

    def ask(prompt: str) -> str:
        r = ollama_client.generate(
            model="book", prompt=prompt, options={**GREEDY, "num_predict": 10 + len(prompt)}
        )
        return r.response

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        formatted = format_prompt({"instruction": prompt, "input": ""}, "alpaca")
        assert answer == _alone(served.registry.find("book"), formatted, 10 + len(prompt))


def test_openai_chat_matches_ollama_and_streams(served, ollama_client, openai_client):
    expected = ollama_client.chat(
        model="chatty", messages=MESSAGES, options={**GREEDY, "num_predict": 8}
    )
    r = openai_client.chat.completions.create(
        model="chatty", messages=MESSAGES, temperature=0, max_tokens=8, seed=1
    )
    assert r.choices[0].message.content == expected.message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.prompt_tokens == expected.prompt_eval_count
    assert r.usage.completion_tokens == expected.eval_count
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        openai_client.chat.completions.create(
            model="chatty",
            messages=MESSAGES,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_completions_send_the_prompt_as_it_is(served, openai_client):
    r = openai_client.completions.create(
        model="book", prompt="The cat", temperature=0, max_tokens=6, frequency_penalty=0.0
    )
    assert r.choices[0].text == _alone(served.registry.find("book"), "The cat", 6)
    streamed = openai_client.completions.create(
        model="book", prompt="The cat", temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    penalised = openai_client.completions.create(
        model="book",
        prompt="The cat",
        max_tokens=6,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        presence_penalty=1.0,
        frequency_penalty=1.0,
    )
    assert penalised.usage.completion_tokens >= 1


def test_openai_models_and_errors(openai_client):
    assert {m.id for m in openai_client.models.list()} == {"book", "chatty", "busy", "solo"}
    assert openai_client.models.retrieve("book").owned_by == "instructune"
    cases = [
        (dict(n=2), "n", openai.BadRequestError),
        (dict(temperature=5), "temperature", openai.BadRequestError),
        (
            dict(max_tokens=1000, messages=[{"role": "user", "content": "hi " * 400}]),
            "max_tokens",
            openai.BadRequestError,
        ),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop", openai.BadRequestError),
        (dict(model="nope"), "model", openai.NotFoundError),
    ]
    for extra, param, error in cases:
        args = {"model": "book", "messages": MESSAGES, **extra}
        with pytest.raises(error) as e:
            openai_client.chat.completions.create(**args)
        assert e.value.body["param"] == param and param in e.value.body["message"]
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model="book", prompt=[1, 2, 3])
    assert e.value.body["param"] == "prompt"


def test_openai_bad_json_is_an_openai_error(served):
    r = httpx.post(f"{served.url}/v1/chat/completions", content=b"[1,")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_evaluate_judges_through_the_server(served, model_dirs, tmp_path, capsys):
    """``instructune evaluate --judge ollama:book`` end to end against the server. A tiny random
    model's replies are not scores: the judge asks once more, then records the record as
    unscored, and the run finishes with its text metrics. The judge cache keys on the digest
    the server reports (the sha256 of the weights), so a second run asks nothing again."""
    records = [
        {
            "instruction": f"Add {i} and 1.",
            "input": "",
            "output": str(i + 1),
            "model_response": str(i + 1),
        }
        for i in range(2)
    ]
    (tmp_path / "r.json").write_text(json.dumps(records))
    args = [
        "evaluate",
        str(tmp_path / "r.json"),
        "--judge",
        "ollama:book",
        "--url",
        served.url,
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    judge = scores["judge"]
    assert judge["digest"] == sha256_file(model_dirs["book"] / "model.safetensors")
    assert judge["reported_model"] == "book:latest" and judge["requested"] == 2
    summary = scores["summary"]["model_response"]
    assert summary["judge"]["text"] == "scored 0 of 2" and summary["metrics"]["exact_match"] == 1
    for record in scores["records"]:
        verdict = record["responses"]["model_response"]["judge"]
        assert verdict["status"] == "unscored" and verdict["score"] is None
        assert len(verdict["replies"]) == 2 and all(verdict["replies"])  # asked, then asked again
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "scores.json").read_text())["judge"]
    assert (again["from_cache"], again["requested"]) == (2, 0)


def test_model_names_come_from_the_spec_or_are_given():
    specs = ["runs/book/final", "judge=/models/x.gguf", "smollm2-135m-instruct", "/m/y.GGUF"]
    assert parse_model_specs(specs) == [
        ("final", "runs/book/final"),
        ("judge", "/models/x.gguf"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("y", "/m/y.GGUF"),
    ]
    with pytest.raises(ValueError, match="'final' is already taken"):
        parse_model_specs(["a/final", "b/final"])
    with pytest.raises(ValueError, match="expected SPEC or NAME=SPEC"):
        parse_model_specs(["name="])


def test_serve_says_when_the_port_is_in_use(model_dirs, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc = main(["serve", "--model", str(model_dirs["book"]), "--port", str(port)])
    assert rc == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_the_serve_command_serves_until_interrupted(model_dirs):
    """The real command in its own process: a free port (0), the address it prints, an answer,
    and a clean exit on Ctrl-C (SIGINT)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instructune",
            "serve",
            "--model",
            f"mine={model_dirs['book']}",
            "--port",
            "0",
            "--max-batch",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:  # the address is printed once the models are loaded
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving mine on http://127.0.0.1:"), lines
        url = lines[-1].split(" on ")[1].strip()
        r = httpx.post(
            f"{url}/api/chat",
            timeout=60,
            json={
                "model": "mine",
                "messages": MESSAGES,
                "stream": False,
                "options": {**GREEDY, "num_predict": 4},
            },
        )
        assert r.status_code == 200 and r.json()["done"] and r.json()["eval_count"] <= 4
        assert any("weights: safetensors fp32" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        proc.stderr.close()
    assert rc == 0


@pytest.mark.embedded
def test_the_embedded_model_answers_as_generate_does():
    """SmolLM2-135M-Instruct served by its registry name: the Ollama and OpenAI clients get the
    greedy answer ``generate`` gives (it has no saved format: prompted as ``generate`` prompts
    it), and the digest is the GGUF file's sha256."""
    from instructune.checkpoints.resolve import embedded_gguf_path

    name = "smollm2-135m-instruct"
    [(served_name, spec)] = parse_model_specs([name])
    registry = ModelRegistry([load_served(served_name, spec, max_batch=2)])
    question = "What is an antonym of 'complicated'?"
    with Server(create_app(registry)) as server:
        expected = _alone(
            registry.find(name),
            format_prompt({"instruction": question, "input": ""}, "alpaca"),
            16,
        )
        messages = [{"role": "user", "content": question}]
        r = ollama.Client(host=server.url, timeout=120).chat(
            model=name, messages=messages, options={**GREEDY, "num_predict": 16}
        )
        assert r.message.content == expected and expected.strip()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        c = client.chat.completions.create(
            model=name, messages=messages, temperature=0, max_tokens=16
        )
        assert c.choices[0].message.content == expected
        [listed] = ollama.Client(host=server.url).list().models
        assert listed.digest == sha256_file(embedded_gguf_path())
        assert listed.details.format == "gguf" and listed.details.family == "llama"
