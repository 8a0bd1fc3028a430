"""Fill a model built on the ``meta`` device with real tensors, one parameter at a time.

Nothing is allocated twice: each source tensor is read, converted and assigned, and the
reader can drop it before the next one. Tied heads stay tied because our models have no
separate head parameter when tied (``output_weight`` returns the embedding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from instructune.checkpoints.hf import KeyMap
from instructune.errors import ModelLoadError


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted) by ``tensor``, keeping its ``requires_grad``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters[leaf]
    requires_grad = old.requires_grad if old is not None else True
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)


def fill_from(
    model: nn.Module,
    maps: list[KeyMap],
    get_tensor: Callable[[str], torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    source: str,
) -> None:
    """Assign every parameter of ``model`` from ``get_tensor(map.hf)`` following ``maps``.

    Raises:
        ModelLoadError: a tensor has the wrong shape, or a parameter is left unfilled.
    """
    params = dict(model.named_parameters())
    groups: dict[str, list[KeyMap]] = {}
    for m in maps:
        groups.setdefault(m.ours, []).append(m)
    for ours, parts in groups.items():
        shape = params[ours].shape
        if len(parts) == 1 and parts[0].rows is None:
            src = _read(get_tensor, parts[0], source)
            _check_shape(src.shape, tuple(shape), parts[0].hf, source)
            tensor = src.to(device=device, dtype=dtype)
            if parts[0].transpose:
                tensor = tensor.contiguous()
        else:
            tensor = torch.empty(shape, device=device, dtype=dtype)
            for part in parts:
                src = _read(get_tensor, part, source)
                start, stop = part.rows
                _check_shape(src.shape, (stop - start, *shape[1:]), part.hf, source)
                tensor[start:stop].copy_(src)
        set_parameter(model, ours, tensor)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"{source}: no weights for {', '.join(left[:10])}")


def _read(get_tensor: Callable[[str], torch.Tensor], m: KeyMap, source: str) -> torch.Tensor:
    t = get_tensor(m.hf)
    return t.t() if m.transpose else t


def _check_shape(got, want: tuple[int, ...], key: str, source: str) -> None:
    if tuple(got) != tuple(want):
        raise ModelLoadError(
            f"{source}: tensor {key!r} has shape {tuple(got)}, the config needs {tuple(want)}"
        )
