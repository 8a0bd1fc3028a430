"""Data sources: local files, names, and downloads from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from instructune.data import sources
from instructune.data.sources import (
    SOURCES,
    NamedSource,
    cached_path,
    demo_path,
    load_source,
    resolve_source,
)
from instructune.errors import DataError, OfflineError

PAYLOAD = json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]).encode()


class Server:
    """A real HTTP server on 127.0.0.1 serving a few paths; counts the requests it answers."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if self.path == "/truncated.json":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD) * 2))
                    self.end_headers()
                    self.wfile.write(PAYLOAD)  # then close early
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.stopped = False

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    srv = Server({"/data.json": PAYLOAD, "/data.jsonl": b'{"instruction": "a", "output": "b"}\n'})
    yield srv
    srv.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data.json"


def cache_files(tmp=None) -> list[str]:
    root = sources.cache_dir() / "data"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_url_downloaded_once_then_served_from_the_cache(server):
    url = server.url + "/data.json"
    path = resolve_source(url)
    assert path.read_bytes() == PAYLOAD
    assert path == cached_path(url) and path.parent == sources.cache_dir() / "data"
    recorded = (path.parent / (path.name + ".sha256")).read_text().split()
    assert recorded == [hashlib.sha256(PAYLOAD).hexdigest(), path.name]
    assert server.requests == ["/data.json"]
    server.stop()  # the second call must not need the server
    assert resolve_source(url) == path
    assert load_source(url)[0]["output"] == "Hi."
    assert server.requests == ["/data.json"]


def test_jsonl_url(server):
    assert load_source(server.url + "/data.jsonl")[0] == {
        "instruction": "a",
        "output": "b",
        "input": "",
    }


def test_pinned_name_is_verified(server, monkeypatch):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(
        SOURCES, "book", NamedSource("book", server.url + "/data.json", "b.json", good, "")
    )
    path = resolve_source("book")
    assert path.read_bytes() == PAYLOAD and path.name == "b.json"
    # A damaged cached file is detected on use.
    path.write_bytes(PAYLOAD + b" ")
    with pytest.raises(DataError, match="cached file's sha256"):
        resolve_source("book")


def test_sha_mismatch_is_rejected_and_nothing_kept(server, monkeypatch):
    monkeypatch.setitem(
        SOURCES, "book", NamedSource("book", server.url + "/data.json", "b.json", "0" * 64, "")
    )
    with pytest.raises(DataError, match="sha256 is .* expected 0000"):
        resolve_source("book")
    assert cache_files() == []


@pytest.mark.parametrize(
    ("name", "file"),
    [("book", "instruction-data.json"), ("preference", "instruction-data-with-preference.json")],
)
def test_the_real_pins(shared_data, monkeypatch, name, file):
    """The pinned checksums are those of the book's files (served from 127.0.0.1)."""
    data = (shared_data / file).read_bytes()
    srv = Server({"/" + file: data})
    try:
        pinned = SOURCES[name]
        served = NamedSource(name, f"{srv.url}/{file}", pinned.filename, pinned.sha256, "")
        monkeypatch.setitem(SOURCES, name, served)
        assert len(load_source(name)) == 1100
    finally:
        srv.stop()


def test_truncated_download_leaves_no_partial_file(server):
    with pytest.raises(DataError, match="broke off"):
        resolve_source(server.url + "/truncated.json")
    assert cache_files() == []


def test_http_error(server):
    with pytest.raises(DataError, match="404"):
        resolve_source(server.url + "/missing.json")
    assert cache_files() == []


def test_offline_with_nothing_cached_says_how_to_pass_a_local_file(monkeypatch):
    url = closed_port_url()
    with pytest.raises(OfflineError, match="pass it as a local path"):
        resolve_source(url)
    monkeypatch.setitem(SOURCES, "alpaca", NamedSource("alpaca", url, "alpaca_data.json", None, ""))
    with pytest.raises(OfflineError, match="nothing is cached at .*alpaca_data.json"):
        resolve_source("alpaca")
    monkeypatch.setenv("INSTRUCTUNE_OFFLINE", "1")
    with pytest.raises(OfflineError, match="INSTRUCTUNE_OFFLINE"):
        resolve_source("http://127.0.0.1:9/x.json")


def test_offline_uses_the_cache(server, monkeypatch):
    url = server.url + "/data.json"
    resolve_source(url)
    monkeypatch.setenv("INSTRUCTUNE_OFFLINE", "1")
    assert resolve_source(url).read_bytes() == PAYLOAD


def test_local_paths_and_unknown_names(fixtures, tmp_path):
    path = fixtures / "instructions-40.json"
    assert resolve_source(str(path)) == path
    assert len(load_source(path)) == 40
    with pytest.raises(
        DataError, match="not a known data set \\(book, preference, alpaca, demo\\)"
    ):
        resolve_source("nonsense")
    with pytest.raises(DataError, match="no such file"):
        load_source(tmp_path / "missing.json")


def test_demo_is_shipped_and_valid():
    path = resolve_source("demo")
    assert path == demo_path() and isinstance(path, Path)
    records = load_source("demo")
    assert len(records) >= 300
    assert records.warnings == [] and records.skipped == []
