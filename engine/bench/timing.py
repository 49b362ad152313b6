"""Device timing for the benchmarks: one way to wait for the GPU and one way to time a kernel, so
that every microbenchmark reports the same statistic (a CUDA-event median)."""

from __future__ import annotations

import json
import time

import torch


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Wall seconds of `fn()`, the device's queue drained before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def print_result(result: dict, json_out: str | None) -> None:
    """A benchmark's one result: printed as indented JSON, and written to `json_out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")


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
