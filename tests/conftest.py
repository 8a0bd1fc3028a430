"""Shared fixtures. Tests never touch the network except 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Keep the unit tests deterministic and light on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that use it skip with a reason when it is absent."""
    if not (SHARED_DATA / "instruction-data.json").exists():
        pytest.skip(f"{SHARED_DATA} is absent (it sits beside the checkout in CI and dev sessions)")
    return SHARED_DATA


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def bos_tokenizer_dir(tmp_path) -> Path:
    """A copy of ``fixtures/tiny-tokenizer`` set to add a beginning-of-sequence token."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(FIXTURES / "tiny-tokenizer", tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return tok_dir


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own download cache, so nothing depends on the user's ~/.cache."""
    monkeypatch.setenv("INSTRUCTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
