"""Serving throughput: ``instructune serve`` under 1, 4 and 16 concurrent streaming clients.

Prints figures; it is not a test. In one run, on the embedded ``smollm2-135m-instruct``:

1. ``instructune serve`` is started in its own process (``--max-batch 16``) and driven by N
   concurrent clients (N = 1, 4, 16) of OpenAI's official ``openai`` client, streaming
   ``/v1/chat/completions`` at temperature 0 with ``max_tokens`` 128. The prompts are the
   instructions of the book's test split (the user turn of the chat style); every N answers
   the same prompts, each client taking the next prompt when its answer ends.
2. For each N: aggregate generated tokens/s (all completion tokens / wall time), time to first
   token p50/p95, and per-request tokens/s (completion tokens / the request's whole time).
   Aggregates are also given as a ratio to the single-client figure of the same run.
3. Greedy outputs unchanged: every answer at N > 1 is compared with the 1-client answer to the
   same prompt.
4. When ``llama-cpp-python[server]`` is installed (``make bench-llamacpp``), its server is
   started on the embedded GGUF file and driven by the same clients; its absence is printed
   as a skip with the reason.

The machine line gives the CPU model and flags, torch's version and threads, and the fp32/bf16
matmul peak measured in this process (``instructune.training.metrics.matmul_peak_flops``).

Usage (from the repository root):

    .venv/bin/python benchmarks/serving.py --quick      # 16 prompts, a few minutes
    .venv/bin/python benchmarks/serving.py              # the whole test split (110 prompts)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import machine_lines

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
EMBEDDED = "smollm2-135m-instruct"
LEVELS = (1, 4, 16)


# ------------------------------------------------------------------------------------------
# Machine


# ------------------------------------------------------------------------------------------
# Prompts


def test_prompts(data_file: Path, count: int) -> list[str]:
    """User turns of the book's test split; the shipped demo data when the file is absent."""
    from instructune.data.prompts import user_message
    from instructune.data.records import load_records, split_records

    if data_file.exists():
        _train, test, _val = split_records(load_records(data_file))
    else:
        from instructune.data.sources import demo_path

        print(f"note: {data_file} not found; prompts from the demo data's test split instead")
        _train, test, _val = split_records(load_records(demo_path()))
    return [user_message(r) for r in test[:count]]


# ------------------------------------------------------------------------------------------
# Servers


class Server:
    """A server process on 127.0.0.1; its output goes to a temporary file shown on failure."""

    def __init__(self, argv: list[str], base_url: str, name: str):
        self.base_url, self.name = base_url, name
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            # Polling a server that is still loading: there is no event to wait on.
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_instructune(max_batch: int) -> Server:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "instructune",
        "serve",
        "--model",
        EMBEDDED,
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "256",
    ]
    return Server(argv, f"http://127.0.0.1:{port}", "instructune serve")


def start_llamacpp() -> tuple[Server | None, str]:
    """llama-cpp-python's server on the embedded GGUF, or None and why it is skipped."""
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        return None, f"llama-cpp-python[server] is not installed ({exc}); make bench-llamacpp"
    from instructune.checkpoints.resolve import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001 - any failure to find the file is a skip reason
        return None, f"embedded GGUF not found: {exc}"
    port = free_port()
    # Its default n_threads is half the CPUs; give it all of them, as torch has. By default a new
    # request interrupts the one being streamed: off, so that concurrent clients queue instead.
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(os.cpu_count() or 1),
        "--model_alias",
        EMBEDDED,
        "--interrupt_requests",
        "False",
    ]
    return Server(argv, f"http://127.0.0.1:{port}", "llama-cpp-python server"), ""


# ------------------------------------------------------------------------------------------
# Clients


@dataclass
class Answer:
    text: str
    tokens: int
    ttft: float  # seconds from sending to the first content
    total: float  # seconds from sending to the end of the stream
    finish: str | None = None  # stop | length; None: the stream ended without saying why


async def one_request(client, prompt: str, max_tokens: int) -> Answer:
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    chunks = 0
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    finish = None
    async for chunk in stream:
        if getattr(chunk, "usage", None) is not None:
            usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            if choice.delta and choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                parts.append(choice.delta.content)
                chunks += 1
    end = time.perf_counter()
    # Both servers stream one token per content chunk (instructune may hold back a token that
    # ends inside a UTF-8 character): the usage figure is used when the server sends it.
    return Answer(
        "".join(parts), usage_tokens or chunks, (first or end) - start, end - start, finish
    )


