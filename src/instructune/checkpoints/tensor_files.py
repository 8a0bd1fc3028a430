"""Read weight files one tensor at a time, and write safetensors as a stream.

Reading: ``model.safetensors``, sharded safetensors with their ``.index.json``, or (only when no
safetensors exist) ``pytorch_model.bin`` through ``torch.load(weights_only=True, mmap=True)``,
which refuses arbitrary pickled objects. Writing: the safetensors layout (an 8-byte header
length, a JSON header, then raw little-endian tensor bytes) is simple enough to write tensor by
tensor, so a save never needs a second, contiguous copy of the whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from instructune.errors import ModelLoadError
from instructune.utils.io import atomic_writer

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {name: dtype for dtype, name in _ST_DTYPES.items()}


class WeightReader:
    """The tensors of a checkpoint directory, by name, read lazily.

    Args:
        directory: a folder holding ``model.safetensors``, ``model.safetensors.index.json`` +
            shards, or ``pytorch_model.bin``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        single = self.directory / "model.safetensors"
        index = self.directory / "model.safetensors.index.json"
        if single.is_file():
            self._index_file(single)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index}: not a safetensors index ({exc})") from None
            for name, shard in weight_map.items():
                path = self.directory / shard
                if not path.is_file():
                    raise ModelLoadError(f"{index} names the shard {shard}, which is missing")
                self._files[name] = path
        elif (self.directory / "pytorch_model.bin").is_file():
            path = self.directory / "pytorch_model.bin"
            try:
                self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # an unsafe pickle or a damaged file
                raise ModelLoadError(f"{path}: cannot load with weights_only=True: {exc}") from None
        else:
            raise ModelLoadError(
                f"{self.directory} holds no weights: expected model.safetensors, "
                "model.safetensors.index.json with its shards, or pytorch_model.bin"
            )

    def _index_file(self, path: Path) -> None:
        handle = self._handle(path)
        for name in handle.keys():
            self._files[name] = path

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from None
        return self._open[path]

    @property
    def is_bin(self) -> bool:
        """Whether the weights come from ``pytorch_model.bin`` (not safetensors)."""
        return self._bin is not None

    def keys(self) -> set[str]:
        return set(self._bin) if self._bin is not None else set(self._files)

    def get(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        return self._handle(self._files[name]).get_tensor(name)

    def stored_dtypes(self) -> list[torch.dtype]:
        """The floating-point dtypes the tensors are stored in, the one holding most values first.

        Read from the safetensors headers (no tensor data is loaded).
        """
        values: dict[torch.dtype, int] = {}
        for name in self.keys():
            if self._bin is not None:
                t = self._bin[name]
                dtype, numel = t.dtype, t.numel()
            else:
                part = self._handle(self._files[name]).get_slice(name)
                dtype = _ST_NAMES.get(part.get_dtype())
                numel = math.prod(part.get_shape())
            if dtype is not None and dtype.is_floating_point:
                values[dtype] = values.get(dtype, 0) + numel
        return sorted(values, key=lambda d: (-values[d], str(d)))

    def dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (what the checkpoint was saved in)."""
        for name in sorted(self.keys()):
            t = self.get(name)
            if t.is_floating_point():
                return t.dtype
        return None


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``(name, tensor)`` pairs as one safetensors file, atomically.

    The header needs every shape first, so ``tensors`` is listed once (views, no copies); then
    each tensor is made contiguous on the CPU and written, and its copy freed before the next.
    """
    path = Path(path)
    items = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
    return path
