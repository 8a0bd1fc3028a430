"""The training loss: cross-entropy over supervised positions only, with the head fused in.

The book computes logits for every position (B, T, V) and then ignores the ones whose target
is -100. Here the output head runs only on the supervised rows of the final hidden states, in
chunks, and each chunk's gradient is computed right away in the forward pass (softmax minus
one-hot), so neither the full logits nor their softmax are ever kept for backward. For GPT-2
medium at batch 8 x 1024 that is 1.6 GB of logits (and as much again for their gradient)
replaced by one (chunk, V) buffer. The arithmetic is the same as the book's
``F.cross_entropy(logits.flatten(0, 1), targets.flatten())`` up to float rounding.

Losses are returned as a *sum* with the count of supervised tokens, so that the caller can
divide by the global count of an optimizer step (gradient accumulation, several processes).
With ``per_record`` each row's tokens are weighted by 1 / its supervised tokens, so the sum
counts records instead (a one-word answer weighs as much as a paragraph) and the caller
divides by the records of the step.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from instructune.models.layers import linear, packed_causal_attention

IGNORE_INDEX = -100
# Rows of logits per chunk: 512 x 50257 fp32 = 103 MB, big enough for efficient matmuls.
DEFAULT_CHUNK_ROWS = 512


def _chunk_loss_and_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor,
    want_grad: bool,
    grad_mult: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of -log p(t | h) for one chunk (each row's term times ``row_weights``, (n,), when
    given), and d(sum)/d(logits) when ``want_grad``.

    ``grad_mult`` (a 0-dim tensor) multiplies the returned gradient; it and the row weights are
    folded into the normalisation and the one-hot so that they cost no extra pass over the
    (n, V) buffer.
    """
    logits = linear(h, w).float()  # (n, V); softmax statistics in fp32
    # Everything in place on the logits buffer: shift by the row max, exp, sum, and scale the
    # same buffer into the softmax. torch.logsumexp followed by exp(logits - lse) allocated and
    # faulted in a second (n, V) buffer and took two more passes (~50 ms a step for GPT-2).
    rows = torch.arange(t.numel(), device=t.device)
    shifted = logits.sub_(logits.amax(dim=1, keepdim=True))
    target_shifted = shifted[rows, t]
    probs = shifted.exp_()  # unnormalised
    row_sums = probs.sum(dim=1)
    per_row = row_sums.log() - target_shifted  # lse - target logit
    loss = per_row.sum() if row_weights is None else per_row.mul(row_weights).sum()
    if not want_grad:
        return loss, None
    # (softmax(logits) - onehot(t)) times grad_mult, each row times its weight.
    onehot = torch.ones_like(row_sums) if row_weights is None else row_weights.float()
    if grad_mult is not None:
        onehot = onehot * grad_mult
    grad = probs.mul_((onehot / row_sums).unsqueeze(1))
    grad[rows, t] -= onehot
    return loss, grad


