"""The judge against a real, scripted HTTP server on 127.0.0.1 (tests/judge_server.py).

Time-outs use generous margins (the machine is shared): a 0.5 s client time-out against a
server that waits 3 s before answering.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from judge_server import (
    BAD_JSON,
    DROP,
    GARBAGE,
    OK,
    JudgeServer,
    Reply,
    error,
    expected_score,
    slow,
)

from instructune.errors import InstructuneError
from instructune.evaluation import JudgeError, JudgeUnavailableError, evaluate_responses
from instructune.evaluation.cache import Judgement, JudgementCache
from instructune.evaluation.prompt import RETRY_SUFFIX, SCORE_SCHEMA, build_judge_prompt
from instructune.llm import parse_llm as parse_judge

FAST = {"backoff": 0.05, "quiet": True, "embeddings": False, "histogram": False}


def make_records(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Name the number after {i}.",
            "input": "" if i % 2 else f"Count from {i}.",
            "output": f"The number after {i} is {i + 1}.",
            "model_response": f"It is {i + 1}." if i % 3 else f"The number after {i} is {i + 1}.",
        }
        for i in range(n)
    ]


def scores_of(summary: dict, key: str = "model_response") -> list:
    doc = json.loads(open(summary["scores_json"]).read())
    return [r["responses"][key]["judge"]["score"] for r in doc["records"]]


def expected(records: list[dict], key: str = "model_response") -> list[int]:
    return [expected_score(r[key]) for r in records]


def cache_lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_success_sends_the_books_request(tmp_path, stream):
    records = make_records(4)
    with JudgeServer() as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, stream=stream, **FAST
        )
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 4
    body = server.chat_requests[0]["body"]
    assert body["model"] == "llama3"
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert body["stream"] is stream
    assert "format" not in body
    assert body["messages"] == [
        {"role": "user", "content": build_judge_prompt(records[0], records[0]["model_response"])}
    ]
    judge = summary["judge"]
    assert judge["digest"] == server.digest and judge["reported_model"] == "llama3"
    assert judge["prompt_version"] and judge["options"]["options"]["seed"] == 123
    j = summary["responses"]["model_response"]["judge"]
    assert j["text"] == "scored 4 of 4" and j["mean"] == pytest.approx(sum(expected(records)) / 4)
    assert j["mean_ci95"][0] <= j["mean"] <= j["mean_ci95"][1]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_success_with_key_from_the_environment(tmp_path, monkeypatch, stream):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    records = make_records(3)
    with JudgeServer() as server:
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            judge="openai:gpt-test",
            url=server.url + "/v1",  # a URL ending in /v1 is accepted too
            stream=stream,
            **FAST,
        )
    assert scores_of(summary) == expected(records)
    body = server.chat_requests[0]["body"]
    assert body["temperature"] == 0 and body["seed"] == 123 and body["stream"] is stream
    assert "options" not in body and "response_format" not in body
    assert server.auth_headers == ["Bearer sk-test-123"] * 3
    assert "/v1/models" in server.other_requests
    assert summary["judge"]["digest"] is None
    assert summary["judge"]["reported_model"] == "gpt-test"


def test_no_api_key_sends_no_authorization(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with JudgeServer() as server:
        evaluate_responses(
            make_records(1), out_dir=tmp_path, judge="openai:m", url=server.url, **FAST
        )
    assert server.auth_headers == [None]


def test_api_key_is_not_sent_over_plain_http_to_another_host(tmp_path, monkeypatch):
    """http://0.0.0.0 is not a loopback address, yet on Linux it reaches the server on
    127.0.0.1: so the refusal is seen to happen before anything is sent."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    with JudgeServer() as server:
        port = server.url.rsplit(":", 1)[1]
        with pytest.raises(JudgeError) as info:
            evaluate_responses(
                make_records(2), out_dir=tmp_path, judge="openai:m",
                url=f"http://0.0.0.0:{port}", **FAST,
            )  # fmt: skip
        # Without the key nothing is secret, and the same URL is used as given.
        monkeypatch.delenv("OPENAI_API_KEY")
        assert server.other_requests == [] and server.chat_requests == []
        evaluate_responses(
            make_records(1), out_dir=tmp_path / "b", judge="openai:m",
            url=f"http://0.0.0.0:{port}", **FAST,
        )  # fmt: skip
    message = str(info.value)
    assert "OPENAI_API_KEY" in message and "plain http to 0.0.0.0" in message
    assert "https://" in message and "nothing was sent" in message
    assert server.auth_headers == [None]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.openai.com", True),
        ("https://10.1.2.3:8443/v1", True),
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10:8000", True),
        ("http://localhost:8080", True),
        ("http://LOCALHOST.:8080", True),
        ("http://[::1]:8000", True),
        ("http://[::ffff:127.0.0.1]:8000", True),
        ("http://10.1.2.3:8000", False),
        ("http://judge.example.com", False),
        ("http://localhost.example.com", False),
        ("http://0.0.0.0:8000", False),
        ("http://[::]:8000", False),
    ],
)
def test_where_an_api_key_may_go(monkeypatch, url, allowed):
    from instructune.llm.openai import OpenAIClient

    spec = parse_judge("openai:m", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    if allowed:
        assert OpenAIClient(spec).spec.url == spec.url.removesuffix("/v1")
    else:
        with pytest.raises(JudgeError, match="unencrypted"):
            OpenAIClient(spec)
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIClient(spec)  # no key, nothing to protect


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_structured_output_is_requested_and_parsed(tmp_path, backend):
    records = make_records(3)

    def scorer(prompt: str) -> str:
        return json.dumps({"score": 42})

    with JudgeServer(scorer=scorer) as server:
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            judge=f"{backend}:llama3",
            url=server.url,
            structured=True,
            **FAST,
        )
    assert scores_of(summary) == [42, 42, 42]
    body = server.chat_requests[0]["body"]
    if backend == "ollama":
        assert body["format"] == SCORE_SCHEMA
    else:
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["schema"]["properties"] == SCORE_SCHEMA["properties"]


