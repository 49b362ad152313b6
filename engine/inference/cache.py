"""The key/value cache of generation: a static tensor per layer, and the view one forward uses.

Layout: `k[layer]`, `v[layer]` of shape [slots, max_len, kv_heads_per_tp_rank, head_dim] in the
model's dtype, allocated once per batch size and context length. A sequence owns one slot for
its life; position p of the sequence lives at `[slot, p]`.

A forward through the model carries a `CacheStep` in `PackedDocuments.kv_cache`
(engine.model.attention): every layer's core attention writes its new keys and values through
`write`, and, in a decode step, reads each sequence's cached keys through `read`. A prefill writes
only: its documents start at position 0, so attention within the packed prompts already sees
every key. The indices are built on the host from the scheduler's own bookkeeping and copied to
the device without waiting, so a step never syncs.

`decode_all` is the decode step in fixed shapes, the one a CUDA graph captures
(engine.inference.graphs): every slot decodes, each reads the same `read_len` keys, and the
mask comes from the slots' positions on the device, so no index is built on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor onto `device` without making the host wait: CUDA copies come from pinned
    memory (a copy from pageable memory would block until the GPU's queue drains)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class KVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self.slot_ids = torch.arange(slots, device=device)
        self.key_positions = torch.arange(max_len, device=device)

    def fits(self, slots: int, max_len: int, dtype: torch.dtype) -> bool:
        return self.slots >= slots and self.max_len >= max_len and self.k.dtype == dtype

    def prefill(self, slots: list[int], lengths: list[int]) -> "CacheStep":
        """Whole prompts, each from position 0 of its slot."""
        rows = [s for s, n in zip(slots, lengths) for _ in range(n)]
        cols = [p for n in lengths for p in range(n)]
        return CacheStep(self, False, self._dev(rows), self._dev(cols))

    def decode(self, slots: list[int], positions: list[int]) -> "CacheStep":
        """One new token per sequence, at `positions` (the tokens already cached)."""
        read_len = max(positions) + 1
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        read_slots = slice(lo, lo + len(slots)) if contiguous else self._dev(slots)
        mask = None
        if min(positions) != max(positions):
            valid = torch.arange(read_len)[None, :] <= torch.tensor(positions)[:, None]
            mask = to_device(valid[:, None, None, :], self.k.device)  # [B, 1, 1, L]
        return CacheStep(self, True, self._dev(slots), self._dev(positions), read_slots, read_len, mask)

    def decode_all(self, positions: Tensor, read_len: int) -> "CacheStep":
        """One new token in every slot, at `positions` [slots] (a device tensor); keys read up to
        `read_len`, each slot masked past its own position."""
        mask = self.key_positions[:read_len][None, :] <= positions[:, None]
        return CacheStep(self, True, self.slot_ids, positions, slice(0, self.slots), read_len, mask[:, None, None, :])

    def _dev(self, values: list[int]) -> Tensor:
        return to_device(torch.tensor(values, dtype=torch.int64), self.k.device)


@dataclass
class CacheStep:
    """The cache as one forward sees it. `rows`/`cols` [T]: slot and position of each new token."""

    cache: KVCache
    decoding: bool
    rows: Tensor
    cols: Tensor
    read_slots: slice | Tensor | None = None
    read_len: int = 0
    mask: Tensor | None = None  # [B, 1, 1, read_len] bool, True = attend; None = all attend

    def write(self, layer_number: int, key: Tensor, value: Tensor) -> None:
        """Store this layer's new keys/values [T, kv_heads, head_dim] (layer_number counts from 1)."""
        i = layer_number - 1
        self.cache.k[i].index_put_((self.rows, self.cols), key.to(self.cache.k.dtype))
        self.cache.v[i].index_put_((self.rows, self.cols), value.to(self.cache.v.dtype))

    def read(self, layer_number: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(keys, values) [B, read_len, kv_heads, head_dim] of the decoding sequences, and the mask."""
        i = layer_number - 1
        k, v = self.cache.k[i], self.cache.v[i]
        if isinstance(self.read_slots, slice):
            return k[self.read_slots, : self.read_len], v[self.read_slots, : self.read_len], self.mask
        return (k[:, : self.read_len].index_select(0, self.read_slots),
                v[:, : self.read_len].index_select(0, self.read_slots), self.mask)
