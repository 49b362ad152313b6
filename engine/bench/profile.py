"""One profiled training step and the readers of its chrome trace: where the GPU waited for the
host (gaps between kernels) and which kinds of kernel took the time. The readers take `.json` or
`.json.gz` traces, so recorded profiles (docs/benchmarks/) can be re-read."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from engine.bench.timing import sync


def profile_step(out_dir: str, step) -> None:
    """One step under torch.profiler: GPU busy time vs wall time, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    wall = time.perf_counter() - t0
    trace = Path(out_dir) / "engine_step_trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = trace_kernels(trace)
    span, busy, idle = kernel_timeline(kernels)
    print(f"# profile: wall {wall * 1e3:.1f} ms (profiler overhead included); kernels span {span:.1f} ms, "
          f"busy {busy:.1f} ms, GPU idle between kernels {idle:.1f} ms ({idle / span:.0%})", flush=True)
    print("# kernel time by kind (ms): " + json.dumps(kernel_breakdown(kernels)), flush=True)
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    (Path(out_dir) / "engine_step_kernels.txt").write_text(table)
    print(table, flush=True)


def trace_kernels(trace: Path | str) -> list[dict]:
    """The kernel events (name, ts, dur in µs) of a chrome trace, `.json` or `.json.gz`."""
    opener = gzip.open if str(trace).endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def kernel_timeline(kernel_events: list[dict]) -> tuple[float, float, float]:
    """(span from first kernel start to last kernel end, time with a kernel running, idle gaps)
    in ms, from `trace_kernels`: where the GPU waited for the host."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernel_events)
    if not kernels:
        return 0.0, 0.0, 0.0
    busy, idle, end = 0.0, 0.0, kernels[0][0]
    for start, stop in kernels:
        if start > end:
            idle += start - end
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return (end - kernels[0][0]) / 1e3, busy / 1e3, idle / 1e3


KERNEL_KINDS = (  # first match wins: flash kernels carry "cutlass" in their names too
    ("attention", ("flash", "sdpa", "fmha")),
    ("matmul", ("nvjet", "gemm", "cutlass")),
    ("optimizer", ("FusedOptimizer", "multi_tensor_apply")),
    ("concatenation", ("CatArray",)),
    ("swiglu (compiled)", ("silu",)),
    ("rope (compiled)", ("triton_poi_fused__to_copy_add_cat_mul_neg",)),
    ("norm", ("layer_norm", "rms_norm", "GammaBeta")),
    ("elementwise", ("elementwise", "copy")),
)


def kernel_breakdown(kernel_events: list[dict]) -> dict[str, float]:
    """Kernel time in ms by kind (KERNEL_KINDS, else "other") from `trace_kernels`, largest first."""
    totals: dict[str, float] = {}
    for e in kernel_events:
        kind = next((k for k, keys in KERNEL_KINDS if any(key in e["name"] for key in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + e["dur"] / 1e3
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