async def drive(base_url: str, prompts: list[str], clients: int, max_tokens: int):
    """``clients`` concurrent workers answering ``prompts``; (answers by prompt, wall seconds)."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=clients + 4)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0))
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", http_client=http)
    answers: list[Answer | None] = [None] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            answers[i] = await one_request(client, prompts[i], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await http.aclose()
    return answers, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(server: Server, prompts: list[str], max_tokens: int, levels) -> dict:
    # One untimed request first: the first forward pass allocates and warms the thread pool.
    asyncio.run(drive(server.base_url, prompts[:1], 1, 8))
    results = {}
    for n in levels:
        answers, wall = asyncio.run(drive(server.base_url, prompts, n, max_tokens))
        tokens = sum(a.tokens for a in answers)
        results[n] = {
            "answers": answers,
            "wall": wall,
            "tokens": tokens,
            "agg": tokens / wall,
            "ttft50": percentile([a.ttft for a in answers], 0.5),
            "ttft95": percentile([a.ttft for a in answers], 0.95),
            "client": statistics.median(a.tokens / a.total for a in answers),
        }
        r = results[n]
        unfinished = sum(a.finish not in ("stop", "length") for a in answers)
        if unfinished:
            print(
                f"  warning: {unfinished} of {len(answers)} streams ended without a finish reason"
            )
        print(
            f"  {n:>2} clients: {tokens:5d} tokens in {wall:6.1f} s = {r['agg']:6.1f} tok/s "
            f"aggregate; TTFT p50 {r['ttft50']:.2f} s, p95 {r['ttft95']:.2f} s; "
            f"per-request {r['client']:.1f} tok/s (median)",
            flush=True,
        )
    return results


def report(name: str, results: dict) -> None:
    base = results[min(results)]
    print(f"{name}: aggregate tokens/s as a ratio of its own 1-client figure:")
    for n, r in results.items():
        print(f"  {n:>2} clients: {r['agg'] / base['agg']:.2f}x")
    reference = [a.text for a in base["answers"]]
    for n, r in results.items():
        if n == min(results):
            continue
        differ = [i for i, a in enumerate(r["answers"]) if a.text != reference[i]]
        verdict = "identical" if not differ else f"{len(differ)} differ (prompts {differ[:8]})"
        print(f"  greedy answers at {n} clients vs 1 client: {verdict}")


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="16 prompts instead of the whole test split (110)"
    )
    parser.add_argument("--prompts", type=int, help="number of test prompts (overrides --quick)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (128)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the book's data file")
    parser.add_argument(
        "--clients", default=",".join(map(str, LEVELS)), help="concurrency levels (1,4,16)"
    )
    parser.add_argument("--skip-llamacpp", action="store_true", help="only instructune serve")
    args = parser.parse_args(argv)
    levels = sorted({int(c) for c in args.clients.split(",")})
    count = args.prompts or (16 if args.quick else 110)
    prompts = test_prompts(args.data, count)
    count = len(prompts)

    for line in machine_lines():
        print(line)
    print(
        f"workload: {count} test-split prompts, max_tokens {args.max_tokens}, temperature 0, "
        f"streaming /v1/chat/completions through the openai client; clients {levels}",
        flush=True,
    )

    print(f"instructune serve --model {EMBEDDED} --max-batch {max(levels)} (fp32):", flush=True)
    server = start_instructune(max(levels))
    try:
        server.wait_ready()
        ours = measure(server, prompts, args.max_tokens, levels)
    finally:
        server.stop()
    report("instructune", ours)

    theirs = None
    if args.skip_llamacpp:
        print("llama-cpp-python server: skipped (--skip-llamacpp)")
    else:
        llama, why = start_llamacpp()
        if llama is None:
            print(f"llama-cpp-python server: skipped: {why}")
        else:
            print("llama-cpp-python server on the embedded GGUF (Q4_1):", flush=True)
            try:
                llama.wait_ready()
                theirs = measure(llama, prompts, args.max_tokens, levels)
            finally:
                llama.stop()
            report("llama-cpp-python", theirs)

    top, one = max(levels), min(levels)
    print("summary:")
    print(
        f"  instructune {top} clients / instructune {one} client: "
        f"{ours[top]['agg'] / ours[one]['agg']:.2f}x aggregate tokens/s (target >= 5x)"
    )
    if theirs is not None:
        print(
            f"  instructune {top} clients / llama-cpp-python {top} clients: "
            f"{ours[top]['agg'] / theirs[top]['agg']:.2f}x aggregate tokens/s (target >= 1x)"
        )
        print(
            f"  llama-cpp-python 1 client / instructune 1 client: "
            f"{theirs[one]['agg'] / ours[one]['agg']:.2f}x"
        )
        same = sum(
            a.text == b.text
            for a, b in zip(ours[one]["answers"], theirs[one]["answers"], strict=True)
        )
        print(f"  answers equal to llama.cpp's (Q4_1 vs fp32 weights): {same}/{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
