"""``ContinuousBatch``: the KV-cached batch the engine decodes, which rows join and leave between
steps.

Layout: the rows are right-aligned. Every row's latest token sits in the last used column of
the cache; a row that came later (or has a shorter prompt) has padding columns on its left,
hidden by the attention mask, and its positions count its own tokens from 0. So each row sees
exactly what it would see alone, as in ``generation.decoding.BatchDecoder``::

    columns:    s    .    .    .    .    e-1
    row 0:      a0   a1   a2   a3   a4   a5     (running for a while)
    row 1:      pad  pad  b0   b1   b2   b3     (joined later)
    row 2:      pad  pad  pad  c0   c1   c2     (its prompt just prefilled)

The rows and columns in use are a window, rows ``[0, n)`` and columns ``[s, e)``, of buffers
with spare rows and spare columns on both sides, so that rows joining and leaving cost about
what the rows themselves hold, not a copy of the whole cache:

- a decoding step writes column ``e`` (spare columns on the right, so the buffers grow by a copy
  once in many steps);
- joining prompts are prefilled as a group of their own (left-padded like any batch) with
  caches of their own, in the same model call as the running rows' step (``_Joint``: the
  weights are read once for both), then their keys/values are copied into spare rows,
  right-aligned with the rest; a prompt longer than the window moves ``s`` left into the spare
  columns (the other rows get padding there, which is only a change of their mask);
- a leaving row is replaced by the last row (one row copied), and the columns no remaining row
  uses are dropped by moving ``s`` right (nothing copied), so the attention is as wide as the
  longest running row, never wider.

Prompts mostly start alike (the Alpaca preamble, a chat template's system prompt): the keys and
values of one earlier prompt are kept, and a joining prompt that starts as it did gets those
copied instead of running them again, as ``BatchDecoder`` does for a batch's shared prefix.

Public name: ``ContinuousBatch``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from instructune.generation.decoding import left_padded
from instructune.models.layers import build_attention_mask, linear

# Spare columns kept on the right of the window when the buffers are laid out again (at least
# this many, or the window's width: the buffers double, so growing costs O(1) per step).
_HEADROOM = 32
# Spare columns kept on the left, for a joining prompt longer than the rows running.
_LEFT_SPARE = 64
# A prefix shared with an earlier prompt is copied rather than run again when it is at least
# this long (below that, the copy costs about what it saves).
_MIN_PREFIX = 4


class _Window:
    """The cache as the model sees it: rows ``[0, rows)`` and columns ``[start, start + length)``
    of per-layer key/value buffers (R, KV, C, hd).

    It speaks the model's cache protocol (``length``, ``update``, ``advance``) as the models'
    ``KVCache`` does, but the batch owns the buffers, so rows and columns can be moved.
    """

    def __init__(
        self, k: list[torch.Tensor], v: list[torch.Tensor], rows: int, start: int, length: int
    ):
        self.k = k
        self.v = v
        self.rows = rows
        self.start = start
        self.length = length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + self.length
        new_end = end + k.shape[2]
        self.k[layer][: self.rows, :, end:new_end] = k
        self.v[layer][: self.rows, :, end:new_end] = v
        return (
            self.k[layer][: self.rows, :, self.start : new_end],
            self.v[layer][: self.rows, :, self.start : new_end],
        )

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class _Group:
    """Rows that one model call runs alike: their new tokens ``ids`` (rows, width) at
    ``positions``, the cache ``window`` they attend through and its key ``mask`` (rows, keys),
    which hides padding when ``padded``. Joining prompts also keep their token lists and the
    length of the prefix copied from the kept prompt."""

    ids: torch.Tensor
    positions: torch.Tensor
    window: _Window
    mask: torch.Tensor
    padded: bool
    prompts: list[list[int]] = field(default_factory=list)
    shared: int = 0

    def attention_mask(self) -> torch.Tensor | None:
        """SDPA's mask for this group (None: no padding, plain causal attention)."""
        return build_attention_mask(
            self.mask if self.padded else None,
            self.window.length,
            self.ids.shape[1],
            self.ids.device,
        )


