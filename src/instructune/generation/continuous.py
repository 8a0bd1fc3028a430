"""``ContinuousBatch``: the KV-cached batch the engine decodes, which rows join and leave between
steps.

Layout: the rows are right-aligned. Every row's latest token sits in the last filled column of
the cache; a row that came later (or has a shorter prompt) has padding columns on its left,
hidden by the attention mask, and its positions count its own tokens from 0. So each row sees
exactly what it would see alone, as in ``generation.decoding.BatchDecoder``::

    columns:    0    1    2    3    4    5
    row 0:      a0   a1   a2   a3   a4   a5     (running for a while)
    row 1:      pad  pad  b0   b1   b2   b3     (joined later)
    row 2:      pad  pad  pad  c0   c1   c2     (its prompt just prefilled)

A joining request's prompt is prefilled in a batch of its own (left-padded like any batch),
then its keys/values are merged in: the shorter side gets padding columns on the left. When
rows leave, the columns no remaining row uses are trimmed from the left, so the cache is as
wide as the longest running row, never wider, however long the batch keeps running.

Prompts mostly start alike (the Alpaca preamble, a chat template's system prompt): the keys and
values of one earlier prompt are kept, and a joining prompt that starts as it did gets those
copied instead of running them again, as ``BatchDecoder`` does for a batch's shared prefix.

Public name: ``ContinuousBatch``.
"""

from __future__ import annotations

import time

import torch

from instructune.generation.decoding import left_padded

# Spare columns allocated past the filled ones, so the cache grows by a copy once in this many
# steps rather than every step.
_HEADROOM = 32
# A prefix shared with an earlier prompt is copied rather than run again when it is at least
# this long (below that, the copy costs about what it saves).
_MIN_PREFIX = 4