# Under fp16 the gradient operand softmax - onehot (entries in [-1, 1]) is multiplied by 2**15
# before its cast: probabilities down to ~2e-12 stay representable instead of flushing to zero
# below fp16's smallest subnormal (6e-8), and 2**15 < 65504 cannot overflow. A power of two,
# so dividing it out again in fp32 is exact.
_FP16_GRAD_MULT = 2.0**15
# torch >= 2.8 multiplies fp16 matrices into an fp32 result on CUDA (fp32 accumulation, no
# rounding of the sums to fp16); elsewhere the fp16 operands are widened to fp32 instead.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for fp16 operands, summed and returned in fp32: no fp16 rounding of the sums."""
    # Autocast (still on inside the Function) would turn the fp32 product back into fp16.
    with torch.autocast(a.device.type, enabled=False):
        if a.is_cuda and _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, targets_i), its gradients computed during forward.

    ``grad_scale`` is the factor the caller will multiply the loss by (1 / token count). The
    stored gradients are pre-multiplied by it, so backward usually has nothing left to do; any
    other upstream gradient (a GradScaler's factor) is still handled exactly.

    fp32 and bf16 (fp32's exponent range) let the scale ride on the small (N, D) operand. fp16
    cannot: 1/N times a probability of ~1/V underflows its range (the GradScaler's factor only
    arrives in backward, too late to help), and even unscaled sums of such products round to
    zero in an fp16 result. So under fp16 the operand is 2**15 * (softmax - onehot) in fp16,
    the products are summed into fp32 results, grad_scale / 2**15 is applied in fp32, and the
    stored gradients stay fp32 until backward has applied the upstream factor.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, hidden, weight, targets, chunk_rows, compute_dtype, grad_scale, row_weights
    ):
        w = weight.to(compute_dtype)
        fp16 = compute_dtype == torch.float16
        if fp16:
            mult = torch.tensor(_FP16_GRAD_MULT, device=hidden.device)
            unscale = grad_scale / _FP16_GRAD_MULT
            grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        else:
            mult = None
            grad_hidden = torch.empty_like(hidden)
        # A frozen head (--freeze-blocks with a tied embedding) needs no (V, D) gradient:
        # that skips one of the head's three matmuls.
        want_weight = ctx.needs_input_grad[1]
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            weights = None if row_weights is None else row_weights[rows]
            loss, grad = _chunk_loss_and_grad(h, w, targets[rows], True, mult, weights)
            total += loss
            g = grad.to(compute_dtype)
            if fp16:
                grad_hidden[rows] = _mm_fp32_out(g, w).mul_(unscale)
                gw = _mm_fp32_out(g.t(), h) if want_weight else None  # (V, D), fp32
            else:
                grad_hidden[rows] = torch.mm(g, w).mul_(grad_scale)
                # The scale rides on the small operand.
                gw = torch.mm(g.t(), h * grad_scale) if want_weight else None
            if gw is None:
                continue
            if grad_weight is None:
                grad_weight = gw.float()  # the first chunk allocates: no zero fill of (V, D)
            else:
                grad_weight += gw
        if not want_weight:
            grad_weight = torch.empty(0, device=weight.device)  # a placeholder, never returned
        elif grad_weight is None:  # no supervised rows at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        elif fp16:
            grad_weight.mul_(unscale)  # one fp32 pass over (V, D) per call
        ctx.grad_scale = grad_scale
        ctx.dtypes = hidden.dtype, weight.dtype
        if want_weight and not fp16:  # fp32 / bf16: stored in the parameters' own dtypes
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        # The loss is a scalar, so its upstream gradient is one number; usually the one the
        # gradients were already scaled by (times a GradScaler's factor under fp16).
        factor = float(grad_output) / ctx.grad_scale
        want_weight = ctx.needs_input_grad[1]
        if factor != 1.0:
            grad_hidden = grad_hidden * factor
            grad_weight = grad_weight * factor if want_weight else grad_weight
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_weight = grad_weight.to(weight_dtype) if want_weight else None
        return grad_hidden.to(hidden_dtype), grad_weight, None, None, None, None, None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype inside an autocast region, else the tensor's."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    grad_scale: float = 1.0,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)``, chunked.

    Args:
        hidden: (N, D) hidden states of supervised positions only.
        weight: (V, D) output head.
        targets: (N,) token ids (no -100 here).
        grad_scale: what the caller will multiply the sum by before ``backward`` (a hint
            that saves a pass over the (V, D) gradient; any value gives correct gradients).
        row_weights: (N,) a factor for each row's term (none: 1).
    """
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        # The loss is fp32, so the upstream gradient backward receives is fp32(grad_scale),
        # and fp32 gradients multiplied by a Python float are multiplied by its fp32 rounding.
        # Rounded the same way here, the usual upstream gradient matches the hint exactly and
        # backward skips a pass over the (V, D) gradient (80 ms a step for GPT-2 on the CPU).
        scale = struct.unpack("f", struct.pack("f", float(grad_scale) or 1.0))[0]
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, targets, chunk_rows, dtype, scale, row_weights
        )
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.to(dtype)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        weights = None if row_weights is None else row_weights[rows]
        loss, _ = _chunk_loss_and_grad(
            hidden[rows].to(dtype), w, targets[rows], False, None, weights
        )
        total += loss
    return total


def count_supervised(targets: torch.Tensor) -> int:
    """Number of target positions that carry a loss (targets != -100)."""
    return int((targets != IGNORE_INDEX).sum())


def supervised_loss_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    grad_scale: float = 1.0,
    per_record: bool = False,
    fixed_prompts: bool = False,
) -> torch.Tensor:
    """Summed token loss of a batch: the head and softmax only where targets != -100.

    ``model`` must offer ``forward_hidden(input_ids)`` -> (B, T, D) and ``output_weight``
    -> (V, D), as instructune's models do. ``grad_scale``: see ``linear_cross_entropy_sum``.
    ``per_record``: the sum over rows of each row's mean token loss (:func:`record_weights`).

    On a CPU, a batch with padding is packed first (:func:`packed_rows`) when the model takes
    ``segments``, so no arithmetic is spent on padded positions; the loss is the same sum.
    ``fixed_prompts``: the prompts run without gradients (:func:`fixed_prompt_hidden`).
    """
    if fixed_prompts:
        if per_record:
            raise ValueError("fixed prompts take the token average")
        hidden, targets = fixed_prompt_hidden(model, inputs, targets)
        return loss_sum_from_hidden(
            hidden, model.output_weight, targets, chunk_rows=chunk_rows, grad_scale=grad_scale
        )
    weights = record_weights(targets) if per_record else None
    packed = None
    if inputs.device.type == "cpu" and getattr(model, "packs_sequences", False):
        packed = packed_rows(inputs, targets)
    if packed is not None:
        inputs, targets, segments, keep = packed
        weights = None if weights is None else weights[keep][None]
        hidden = model.forward_hidden(inputs, segments=segments)
    else:
        hidden = model.forward_hidden(inputs)
    return loss_sum_from_hidden(
        hidden,
        model.output_weight,
        targets,
        chunk_rows=chunk_rows,
        grad_scale=grad_scale,
        token_weights=weights,
    )


def record_weights(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) weights that make a summed token loss a sum of per-row mean losses: 1 / the
    row's supervised tokens at each of them, 0 elsewhere."""
    supervised = (targets != IGNORE_INDEX).float()
    return supervised / supervised.sum(dim=1, keepdim=True).clamp(min=1)


def count_records(targets: torch.Tensor) -> int:
    """Rows that carry a loss: what ``per_record`` sums over."""
    return int((targets != IGNORE_INDEX).any(dim=1).sum())


def packed_rows(
    inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor] | None:
    """The batch's rows end to end without what follows their last supervised target, as
    ``(inputs (1, N), targets (1, N), row lengths, kept (B, T) mask)``; None when no row has
    anything to drop.

    Causal attention means that no later position changes an earlier one's loss, so cutting
    each row after its last target (the padding, and an answer truncated by masking) and
    letting each row attend to itself alone (the model's ``segments``) leaves every loss
    term as it was. Rows without a target are left out.

    Only for a CPU: there the padded positions of a shuffled batch of the book's data (16%)
    are arithmetic; on a GPU at these sizes a step is bound by launching kernels, and one
    attention call per row would add launches.
    """
    b, t = targets.shape
    supervised = targets != IGNORE_INDEX
    positions = torch.arange(1, t + 1, device=targets.device)
    lengths = (supervised * positions).amax(dim=1)  # up to the last target; 0 for none
    if bool((lengths == t).all()):
        return None
    keep = torch.arange(t, device=targets.device)[None, :] < lengths[:, None]
    segments = tuple(n for n in lengths.tolist() if n > 0)
    return inputs[keep][None], targets[keep][None], segments, keep


class _FixedPrompts:
    """The models' cache protocol (``attend``) for training on answers over fixed prompts.

    Two model calls share it. The first (``filling``, without gradients) runs every row's
    prompt, packed end to end, each attending causally to itself, and keeps each row's keys and
    values at every layer. The second runs the answers, packed the same way: each row's queries
    attend over its own prompt's kept keys and values, then causally over its own answer's.
    """

    length = 0  # the model builds no mask of its own: attention here is per row

    def __init__(self, prompts: Sequence[int], answers: Sequence[int]) -> None:
        self.prompts = list(prompts)
        self.answers = list(answers)
        self.filling = True
        self.keys: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.masks: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.filling:
            self.keys[layer] = (list(k.split(self.prompts, 2)), list(v.split(self.prompts, 2)))
            return packed_causal_attention(q, k, v, self.prompts)
        gqa = k.shape[1] != q.shape[1]
        if not self.masks:
            # Answer query t sits at position p + t and sees the keys at positions <= p + t.
            self.masks = [
                torch.ones(a, p + a, dtype=torch.bool, device=q.device).tril(p)
                for p, a in zip(self.prompts, self.answers, strict=True)
            ]
        prompt_k, prompt_v = self.keys[layer]
        qs, ks, vs = (t.split(self.answers, 2) for t in (q, k, v))
        outs = [
            F.scaled_dot_product_attention(
                qi, torch.cat([pk, ki], 2), torch.cat([pv, vi], 2), attn_mask=mask, enable_gqa=gqa
            )
            for qi, ki, vi, pk, pv, mask in zip(qs, ks, vs, prompt_k, prompt_v, self.masks,
                                                strict=True)
        ]  # fmt: skip
        return torch.cat(outs, dim=2)

    def advance(self, n: int) -> None:
        """Nothing: positions are given to each call."""


def fixed_prompt_hidden(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (1, N, D) of the batch's answer positions and their targets (1, N),
    with every prompt run without gradients.

    A row's prompt is what precedes its first supervised position, its answer what follows up
    to its last. The loss is the same function of the weights as the packed one's; only its
    gradient differs: it does not reach the weights through the prompt positions' keys and
    values, so backward skips the prompt positions (about two thirds of the book's tokens with
    an empty system turn). Rows without a target are left out.
    """
    t = targets.shape[1]
    supervised = targets != IGNORE_INDEX
    positions = torch.arange(t, device=targets.device)
    has = supervised.any(dim=1)
    first = torch.where(supervised, positions, t).amin(dim=1)
    last = torch.where(supervised, positions, -1).amax(dim=1)
    rows = has.nonzero().flatten().tolist()
    starts = first.tolist()
    ends = (last + 1).tolist()
    prompts = [starts[r] for r in rows]
    answers = [ends[r] - starts[r] for r in rows]
    if not rows or min(prompts) == 0:
        raise ValueError("fixed prompts need a prompt before every row's first target")
    prefix = _FixedPrompts(prompts, answers)
    cat = torch.cat  # the rows' pieces, end to end
    prompt_ids = cat([inputs[r, : starts[r]] for r in rows])[None]
    prompt_pos = cat([torch.arange(starts[r], device=inputs.device) for r in rows])[None]
    with torch.no_grad():
        model.forward_hidden(prompt_ids, position_ids=prompt_pos, cache=prefix)
    prefix.filling = False
    answer_ids = cat([inputs[r, starts[r] : ends[r]] for r in rows])[None]
    answer_pos = cat([torch.arange(starts[r], ends[r], device=inputs.device) for r in rows])[None]
    answer_targets = cat([targets[r, starts[r] : ends[r]] for r in rows])[None]
    hidden = model.forward_hidden(answer_ids, position_ids=answer_pos, cache=prefix)
    return hidden, answer_targets


def loss_sum_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    grad_scale: float = 1.0,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``supervised_loss_sum`` from the final hidden states (B, T, D) of the batch; each
    token's term times ``token_weights`` (B, T) when given."""
    mask = targets != IGNORE_INDEX
    rows = hidden[mask]  # (N, D): positions that carry a loss
    return linear_cross_entropy_sum(
        rows,
        output_weight,
        targets[mask],
        chunk_rows=chunk_rows,
        grad_scale=grad_scale,
        row_weights=None if token_weights is None else token_weights[mask],
    )


class SupervisedLoss(nn.Module):
    """``model`` + the loss as one module, so DistributedDataParallel can wrap the pair.

    ``forward(inputs, targets, grad_scale=1.0)`` returns the summed token loss; the caller
    multiplies it by ``grad_scale`` (1 / supervised tokens of the step) before backward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        per_record: bool = False,
        fixed_prompts: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        self.per_record = per_record
        self.fixed_prompts = fixed_prompts

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, grad_scale: float = 1.0
    ) -> torch.Tensor:
        return supervised_loss_sum(
            self.model,
            inputs,
            targets,
            chunk_rows=self.chunk_rows,
            grad_scale=grad_scale,
            per_record=self.per_record,
            fixed_prompts=self.fixed_prompts,
        )


def reference_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The book's loss (full logits, ignore_index=-100), as a sum: for tests and benchmarks."""
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