def test_garbage_gets_one_firmer_retry_then_unscored(tmp_path):
    records = make_records(3)
    # record 0: garbage then a score; record 1: garbage twice -> unscored; record 2: out of range
    # then a score. workers=1 keeps the order of requests.
    script = [GARBAGE, OK, GARBAGE, GARBAGE, Reply("ok", text="150"), OK]
    with JudgeServer(script=script) as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, **FAST
        )
    prompts = server.prompts
    # 0: garbage, firmer; 1: garbage, firmer garbage; 2: "150" (out of range), firmer.
    assert len(prompts) == 6
    assert [p.endswith(RETRY_SUFFIX) for p in prompts] == [False, True, False, True, False, True]
    got = scores_of(summary)
    assert got[0] == expected_score(records[0]["model_response"])
    assert got[1] is None
    assert got[2] == expected_score(records[2]["model_response"])
    j = summary["responses"]["model_response"]["judge"]
    assert j["text"] == "scored 2 of 3" and j["unscored"] == 1
    doc = json.loads(open(summary["scores_json"]).read())
    rec1 = doc["records"][1]["responses"]["model_response"]["judge"]
    assert rec1["status"] == "unscored" and len(rec1["replies"]) == 2
    # The unscored judgement is cached too: a re-run asks nothing.
    with JudgeServer() as again:
        evaluate_responses(records, out_dir=tmp_path, judge="ollama:llama3", url=again.url, **FAST)
    assert again.chat_requests == []


@pytest.mark.parametrize("backend", ["ollama", "openai"])
@pytest.mark.parametrize("stream", [True, False])
def test_server_errors_and_dropped_connections_are_retried(tmp_path, backend, stream):
    records = make_records(4)
    script = [error(500), DROP, error(503), BAD_JSON, OK, DROP]
    with JudgeServer(script=script) as server:
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            judge=f"{backend}:llama3",
            url=server.url,
            stream=stream,
            retries=4,
            **FAST,
        )
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 4 + 5  # five failures, each retried once more
    lines = cache_lines(tmp_path / "judge-cache.jsonl")
    assert len(lines) == 4 and len({line["key"] for line in lines}) == 4
    assert sorted(line["score"] for line in lines) == sorted(expected(records))