class _RowCache:
    """Keys and values for every layer, (B, KV, capacity, hd), filled up to ``length``.

    It speaks the model's cache protocol (``length``, ``update``, ``advance``) as the models'
    ``KVCache`` does, but the batch owns its buffers, so rows and columns can be merged and
    trimmed.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int):
        self.k = k
        self.v = v
        self.length = length

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class ContinuousBatch:
    """The rows decoded together; rows join (prefilled) and leave between steps.

    The engine drives it: ``step(prompts)`` runs the model once for the running rows (feeding
    each the token ``accept`` gave it) and prefills ``prompts`` as new rows, appended after the
    running ones; it returns the next-token logits of every row. ``accept(tokens)`` gives every
    row its chosen token; ``remove(rows)`` drops rows.

    Args:
        model: a model with ``forward_hidden``, ``output_weight`` and ``new_cache``.
        pad_id: the id put in padded positions of a prefill (never attended to).
    """

    def __init__(self, model: torch.nn.Module, *, pad_id: int):
        self.model = model
        self.pad_id = pad_id
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
        self.reset()

    def __len__(self) -> int:
        return int(self.next_pos.shape[0])

    def reset(self) -> None:
        """Forget every row."""
        self.cache: _RowCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)  # (B, L)
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) to feed next

    def _buffers(self, rows: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Zeros, not empty: padding columns are masked, but a NaN left in freed memory would
        # still poison the attention's weighted sum (0 * NaN).
        shape = (rows, self._kv_heads, capacity, self._head_dim)
        k = [torch.zeros(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        v = [torch.zeros(shape, dtype=self._dtype, device=self.device) for _ in range(self._layers)]
        return k, v

    # -- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, prompts: list[list[int]]) -> tuple[torch.Tensor, float]:
        """Advance the running rows one token and prefill ``prompts`` as new rows.

        Returns the next-token logits of every row (running rows first, then the new ones in
        ``prompts`` order), (B, V), and the seconds the prefill took.
        """
        logits = []
        if len(self):
            logits.append(self._advance())
        prefill_s = 0.0
        if prompts:
            started = time.perf_counter()
            logits.append(self._prefill(prompts))
            prefill_s = time.perf_counter() - started
        return torch.cat(logits), prefill_s

    def accept(self, tokens: torch.Tensor) -> None:
        """The tokens chosen for every row (B,): each row is fed its own at the next step."""
        self.last = tokens.to(device=self.device, dtype=torch.long)

    def remove(self, rows: list[int]) -> None:
        """Drop batch ``rows``; trim the columns no remaining row uses."""
        gone = set(rows)
        keep = [j for j in range(len(self)) if j not in gone]
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask[index]
        # The first column any remaining row uses; every column before it is padding for all.
        start = int(mask.any(dim=0).long().argmax())
        width = mask.shape[1] - start
        cache = self.cache
        k, v = self._buffers(len(keep), width + _HEADROOM)
        for layer in range(self._layers):
            for old, new in ((cache.k[layer], k[layer]), (cache.v[layer], v[layer])):
                torch.index_select(old[:, :, start : cache.length], 0, index, out=new[:, :, :width])
        self.cache = _RowCache(k, v, width)
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos[index]
        self.last = self.last[index]

    # -- the model side ----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head runs on the last position only (cheap, even for a 49k vocabulary).
        return torch.nn.functional.linear(hidden[:, -1], self.model.output_weight)

    def _advance(self) -> torch.Tensor:
        """Feed every running row its last token; the logits for the next ones (B, V)."""
        cache = self.cache
        if cache.length + 1 > cache.capacity:
            self._grow()
            cache = self.cache
        ones = torch.ones((len(self), 1), dtype=torch.bool, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        padded = not bool(self.mask.all())
        hidden = self.model.forward_hidden(
            self.last[:, None],
            position_ids=self.next_pos[:, None],
            attention_mask=self.mask if padded else None,
            cache=cache,
        )
        self.next_pos = self.next_pos + 1
        return self._logits(hidden)

    def _grow(self) -> None:
        """Move the cache into buffers with ``_HEADROOM`` more columns."""
        cache = self.cache
        k, v = self._buffers(len(self), cache.length + _HEADROOM)
        for layer in range(self._layers):
            k[layer][:, :, : cache.length] = cache.k[layer][:, :, : cache.length]
            v[layer][:, :, : cache.length] = cache.v[layer][:, :, : cache.length]
        self.cache = _RowCache(k, v, cache.length)

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run ``prompts`` as one left-padded batch, then merge them in as new rows.

        Layout of a row: [prefix][padding][the rest of its prompt], where the prefix is what
        every prompt shares with a prompt prefilled before (the Alpaca preamble, a system
        prompt): its keys/values are copied from then, not computed again.
        """
        n = len(prompts)
        shared = self._reusable_prefix(prompts)
        rests = [p[shared:] for p in prompts]
        width = max(len(r) for r in rests)
        ids, mask, positions = left_padded(rests, shared, self.pad_id, self.device)
        padded = not bool(mask.all())
        k, v = self._buffers(n, shared + width + _HEADROOM)
        for layer in range(self._layers if shared else 0):
            k[layer][:, :, :shared] = self._prefix_k[layer][:, :, :shared]
            v[layer][:, :, :shared] = self._prefix_v[layer][:, :, :shared]
        cache = _RowCache(k, v, shared)
        self.reused_tokens += shared * n
        hidden = self.model.forward_hidden(
            ids,
            position_ids=positions[:, shared:],
            attention_mask=mask if padded else None,
            cache=cache,
        )
        if not shared:
            # Keep the longest prompt's keys/values (it has no padding) for later prefills.
            row = max(range(n), key=lambda i: len(prompts[i]))
            self._prefix_ids = list(prompts[row])
            self._prefix_k = [t[row : row + 1, :, :width].clone() for t in k]
            self._prefix_v = [t[row : row + 1, :, :width].clone() for t in v]
        self._merge(cache, mask, positions[:, -1] + 1)
        return self._logits(hidden)

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

    def _merge(self, new: _RowCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Append the rows of ``new`` (prefilled) to the batch, right-aligned with the rest."""
        if not len(self):
            self.cache, self.mask, self.next_pos = new, mask, next_pos
            return
        old = self.cache
        old_rows, new_rows = len(self), mask.shape[0]
        width = max(old.length, new.length)
        k, v = self._buffers(old_rows + new_rows, width + _HEADROOM)
        for layer in range(self._layers):
            for buf, o, n in ((k, old.k, new.k), (v, old.v, new.v)):
                buf[layer][:old_rows, :, width - old.length : width] = o[layer][:, :, : old.length]
                buf[layer][old_rows:, :, width - new.length : width] = n[layer][:, :, : new.length]
        merged = torch.zeros((old_rows + new_rows, width), dtype=torch.bool, device=self.device)
        merged[:old_rows, width - old.length :] = self.mask
        merged[old_rows:, width - new.length :] = mask
        self.cache = _RowCache(k, v, width)
        self.mask = merged
        self.next_pos = torch.cat([self.next_pos, next_pos])
