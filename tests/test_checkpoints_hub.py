"""Hub ids fetched with huggingface_hub from a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from instructune.checkpoints import load_model
from instructune.errors import OfflineError

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """The few hub endpoints snapshot_download uses: revision info, file tree, file resolve."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        path = self.path.split("?")[0]
        self.requests.append(f"{self.command} {path}")
        if path.startswith("/api/models/") and "/tree/" in path:
            tree = [
                {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(data).hexdigest()}
                for name, data in self.files.items()
            ]  # fmt: skip
            return self._reply(json.dumps(tree).encode(), "application/json")
        if path.startswith("/api/models/"):
            info = {"id": "org/tiny", "sha": COMMIT,
                    "siblings": [{"rfilename": n} for n in self.files]}  # fmt: skip
            return self._reply(json.dumps(info).encode(), "application/json")
        if "/resolve/" in path:
            name = path.split("/resolve/", 1)[1].split("/", 1)[1]
            if name in self.files:
                data = self.files[name]
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                return self._reply(
                    data, "application/octet-stream", {"X-Repo-Commit": COMMIT, "ETag": etag}
                )
        self.send_response(404)
        self.end_headers()

    do_GET = _serve
    do_HEAD = _serve


@pytest.fixture
def tiny_repo(tmp_path):
    """A tiny Llama saved by transformers, plus a file that must not be downloaded."""
    from test_checkpoints import byte_tokenizer, hf_llama, save_hf

    ref = hf_llama(tie=True)
    folder = save_hf(ref, tmp_path / "repo", byte_tokenizer())
    files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    files["pytorch_model.bin"] = b"never fetched: safetensors only"
    return ref, files


@pytest.fixture
def hub_online(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path / "hub-cache"


def test_hub_id_downloads_into_the_cache_then_works_offline(tiny_repo, hub_online, monkeypatch):
    ref, files = tiny_repo
    handler = type("Handler", (HubHandler,), {"files": files, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        loaded = load_model("org/tiny")
    finally:
        server.shutdown()
        server.server_close()
    fetched = {
        r.rsplit("/", 1)[1] for r in handler.requests if r.startswith("GET") and "/resolve/" in r
    }
    assert "config.json" in fetched and "model.safetensors" in fetched
    assert "pytorch_model.bin" not in fetched  # only the allow-listed files
    snapshot = hub_online / "models--org--tiny" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        expected = ref(ids).logits
        assert (loaded.model(ids) - expected).abs().max().item() < 1e-4
    # The server is gone and we are offline: the cached copy still loads.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = load_model("org/tiny")
    with torch.no_grad():
        assert (again.model(ids) - expected).abs().max().item() < 1e-4


def test_unreachable_hub_is_an_offline_error(hub_online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(OfflineError, match="cannot download org/absent"):
        load_model("org/absent")
