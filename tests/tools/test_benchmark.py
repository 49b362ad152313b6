"""The training benchmark's profile readers (engine/bench/profile.py) on a recorded H200 trace
(docs/benchmarks/): every kernel counted once, flash-attention kernels (whose names contain
"cutlass") not taken for GEMMs."""

import gzip
import json

from engine.bench import profile
from helpers import REPO

TRACE = REPO / "docs/benchmarks/2026-12-03_profile4096_mbs2_trace.json.gz"


def test_kernel_breakdown_of_a_recorded_trace():
    kernels = profile.trace_kernels(TRACE)
    assert kernels == [e for e in json.load(gzip.open(TRACE))["traceEvents"] if e.get("cat") == "kernel"]
    kinds = profile.kernel_breakdown(kernels)
    assert abs(sum(kinds.values()) - sum(e["dur"] for e in kernels) / 1e3) < 0.1 * len(kinds)
    assert list(kinds)[0] == "matmul" and kinds["matmul"] > 0.6 * sum(kinds.values())
    flash = sum(e["dur"] for e in kernels if "flash" in e["name"]) / 1e3
    assert flash > 50 and kinds["attention"] >= flash - 0.1  # rounded to 0.1 ms
    assert kinds["rope (compiled)"] > 0 and kinds["optimizer"] > 0


def test_kernel_timeline_counts_overlap_once(tmp_path):
    events = [{"cat": "kernel", "name": "a", "ts": 0, "dur": 10}, {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},
              {"cat": "kernel", "name": "c", "ts": 30, "dur": 5}, {"cat": "cpu_op", "name": "x", "ts": 0, "dur": 99}]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    span, busy, idle = profile.kernel_timeline(profile.trace_kernels(trace))
    assert (span, busy, idle) == (0.035, 0.02, 0.015)
