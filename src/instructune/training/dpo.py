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

For the training loop (``training.loop.train(objective=...)``): ``PairItem`` (a tokenised
pair with its reference log-probabilities), ``collate_dpo`` (a batch of them, both sides stacked
for one forward pass), ``DpoLoss`` (the model + the loss, one module for DDP) and
``DpoObjective`` (the loss, and the measures every evaluation logs: loss, rewards, margin and
reward accuracy, by ``evaluate_dpo``).

Public names: ``sequence_logprobs``, ``dpo_loss``, ``DpoStats``, ``reference_logprobs``,
``save_reference_logprobs``, ``load_reference_logprobs``, ``PairItem``, ``collate_dpo``,
``DpoLoss``, ``DpoObjective``, ``evaluate_dpo``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from instructune.training import distributed as dist
from instructune.training.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from instructune.data.dataset import TokenizedRecord

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


# ------------------------------------------------------------------------------ the loop's side


@dataclass(frozen=True)
class PairItem:
    """One preference pair as the loop trains on it: both sides tokenised (the same prompt)
    and the reference's mean response log-probability of each."""

    chosen: TokenizedRecord
    rejected: TokenizedRecord
    ref_chosen: float
    ref_rejected: float

    def __len__(self) -> int:  # for length grouping: the longer side sets the padding
        return max(len(self.chosen), len(self.rejected))


DpoBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def collate_dpo(
    items: Sequence[PairItem], *, pad_id: int, max_length: int | None = None
) -> DpoBatch:
    """``(inputs, targets, ref_chosen, ref_rejected)``: the B chosen rows then the B rejected
    rows (2B, T), as ``collate_pairs`` pads them, and the reference log-probabilities (B,)."""
    from instructune.data.collate import collate_pairs

    (ci, ct), (ri, rt) = collate_pairs(
        [(item.chosen, item.rejected) for item in items], pad_id=pad_id, max_length=max_length
    )
    ref_c = torch.tensor([item.ref_chosen for item in items], dtype=torch.float32)
    ref_r = torch.tensor([item.ref_rejected for item in items], dtype=torch.float32)
    return torch.cat([ci, ri]), torch.cat([ct, rt]), ref_c, ref_r


def pair_losses(
    model: nn.Module, batch: DpoBatch, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards of a ``collate_dpo`` batch (on the model's device): the
    policy's log-probabilities of both sides come from one forward pass."""
    inputs, targets, ref_c, ref_r = batch
    logprobs = sequence_logprobs(model, inputs, targets)
    n = ref_c.shape[0]
    return dpo_loss(logprobs[:n], logprobs[n:], ref_c, ref_r, beta=beta)


class DpoLoss(nn.Module):
    """``model`` + the DPO loss as one module (so DDP can wrap the pair):
    ``forward(inputs, targets, ref_chosen, ref_rejected, grad_scale=...)`` returns the summed
    per-pair loss; the loop multiplies it by ``grad_scale`` (1 / pairs of the step) itself."""

    def __init__(self, model: nn.Module, *, beta: float = DEFAULT_BETA) -> None:
        super().__init__()
        self.model = model
        self.beta = beta

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        losses, _, _ = pair_losses(
            self.model, (inputs, targets, ref_chosen, ref_rejected), beta=self.beta
        )
        return losses.sum()


# The measures of an evaluation, in the order metrics.jsonl lists them.
MEASURES = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")


@torch.no_grad()
def evaluate_dpo(
    model: nn.Module,
    items: Sequence[PairItem],
    batches: list[list[int]],
    collate: Callable[[list[PairItem]], DpoBatch],
    *,
    beta: float = DEFAULT_BETA,
    device: torch.device,
    precision: str = "fp32",
    info: dist.DistInfo | None = None,
) -> dict[str, float | None]:
    """The mean over ``batches`` of each batch's ``DpoStats`` (the book's ``evaluate_dpo_loss_
    loader`` averages batch means too), in eval mode; every measure None without batches.

    Batches are shared out over processes, each filling its own slots, summed together.
    """
    from instructune.training.loop import autocast_context

    info = info or dist.DistInfo()
    if not batches:
        return dict.fromkeys(MEASURES)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(MEASURES), len(batches), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if i % info.world_size != info.rank:
            continue
        tensors = tuple(t.to(device) for t in collate([items[j] for j in batch]))
        with autocast_context(device, precision):
            stats = DpoStats.of(*pair_losses(model, tensors, beta=beta))  # type: ignore[arg-type]
        for row, name in enumerate(MEASURES):
            sums[row, i] = getattr(stats, name)
    model.train(was_training)
    dist.all_reduce_sum(sums, info)
    means = sums.mean(dim=1)
    return {name: float(means[row]) for row, name in enumerate(MEASURES)}


class DpoObjective:
    """DPO for ``training.loop.train``: the mean per-pair loss over the global batch's pairs;
    evaluations log the loss, both rewards, their margin and the reward accuracy."""

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        self.beta = beta

    def loss_module(self, model: nn.Module) -> nn.Module:
        return DpoLoss(model, beta=self.beta)

    def sizes(self, batch: tuple[torch.Tensor, ...]) -> tuple[int, int, int]:
        inputs, targets, ref_c, _ = batch
        return ref_c.shape[0], int((targets != IGNORE_INDEX).sum()), inputs.numel()

    def evaluate(self, model, items, batches, collate, *, device, precision, info):
        return evaluate_dpo(
            model, items, batches, collate,
            beta=self.beta, device=device, precision=precision, info=info,
        )  # fmt: skip

    def describe(self, train: dict[str, Any], val: dict[str, Any]) -> str:
        def text(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        return (
            f"Train loss {text(train['loss'])}, Val loss {text(val['loss'])}, "
            f"Train reward margin {text(train['margin'])}, Val reward margin {text(val['margin'])}"
        )
