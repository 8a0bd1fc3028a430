"""The declared torch floor covers every torch feature the package uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "instructune"

# torch features newer than 2.0, as they appear in code, with the release that added them (from
# the PyTorch release notes). A feature guarded by a fallback (fused AdamW on the CPU, 2.4, tried
# inside try/except in training/optim.py) sets no floor and is not listed.
FEATURES: dict[str, tuple[tuple[int, int], str]] = {
    r"\benable_gqa\s*=": ((2, 5), "scaled_dot_product_attention(enable_gqa=...)"),
    r"\bflex_attention\b": ((2, 5), "torch.nn.attention.flex_attention"),
    r"\btorch\.accelerator\b": ((2, 6), "torch.accelerator"),
    r"\bF\.rms_norm\b|\bfunctional\.rms_norm\b": ((2, 4), "torch.nn.functional.rms_norm"),
    r"\bnn\.RMSNorm\b": ((2, 4), "torch.nn.RMSNorm"),
    r"\bget_autocast_dtype\b": ((2, 4), "torch.get_autocast_dtype"),
    r"\bis_autocast_enabled\(\s*[\w.]+": ((2, 4), "torch.is_autocast_enabled(device_type)"),
    r"\badd_safe_globals\b": ((2, 4), "torch.serialization.add_safe_globals"),
    r"\bamp\.custom_(fwd|bwd)\b": ((2, 4), "torch.amp.custom_fwd/custom_bwd"),
    r"\bamp\.GradScaler\b": ((2, 3), "torch.amp.GradScaler (CPU and CUDA)"),
    r"\bget_default_device\b": ((2, 3), "torch.get_default_device"),
    r"\bregister_post_accumulate_grad_hook\b": ((2, 1), "register_post_accumulate_grad_hook"),
    r"\bmmap\s*=\s*True\b": ((2, 1), "torch.load(mmap=True)"),
}


def declared_torch_floor() -> tuple[int, int]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch\s*>=\s*(\d+)\.(\d+)(\.\d+)?", torch_dep.strip())
    assert match, f"expected 'torch>=X.Y' in pyproject.toml, got {torch_dep!r}"
    return int(match.group(1)), int(match.group(2))


def features_used() -> dict[str, tuple[tuple[int, int], list[str]]]:
    """Each feature found in src/: its version and where (file:line)."""
    found: dict[str, tuple[tuple[int, int], list[str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]  # comments may name a feature without using it
            for pattern, (version, what) in FEATURES.items():
                if re.search(pattern, code):
                    where = f"{path.relative_to(REPO)}:{number}"
                    found.setdefault(what, (version, []))[1].append(where)
    return found


def test_declared_torch_floor_covers_every_feature_used():
    floor = declared_torch_floor()
    used = features_used()
    assert used, "the scan found no torch feature at all: is SRC right?"
    too_new = {what: (f"{v[0]}.{v[1]}", places) for what, (v, places) in used.items() if v > floor}
    assert not too_new, f"pyproject.toml says torch>={floor[0]}.{floor[1]}, but src/ uses {too_new}"


def test_the_floor_is_what_sdpa_with_grouped_query_attention_needs():
    # models/layers.py attends with enable_gqa (torch 2.5): the floor the issue found wrong.
    assert "scaled_dot_product_attention(enable_gqa=...)" in features_used()
    assert declared_torch_floor() >= (2, 5)


def test_installed_torch_meets_the_floor():
    import torch

    installed = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    assert installed >= declared_torch_floor()
