"""The one LLM client (``instructune.llm``) against the scripted fault server of the evaluation
tests (tests/judge_server.py, a real HTTP server on 127.0.0.1): chat and raw completion on both
backends, streamed and whole, through 500s, stalls, garbage and dropped connections; the
template lookup; and the reply cache."""

from __future__ import annotations

import json

import pytest
from judge_server import BAD_JSON, DROP, JudgeServer, Reply, error

from instructune.errors import InstructuneError
from instructune.llm import LLMError, LLMUnavailableError, ReplyCache, make_client, parse_llm
from instructune.llm.cache import cached_call, client_key

FAST = {"backoff": 0.01, "timeout": 5.0}


def echo(prompt: str) -> str:
    return f"echo:{prompt}"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_chat_and_raw_completion_on_both_backends(backend, stream):
    with JudgeServer(scorer=echo) as server:
        client = make_client(
            parse_llm(f"{backend}:llama3", server.url),
            options={"temperature": 0, "seed": 7, "num_predict": 9},
            stream=stream,
            **FAST,
        )
        client.probe()
        assert client.chat("hi there") == "echo:hi there"
        assert client.complete("<|im_start|>user\n", {"seed": 8}) == "echo:<|im_start|>user\n"
        chat, completion = (r["body"] for r in server.chat_requests)
    assert chat["stream"] is stream and completion["stream"] is stream
    if backend == "ollama":
        assert completion["raw"] is True  # no template: the prompt reaches the model as is
        assert chat["options"] == {"temperature": 0, "seed": 7, "num_predict": 9}
        assert completion["options"] == {"temperature": 0, "seed": 8, "num_predict": 9}
    else:
        assert "raw" not in completion and "messages" not in completion
        assert chat["max_tokens"] == 9 and chat["seed"] == 7 and completion["seed"] == 8
    assert server.other_requests == (["/api/tags"] if backend == "ollama" else ["/v1/models"])


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_faults_are_retried_and_counted(backend):
    """A 500, a dropped connection, a line of garbage and a stalled stream, then an answer."""
    script = [error(500), DROP, BAD_JSON, Reply("stall", delay=3.0), error(429)]
    with JudgeServer(scorer=echo, script=script) as server:
        client = make_client(
            parse_llm(f"{backend}:llama3", server.url), retries=5, backoff=0.01, timeout=0.5
        )
        assert client.complete("a long enough prompt") == "echo:a long enough prompt"
        assert len(server.chat_requests) == 6
    assert client.stats.requests == 6 and client.stats.retries == 5


def test_giving_up_names_the_server_and_the_last_error():
    with JudgeServer(script=lambda i, body: error(502)) as server:
        client = make_client(parse_llm("ollama:llama3", server.url), retries=2, **FAST)
        with pytest.raises(LLMUnavailableError, match=r"completion request failed after 3 .*502"):
            client.complete("x")
        with JudgeServer(script=lambda i, body: error(400)) as refusing:
            client = make_client(parse_llm("openai:m", refusing.url), retries=2, **FAST)
            with pytest.raises(LLMError, match="HTTP 400"):
                client.chat("x")
            assert len(refusing.chat_requests) == 1  # a 4xx is not retried


def test_the_chat_template_comes_from_api_show():
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% endfor %}"
    with JudgeServer(template=template) as server:
        client = make_client(parse_llm("ollama:llama3", server.url), **FAST)
        assert client.chat_template() == template
    with JudgeServer() as server:  # no template (404): retrying cannot help
        client = make_client(parse_llm("ollama:llama3", server.url), **FAST)
        with pytest.raises(LLMError, match="model not found"):
            client.chat_template()
    assert make_client(parse_llm("openai:m", "http://127.0.0.1:9")).chat_template() is None


def test_parse_llm_names_the_flag():
    with pytest.raises(InstructuneError, match="--llm .llama3."):
        parse_llm("llama3")
    assert parse_llm("openai:gpt", "http://h:1/").url == "http://h:1"


def test_the_reply_cache_keys_on_backend_model_options_and_prompt(tmp_path):
    with JudgeServer(scorer=echo) as server:
        client = make_client(parse_llm("ollama:llama3", server.url), **FAST)
        client.probe()
        cache = ReplyCache(tmp_path / "cache.jsonl")
        key = client_key(client, "p", version="v1", options={"seed": 1})
        assert key != client_key(client, "p", version="v1", options={"seed": 2})
        assert key != client_key(client, "q", version="v1", options={"seed": 1})
        assert key != client_key(client, "p", version="v2", options={"seed": 1})
        assert cached_call(cache, key, lambda: client.chat("p")) == "echo:p"
        assert cached_call(cache, key, lambda: client.chat("other")) == "echo:p"  # served
        assert len(server.chat_requests) == 1
    # A crash mid-write leaves half a line: it is cut off, the whole lines are kept.
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "abc", "rep')
    again = ReplyCache(tmp_path / "cache.jsonl")
    assert again.get(key) == "echo:p" and len(again) == 1
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [key]
