"""Device timing for the benchmarks: one way to wait for the GPU and one way to time a kernel, so
that every microbenchmark reports the same statistic (a CUDA-event median)."""

from __future__ import annotations

import torch


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_cuda_seconds(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median device time of `fn()` over `iters` runs after `warmup` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