def test_a_server_that_comes_back(tmp_path):
    """The first five requests fail (the server is restarting); back-off carries us through."""
    records = make_records(3)
    with JudgeServer(script=[error(502)] * 5) as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, retries=6, **FAST
        )
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 8
    times = [r["time"] for r in server.chat_requests[:6]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[-1] > gaps[0]  # exponential back-off: later waits are longer


def test_slow_answers_time_out_and_are_retried(tmp_path):
    records = make_records(2)
    with JudgeServer(script=[slow(3.0)]) as server:
        start = time.monotonic()
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            judge="ollama:llama3",
            url=server.url,
            timeout=0.5,
            **FAST,
        )
        elapsed = time.monotonic() - start
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 3
    assert elapsed < 2.5  # gave up on the slow answer long before the server's 3 s


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_stream_that_stalls_mid_answer_is_retried(tmp_path, backend):
    records = make_records(2)
    with JudgeServer(script=[Reply("stall", delay=3.0)]) as server:
        start = time.monotonic()
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            judge=f"{backend}:llama3",
            url=server.url,
            timeout=0.5,
            **FAST,
        )
        elapsed = time.monotonic() - start
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 3 and elapsed < 2.5


def test_a_judge_that_stays_slow_raises_with_advice(tmp_path):
    with JudgeServer(script=lambda i, body: slow(3.0)) as server:
        with pytest.raises(JudgeUnavailableError, match="--timeout"):
            evaluate_responses(
                make_records(1),
                out_dir=tmp_path,
                judge="openai:m",
                url=server.url,
                timeout=0.5,
                retries=1,
                **FAST,
            )
    assert len(server.chat_requests) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("backend", "advice"),
    [("ollama", "ollama serve"), ("openai", "OPENAI_API_KEY")],
)
def test_nothing_listening_is_a_clear_error(tmp_path, backend, advice):
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(JudgeUnavailableError) as info:
        evaluate_responses(
            make_records(1), out_dir=tmp_path, judge=f"{backend}:llama3", url=url, **FAST
        )
    message = str(info.value)
    assert "nothing is listening at " + url in message and advice in message
    if backend == "ollama":
        assert "ollama pull llama3" in message
    assert time.monotonic() - start < 2  # no back-off loop against a closed port
    assert isinstance(info.value, InstructuneError)


def test_a_model_ollama_has_not_pulled(tmp_path):
    with JudgeServer(models=["mistral:latest"]) as server:
        with pytest.raises(JudgeError, match=r"no model 'llama3'.*mistral:latest.*ollama pull"):
            evaluate_responses(
                make_records(1), out_dir=tmp_path, judge="ollama:llama3", url=server.url, **FAST
            )
    assert server.chat_requests == []


def test_a_client_error_is_not_retried(tmp_path):
    with JudgeServer(script=lambda i, body: error(400)) as server:
        with pytest.raises(JudgeError, match="HTTP 400"):
            evaluate_responses(
                make_records(2), out_dir=tmp_path, judge="openai:m", url=server.url, **FAST
            )
    assert len(server.chat_requests) == 1


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    records = make_records(8)
    k = 3

    def fail_after_k(i: int, body: dict):
        return OK if i < k else error(500)

    with JudgeServer(script=fail_after_k) as dying:
        with pytest.raises(JudgeError, match="resume"):
            evaluate_responses(
                records, out_dir=tmp_path, judge="ollama:llama3", url=dying.url, retries=1, **FAST
            )
    cache = tmp_path / "judge-cache.jsonl"
    assert len(cache_lines(cache)) == k
    assert not (tmp_path / "scores.json").exists()

    with JudgeServer() as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, **FAST
        )
    done_first = {p for p in dying.prompts[:k]}
    asked_now = server.prompts
    assert len(asked_now) == len(records) - k and not done_first & set(asked_now)
    assert scores_of(summary) == expected(records)
    assert summary["judge"]["from_cache"] == k and summary["judge"]["requested"] == 5
    lines = cache_lines(cache)
    assert len(lines) == 8 and len({line["key"] for line in lines}) == 8

    with JudgeServer() as idle:  # a re-run costs nothing
        again = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=idle.url, **FAST
        )
    assert idle.chat_requests == [] and scores_of(again) == expected(records)


def test_the_cache_key_follows_model_digest_and_options(tmp_path):
    records = make_records(2)
    with JudgeServer() as a:
        evaluate_responses(records, out_dir=tmp_path, judge="ollama:llama3", url=a.url, **FAST)
    with JudgeServer(digest="0" * 64) as b:  # the same name, re-pulled: new weights
        evaluate_responses(records, out_dir=tmp_path, judge="ollama:llama3", url=b.url, **FAST)
    with JudgeServer(scorer=lambda p: '{"score": 5}') as c:
        evaluate_responses(
            records,
            out_dir=tmp_path,
            judge="ollama:llama3",
            url=c.url,
            structured=True,
            **FAST,
        )
    with JudgeServer() as d:  # streaming or not does not change the answer: cached
        evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=d.url, stream=False, **FAST
        )
    assert [len(s.chat_requests) for s in (a, b, c, d)] == [2, 2, 2, 0]


