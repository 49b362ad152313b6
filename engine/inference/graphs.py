"""Decode steps replayed from CUDA graphs.

A decode step of a 7B model at batch 1 reads 13.5 GB of weights: 2.8 ms on an H200. Launched
op by op from Python it takes over ten times that, because the GPU waits for the host to issue
about a thousand small kernels. A CUDA graph records the step's kernels once and replays them
with one launch.

A graph replays fixed shapes and fixed addresses, so `StaticDecoder` runs the step the fixed
way (`ModelRunner.decode_all`): every slot of the cache decodes, live or idle, from static
`tokens`/`positions` buffers; the keys are read up to a length rounded up to `BUCKET`
positions, so one graph serves 256 consecutive steps; each slot's mask comes from its position
on the device. An idle slot decodes token 0 at position 0 into its own slot, which the next
prefill there overwrites. One graph is captured per read length the run reaches, on first
use; all share one memory pool and the cache they were captured with (a new cache gets a new
`StaticDecoder`).

Without CUDA (or with `graphs=False`) the same fixed-shape step runs eagerly: the CPU tests
check that it gives the tokens of the dynamic path. If capture fails, the step runs eagerly
and a warning names the reason.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from engine.inference.cache import KVCache, to_device

BUCKET = 256


class StaticDecoder:
    def __init__(self, runner, cache: KVCache, *, graphs: bool):
        self.runner, self.cache = runner, cache
        self.requested_graphs = graphs
        self.graphs = graphs and cache.k.is_cuda  # False also once a capture has failed
        device = cache.k.device
        self.tokens = torch.zeros(cache.slots, dtype=torch.int64, device=device)
        self.positions = torch.zeros(cache.slots, dtype=torch.int64, device=device)
        cu = torch.arange(cache.slots + 1, dtype=torch.int32)
        self.cu_seqlens = (cu, to_device(cu, device))
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None

    def read_len(self, max_position: int) -> int:
        return min(self.cache.max_len, -(-(max_position + 1) // BUCKET) * BUCKET)

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> Tensor:
        """One token for each live sequence (its slot, last token, that token's position).
        Returns fp32 logits [len(slots), padded vocab] in the order given."""
        tok, pos = [0] * self.cache.slots, [0] * self.cache.slots
        for s, t, p in zip(slots, tokens, positions):
            tok[s], pos[s] = t, p
        self.tokens.copy_(to_device(torch.tensor(tok, dtype=torch.int64), self.tokens.device))
        self.positions.copy_(to_device(torch.tensor(pos, dtype=torch.int64), self.positions.device))
        read_len = self.read_len(max(positions))
        logits = self._replay(read_len) if self.graphs else self._run(read_len)
        rows = list(slots)
        if rows == list(range(self.cache.slots)):
            return logits.clone()
        return logits.index_select(0, to_device(torch.tensor(rows), logits.device))

    def _run(self, read_len: int) -> Tensor:
        return self.runner.decode_all(self.tokens, self.positions, self.cache, read_len, self.cu_seqlens)

    def _replay(self, read_len: int) -> Tensor:
        if read_len not in self._captured:
            try:
                self._captured[read_len] = self._capture(read_len)
            except Exception as e:  # a kernel that cannot be captured: run the same step eagerly
                warnings.warn(f"decode steps run without CUDA graphs: capture failed ({type(e).__name__}: {e})",
                              stacklevel=2)
                self.graphs = False
                return self._run(read_len)
        graph, logits = self._captured[read_len]
        graph.replay()
        return logits

    def _capture(self, read_len: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream (lazy initialisation, compiled kernels), as torch's docs ask.
        # The warm-up writes this step's keys/values, the same ones the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(read_len)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a training loader's pin-memory thread, when the few-shot
        # hook generates mid-run) may keep calling CUDA while this one captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._run(read_len)
        return graph, logits