class _Joint:
    """The cache protocol for one model call that runs several groups (the running rows'
    next tokens and the joining prompts) as one flat sequence (1, T).

    A separate prefill is one more pass over every weight: on the CPU, where a few rows cost
    about what one does, that is most of its price. Flattened, every projection and MLP runs on
    all the tokens at once, and only attention, which each group does over its own cache and
    mask, is split (``attend``, which the attention layers call instead of ``update``).
    """

    length = 0  # the model builds no mask and no positions of its own: the groups have them

    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self._masks = [g.attention_mask() for g in groups]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention for (1, H, T, hd) queries and (1, KV, T, hd) new keys/values, each group
        over its own cache; returns (1, H, T, hd)."""
        outs, first = [], 0
        for group, mask in zip(self.groups, self._masks, strict=True):
            rows, width = group.ids.shape
            span = slice(first, first + rows * width)
            first += rows * width
            # (1, X, rows * width, hd) -> (rows, X, width, hd)
            qg, kg, vg = (t[0, :, span].unflatten(1, (rows, width)).transpose(0, 1)
                          for t in (q, k, v))  # fmt: skip
            past = group.window.length
            kg, vg = group.window.update(layer, kg, vg)
            out = F.scaled_dot_product_attention(
                qg,
                kg,
                vg,
                attn_mask=mask,
                is_causal=mask is None and past == 0 and width > 1,
                enable_gqa=kg.shape[1] != qg.shape[1],
            )
            outs.append(out.transpose(0, 1).flatten(1, 2))  # (H, rows * width, hd)
        return torch.cat(outs, dim=1)[None]

    def advance(self, n: int) -> None:
        """Nothing: the batch moves its window itself after the call."""


class ContinuousBatch:
    """The rows decoded together; rows join (prefilled) and leave between steps.

    The engine drives it: ``step(prompts)`` runs the model once for the running rows (feeding
    each the token ``accept`` gave it) and prefills ``prompts`` as new rows, appended after the
    running ones; it returns the next-token logits of every row. ``accept(tokens)`` gives every
    row its chosen token; ``remove(rows)`` drops rows and says how the others were reordered.

    Args:
        model: a model with ``forward_hidden``, ``output_weight`` and ``new_cache``.
        pad_id: the id put in padded positions of a prefill (never attended to).
        max_rows: the most rows there will be (the engine's ``max_batch``): buffers never get
            more rows than this.
    """

    def __init__(self, model: torch.nn.Module, *, pad_id: int, max_rows: int | None = None):
        self.model = model
        self.pad_id = pad_id
        self.max_rows = max_rows
        self.device = model.output_weight.device
        # The cache's shape per layer, from the model's own cache (its public API).
        probe = model.new_cache(1, 1, device=self.device)
        self._layers = len(probe.k)
        _, self._kv_heads, _, self._head_dim = probe.k[0].shape
        self._dtype = probe.k[0].dtype
        # The keys/values of one earlier prompt, (1, KV, len, hd) per layer, for _prefill.
        self._prefix_ids: list[int] = []
        self._prefix_k: list[torch.Tensor] = []
        self._prefix_v: list[torch.Tensor] = []
        self.reused_tokens = 0  # prompt tokens whose keys/values came from the kept prefix
        self.relayouts = 0  # times the buffers were allocated and the window copied
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.reset()

    def __len__(self) -> int:
        return int(self.next_pos.shape[0])

    def reset(self) -> None:
        """Forget every row (the buffers are kept for the next ones)."""
        self.start = self.end = _LEFT_SPARE if self._k else 0
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)  # (n, e - s)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # (n,)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # (n,) to feed next

    @property
    def _row_capacity(self) -> int:
        return self._k[0].shape[0] if self._k else 0

    @property
    def _column_capacity(self) -> int:
        return self._k[0].shape[2] if self._k else 0

    def _relayout(self, *, rows: int, left: int, right: int) -> None:
        """Move the window into new buffers with at least ``rows`` rows, ``left`` spare columns
        before it and ``right`` after it."""
        n, width = len(self), self.end - self.start
        if rows > self._row_capacity:
            # Double, so a batch filling up one row at a time is copied log2(rows) times.
            rows = max(rows, 2 * self._row_capacity)
            if self.max_rows is not None:
                rows = max(min(rows, self.max_rows), n)
        rows = max(rows, self._row_capacity)
        left = max(left, _LEFT_SPARE)
        right = max(right, _HEADROOM, width)
        # Zeros, not empty: padding columns are masked, but a NaN left in freed memory would
        # still poison the attention's weighted sum (0 * NaN). Later, columns only ever hold
        # keys/values the model computed, so masked ones stay finite.
        shape = (rows, self._kv_heads, left + width + right, self._head_dim)
        k = [torch.zeros(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        v = [torch.zeros(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        for layer in range(self._layers if n else 0):
            k[layer][:n, :, left : left + width] = self._k[layer][:n, :, self.start : self.end]
            v[layer][:n, :, left : left + width] = self._v[layer][:n, :, self.start : self.end]
        self._k, self._v = k, v
        self.start, self.end = left, left + width
        self.relayouts += 1

    # -- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, prompts: list[list[int]]) -> tuple[torch.Tensor, float]:
        """Advance the running rows one token and prefill ``prompts`` as new rows.

        Returns the next-token logits of every row (running rows first, then the new ones in
        ``prompts`` order), (B, V), and the seconds the prefill took (the whole step when it
        ran together with the running rows).
        """
        started = time.perf_counter()
        if not prompts:
            return self._advance(), 0.0
        if not len(self):
            logits = self._prefill(prompts)
        else:
            logits = self._advance_and_prefill(prompts)
        return logits, time.perf_counter() - started

    def accept(self, tokens: torch.Tensor) -> None:
        """The tokens chosen for every row (B,): each row is fed its own at the next step."""
        self.last = tokens.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def remove(self, rows: list[int]) -> list[int]:
        """Drop batch ``rows``: each is replaced by the current last row. Returns the new order:
        ``order[i]`` is the old index of the row now at ``i``."""
        n = len(self)
        order = list(range(n))
        for j in sorted(set(rows), reverse=True):
            # Every dropped row after j is gone already, so the last row is j or a kept one.
            order[j] = order[-1]
            order.pop()
        if not order:
            self.reset()
            return []
        # Rows that move come from the tail (old index >= the new count) into the holes (new
        # index < the new count): sources and destinations never overlap, so one gather each.
        moved = [i for i, old in enumerate(order) if old != i]
        if moved:
            dest = torch.tensor(moved, dtype=torch.long, device=self.device)
            src = torch.tensor([order[i] for i in moved], dtype=torch.long, device=self.device)
            for buf in (*self._k, *self._v):
                window = buf[:, :, self.start : self.end]
                window[dest] = window[src]
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        mask = self.mask[index]
        # The first column any remaining row uses; the columns before it are padding for all.
        first = int(mask.any(dim=0).long().argmax())
        self.start += first
        self.mask = mask[:, first:]
        self.next_pos = self.next_pos[index]
        self.last = self.last[index]
        return order

    # -- the model side ----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head runs on the last position only (cheap, even for a 49k vocabulary).
        return linear(hidden[:, -1], self.model.output_weight)

    def _forward(self, group: _Group) -> torch.Tensor:
        """The model over one group alone, through its own window: hidden states (rows, w, D)."""
        return self.model.forward_hidden(
            group.ids,
            position_ids=group.positions,
            attention_mask=group.mask if group.padded else None,
            cache=group.window,
        )

    def _advance_inputs(self) -> _Group:
        """The running rows' next step as a group: each row's last token, at its next position,
        one more column of the window."""
        n = len(self)
        if self.end + 1 > self._column_capacity:
            self._relayout(rows=n, left=0, right=1)
        ones = torch.ones((n, 1), dtype=torch.bool, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        window = _Window(self._k, self._v, n, self.start, self.end - self.start)
        padded = not bool(self.mask.all())
        return _Group(self.last[:, None], self.next_pos[:, None], window, self.mask, padded)

    def _advanced(self) -> None:
        self.end += 1
        self.next_pos = self.next_pos + 1

    def _advance(self) -> torch.Tensor:
        """Feed every running row its last token; the logits for the next ones (B, V)."""
        hidden = self._forward(self._advance_inputs())
        self._advanced()
        return self._logits(hidden)

    def _prefill_inputs(self, prompts: list[list[int]]) -> _Group:
        """Joining prompts as a left-padded group with caches of their own.

        Layout of a new row: [prefix][padding][the rest of its prompt], where the prefix is what
        every prompt shares with a prompt prefilled before (the Alpaca preamble, a system
        prompt): its keys/values are copied from then, not computed again.
        """
        m = len(prompts)
        shared = self._reusable_prefix(prompts)
        rests = [p[shared:] for p in prompts]
        width = max(len(r) for r in rests)
        ids, mask, positions = left_padded(rests, shared, self.pad_id, self.device)
        shape = (m, self._kv_heads, shared + width, self._head_dim)
        k = [torch.empty(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        v = [torch.empty(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        for layer in range(self._layers if shared else 0):
            k[layer][:, :, :shared] = self._prefix_k[layer][:, :, :shared]
            v[layer][:, :, :shared] = self._prefix_v[layer][:, :, :shared]
        self.reused_tokens += shared * m
        padded = not bool(mask.all())
        window = _Window(k, v, m, 0, shared)
        return _Group(ids, positions[:, shared:], window, mask, padded, prompts, shared)

    def _prefilled(self, group: _Group) -> None:
        """Keep a prefix for later prompts and place the prefilled rows after the running ones."""
        k, v, prompts = group.window.k, group.window.v, group.prompts
        if not group.shared:
            # Nothing was reused: keep the longest prompt's keys/values (it has no padding).
            row = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            self._prefix_ids = list(prompts[row])
            self._prefix_k = [t[row : row + 1].clone() for t in k]
            self._prefix_v = [t[row : row + 1].clone() for t in v]
        self._place(k, v, group.mask, group.positions[:, -1] + 1)

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run ``prompts`` as one left-padded batch, then place them in spare rows."""
        group = self._prefill_inputs(prompts)
        hidden = self._forward(group)
        self._prefilled(group)
        return self._logits(hidden)

    def _advance_and_prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """``_advance`` and ``_prefill`` in one model call (see ``_Joint``)."""
        running = self._advance_inputs()
        joining = self._prefill_inputs(prompts)
        joint = _Joint([running, joining])
        hidden = self.model.forward_hidden(
            torch.cat([g.ids.reshape(-1) for g in joint.groups])[None],
            position_ids=torch.cat([g.positions.reshape(-1) for g in joint.groups])[None],
            cache=joint,
        )[0]
        n, (m, w) = len(self), joining.ids.shape
        self._advanced()
        self._prefilled(joining)
        # Each running row's one position, then the last position of each joining row.
        last = torch.cat(
            [
                torch.arange(n, device=self.device),
                n + w - 1 + w * torch.arange(m, device=self.device),
            ]
        )
        return linear(hidden[last], self.model.output_weight)

    def _place(
        self,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        mask: torch.Tensor,
        next_pos: torch.Tensor,
    ) -> None:
        """Copy prefilled rows (keys/values, (m, KV, w, hd) per layer) into the spare rows after
        the running ones, right-aligned with them."""
        n, m, w = len(self), mask.shape[0], mask.shape[1]
        if not n:
            self.start = self.end = max(self.start, _LEFT_SPARE if self._k else 0)
        width = self.end - self.start
        grow_left = max(0, w - width)  # a longer prompt widens the window on the left
        if n + m > self._row_capacity or self.start - grow_left < 0:
            self._relayout(rows=n + m, left=grow_left, right=0)
        self.start -= grow_left
        width = self.end - self.start
        for layer in range(self._layers):
            self._k[layer][n : n + m, :, self.end - w : self.end] = k[layer]
            self._v[layer][n : n + m, :, self.end - w : self.end] = v[layer]
        merged = torch.zeros((n + m, width), dtype=torch.bool, device=self.device)
        merged[:n, width - self.mask.shape[1] :] = self.mask
        merged[n:, width - w :] = mask
        self.mask = merged
        self.next_pos = torch.cat([self.next_pos, next_pos])

    def _reusable_prefix(self, prompts: list[list[int]]) -> int:
        """How many leading tokens every prompt shares with the kept prefill, leaving each at
        least one token to run; 0 when that is under ``_MIN_PREFIX``."""
        kept = self._prefix_ids
        shared = min(len(kept), *(len(p) - 1 for p in prompts))
        for prompt in prompts:
            same = 0
            while same < shared and prompt[same] == kept[same]:
                same += 1
            shared = same
        return shared if shared >= _MIN_PREFIX else 0