def test_workers_judge_in_parallel_without_double_counting(tmp_path):
    records = make_records(16)
    records += [dict(records[0]), dict(records[1])]  # duplicates share one judgement
    with JudgeServer(script=lambda i, body: slow(0.05)) as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, workers=4, **FAST
        )
    assert scores_of(summary) == expected(records)
    assert len(server.chat_requests) == 16
    assert len(set(server.prompts)) == 16
    assert len(cache_lines(tmp_path / "judge-cache.jsonl")) == 16


def test_empty_responses_score_zero_without_asking(tmp_path):
    records = make_records(3)
    records[1]["model_response"] = "   "
    with JudgeServer() as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, **FAST
        )
    got = scores_of(summary)
    assert got[1] == 0 and len(server.chat_requests) == 2
    j = summary["responses"]["model_response"]["judge"]
    assert j["text"] == "scored 3 of 3" and j["empty"] == 1


def test_long_prompts_warn_about_num_ctx(tmp_path):
    records = make_records(2)
    records[0]["model_response"] = "word " * 2000
    with JudgeServer() as server:
        summary = evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, **FAST
        )
    assert len(summary["warnings"]) == 1
    assert (
        "1 of 2 judge prompts" in summary["warnings"][0]
        and "num_ctx=2048" in summary["warnings"][0]
    )


def test_several_response_keys_in_one_run(tmp_path):
    records = make_records(3)
    for r in records:
        r["model 1 response"] = r.pop("model_response")
        r["model 2 response"] = "I do not know."
    with JudgeServer() as server:
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            response_keys=["model 1 response", "model 2 response"],
            judge="ollama:llama3",
            url=server.url,
            **FAST,
        )
    assert scores_of(summary, "model 1 response") == expected(records, "model 1 response")
    assert scores_of(summary, "model 2 response") == [expected_score("I do not know.")] * 3
    assert len(server.chat_requests) == 6


def test_cache_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JudgementCache(path)
    cache.put("k1", Judgement(80, ["80"]))
    cache.put("k2", Judgement(None, ["meh", "meh"]))
    with open(path, "a") as f:
        f.write('{"key": "k3", "score": 7')  # killed mid-write
    again = JudgementCache(path)
    assert len(again) == 2 and again.get("k1").score == 80 and again.get("k2").score is None
    again.put("k3", Judgement(7, ["7"]))
    lines = cache_lines(path)  # every line parses: the fragment was cut first
    assert [line["key"] for line in lines] == ["k1", "k2", "k3"]


def test_cache_skips_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "score": 1, "replies": ["1"]}\nnot json\n')
    with pytest.warns(UserWarning, match="line 2"):
        cache = JudgementCache(path)
    assert len(cache) == 1 and cache.skipped_lines == 1


def test_bad_judge_spec_and_records_are_clear_errors(tmp_path):
    with pytest.raises(InstructuneError, match="ollama:MODEL"):
        evaluate_responses(make_records(1), out_dir=tmp_path, judge="llama3", **FAST)
    bad = make_records(2)
    del bad[1]["model_response"]
    with pytest.raises(InstructuneError, match=r"x.json: record 1: field 'model_response'"):
        evaluate_responses(bad, out_dir=tmp_path, source="x.json", **FAST)


def test_judge_optional_falls_back_to_metrics(tmp_path):
    """What the fine-tuning job uses: an unreachable judge costs a warning, not the run."""
    url = f"http://127.0.0.1:{_free_port()}"
    summary = evaluate_responses(
        make_records(3),
        out_dir=tmp_path,
        judge="ollama:llama3",
        url=url,
        judge_optional=True,
        **FAST,
    )
    assert summary["judge"] is None and summary["responses"]["model_response"]["judge"] is None
    assert len(summary["warnings"]) == 1 and "ollama serve" in summary["warnings"][0]
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["warnings"] == summary["warnings"] and doc["judge"] is None
