"""``instructune evaluate`` from the command line, including a real Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import default_sigint
from judge_server import OK, JudgeServer, expected_score

from instructune.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _write_records(path: Path, n: int, key: str = "model_response") -> list[dict]:
    records = [
        {
            "instruction": f"What is {i} plus one?",
            "input": "",
            "output": f"{i + 1}",
            key: f"{i + 1}" if i % 2 else f"It is {i + 2}.",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return records


def test_metrics_only_by_default_beside_the_responses(tmp_path, capsys):
    _write_records(tmp_path / "responses.json", 5)
    assert main(["evaluate", str(tmp_path / "responses.json")]) == 0
    out = capsys.readouterr().out
    assert "judge: none (text metrics only)" in out and "exact_match 0.400" in out
    assert (tmp_path / "scores.json").exists() and (tmp_path / "report.md").exists()


def test_judge_run_and_compare(tmp_path, capsys):
    records = _write_records(tmp_path / "r.json", 4)
    with JudgeServer() as server:
        rc = main(
            [
                "evaluate",
                str(tmp_path / "r.json"),
                "--judge",
                "ollama:llama3",
                "--url",
                server.url,
                "--out",
                str(tmp_path / "a"),
                "--workers",
                "2",
                "--quiet",
            ]
        )
    assert rc == 0 and capsys.readouterr().out == ""
    doc = json.loads((tmp_path / "a" / "scores.json").read_text())
    got = [r["responses"]["model_response"]["judge"]["score"] for r in doc["records"]]
    assert got == [expected_score(r["model_response"]) for r in records]
    assert (tmp_path / "a" / "judge-cache.jsonl").exists()

    assert main(["evaluate", "--compare", *[str(tmp_path / "a" / "scores.json")] * 2]) == 0
    out = capsys.readouterr().out
    assert "B wins 0, ties 4, loses 0" in out and "+0.000" in out


def test_nothing_listening_is_one_clear_line(tmp_path, capsys):
    _write_records(tmp_path / "r.json", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(
        ["evaluate", str(tmp_path / "r.json"), "--judge", "ollama:llama3", "--url",
         f"http://127.0.0.1:{port}", "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: nothing is listening at http://127.0.0.1:")
    assert "ollama serve" in err and "ollama pull llama3" in err and "Traceback" not in err


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text(
        '[{"instruction": "x", "output": "y", "model 1 response": "z"}]'
    )
    assert main(["evaluate", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "record 0: field 'model_response' is missing" in err and "model 1 response" in err
    assert main(["evaluate", str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["evaluate"]) == 1


@pytest.mark.slow
def test_ctrl_c_then_resume_asks_only_for_the_rest(tmp_path):
    """A real SIGINT to a running ``instructune evaluate``: the judgements received so far are
    in the cache; the re-run asks the judge only for the others.

    No timing decides the outcome: the server holds the 4th request until the process has
    said "interrupted", so the run can neither finish before the signal nor send a 5th request.
    """
    n, held = 12, 3
    records = _write_records(tmp_path / "r.json", n)
    cache = tmp_path / "out" / "judge-cache.jsonl"
    args = [sys.executable, "-m", "instructune", "evaluate", str(tmp_path / "r.json"),
            "--judge", "ollama:llama3", "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    arrived, release = threading.Event(), threading.Event()

    def hold_the_fourth(i: int, body: dict):
        if i == held:
            arrived.set()
            release.wait(120)  # a safety net only: the test releases it
        return OK

    with JudgeServer(script=hold_the_fourth) as first:
        proc = subprocess.Popen(
            [*args, "--url", first.url],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
        try:
            assert arrived.wait(120), "the 4th judge request never came"
            # Requests go one at a time (one worker), each cached before the next is sent.
            assert len(cache.read_text().splitlines()) == held
            proc.send_signal(signal.SIGINT)
            err = []
            while not any("interrupted" in line for line in err):
                err.append(lines.get(timeout=60))
            release.set()  # the request in flight is answered, then the process exits
            assert proc.wait(timeout=60) == 130, "".join(err)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
    done = len(cache.read_text().splitlines())
    # Every answer the server sent was cached, the one in flight at Ctrl-C included, and
    # nothing was asked after it.
    assert done == held + 1 == len(first.chat_requests)

    with JudgeServer() as second:
        rc = subprocess.run([*args, "--url", second.url], env=env, timeout=60).returncode
    assert rc == 0
    assert len(second.chat_requests) == n - done
    assert not set(first.prompts) & set(second.prompts)
    doc = json.loads((tmp_path / "out" / "scores.json").read_text())
    got = [r["responses"]["model_response"]["judge"]["score"] for r in doc["records"]]
    assert got == [expected_score(r["model_response"]) for r in records]
    assert len(cache.read_text().splitlines()) == n
