"""Direct Preference Optimization's arithmetic: response log-probabilities and the DPO loss.

DPO (Rafailov et al., 2023) trains a policy so that, against a frozen reference, the chosen
response gains log-probability relative to the rejected one:

    loss = -log sigmoid(beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))))

As in the book's chapter-7 bonus notebook, ``log pi(y)`` is the *mean* log-probability per
response token (its ``compute_logprobs`` averaged over the selection mask), and the rewards it
reports are the log-probability differences ``log pi(y) - log ref(y)``, without beta. When the
policy is the reference (the first step), both rewards are 0 and the loss is ln 2.

A batch is what ``data.collate.collate(..., mask_prompt=True)`` makes of each side: inputs and
targets (B, T), the prompt and the padding set to ``IGNORE_INDEX`` in the targets, so only
response tokens (the end token included) count.

The reference model is frozen, so its log-probabilities of every pair are computed once, before
training, and kept in the run directory (``reference_logprobs``, ``save_reference_logprobs``,
``load_reference_logprobs``): the reference need not stay in memory, and a resumed run reads
them back instead of recomputing.

Public names: ``sequence_logprobs``, ``dpo_loss``, ``DpoStats``, ``reference_logprobs``,
``save_reference_logprobs``, ``load_reference_logprobs``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instructune.training.loss import IGNORE_INDEX

# The book's beta (its DPO notebook, and the DPO paper's usual value).
DEFAULT_BETA = 0.1


def sequence_logprobs(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The mean log-probability of each row's supervised targets, (B,), in fp32 (or wider).

    The head runs on the supervised positions only (``model.output_weight`` over
    ``forward_hidden``), so the prompt's logits are never computed. A row with no supervised
    target gets 0.

    Args:
        model: a model with ``forward_hidden`` and ``output_weight``.
        inputs, targets: (B, T) as the collate makes them (right-padded, targets shifted).
    """
    hidden = model.forward_hidden(inputs)  # (B, T, D)
    # fp32 at least (bf16/fp16 models), the model's own dtype when wider (fp64 in tests).
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    supervised = targets != IGNORE_INDEX
    rows, cols = supervised.nonzero(as_tuple=True)
    logits = F.linear(hidden[rows, cols], model.output_weight).to(dtype)  # (N, V)
    picked = logits.gather(1, targets[rows, cols].unsqueeze(1)).squeeze(1)
    token_logprobs = picked - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(inputs.shape[0], dtype=dtype, device=inputs.device)
    sums = sums.index_add(0, rows, token_logprobs)
    counts = supervised.sum(dim=1).clamp(min=1)
    return sums / counts


@dataclass
class DpoStats:
    """What a DPO batch reports: the mean loss, the mean rewards and margin, and the share of
    pairs whose chosen reward is above the rejected one."""

    loss: float
    chosen_reward: float
    rejected_reward: float
    margin: float
    accuracy: float

    @classmethod
    def of(cls, losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> DpoStats:
        return cls(
            loss=float(losses.detach().mean()),
            chosen_reward=float(chosen.mean()),
            rejected_reward=float(rejected.mean()),
            margin=float((chosen - rejected).mean()),
            accuracy=float((chosen > rejected).float().mean()),
        )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,), and the chosen and rejected rewards (B,), detached.

    Arguments are per-pair mean response log-probabilities (``sequence_logprobs``); the
    reference's carry no gradient.
    """
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number, got {beta}")
    chosen = policy_chosen - reference_chosen.detach()
    rejected = policy_rejected - reference_rejected.detach()
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, chosen.detach(), rejected.detach()


@torch.inference_mode()
def reference_logprobs(
    model: nn.Module,
    batches: Iterable[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's mean response log-probabilities of every pair, in batch order: chosen
    (N,) and rejected (N,), on the CPU. ``batches`` are ``collate_pairs`` batches; the model is
    put in eval mode (no dropout: the reference is a fixed function)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for (ci, ct), (ri, rt) in batches:
            device = model.output_weight.device
            chosen.append(sequence_logprobs(model, ci.to(device), ct.to(device)).cpu())
            rejected.append(sequence_logprobs(model, ri.to(device), rt.to(device)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def save_reference_logprobs(
    path: str | os.PathLike, chosen: torch.Tensor, rejected: torch.Tensor, *, key: str
) -> Path:
    """Write the reference log-probabilities (safetensors, atomically) with the ``key`` they
    belong to (a digest of the reference weights and the records, made by the caller)."""
    from instructune.checkpoints.tensor_files import write_safetensors

    return write_safetensors(
        path, [("chosen", chosen), ("rejected", rejected)], metadata={"key": key}
    )


def load_reference_logprobs(
    path: str | os.PathLike, *, key: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached log-probabilities when ``path`` holds them for ``key``; None when it is
    missing or was written for another reference or other records (then compute them again)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("chosen"), f.get_tensor("rejected")
