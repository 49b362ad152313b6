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


# --------------------------------------------------------------------------- --search (engine/bench/search.py)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from engine.bench import search  # noqa: E402
from engine.cli import benchmark  # noqa: E402
from engine.model.recompute import Recompute  # noqa: E402


def test_ladder_is_ordered_fastest_first():
    steps = [s.describe() for s in search.ladder(32)]
    assert steps == [f"recompute {r}, optimizer {o}" for r in (
        "none", "selective/core_attn+mlp", "full/block/8", "full/block/16", "full/block/24", "full/uniform/1")
        for o in ("on GPU", "offloaded")]
    assert search.ladder(32)[7].flags() == ["--recompute-granularity", "full", "--recompute-method", "block",
                                            "--recompute-num-layers", "16", "--optimizer-cpu-offload"]
    assert [s.recompute.num_layers for s in search.ladder(2) if s.recompute and s.recompute.method == "block"] == [1, 1]


class FakeRunner:
    """Out of memory below a recompute level (and, for `offload_helps`, one level lower with the
    optimizer offloaded); tokens/s falls with recompute and with offload."""

    def __init__(self, fits_from: int, offload_helps: bool = False):
        self.fits_from, self.offload_helps, self.calls = fits_from, offload_helps, []

    def __call__(self, s: search.Setting) -> dict:
        self.calls.append(s.describe())
        if s.level < self.fits_from - (1 if self.offload_helps and s.offload else 0):
            raise search.OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"pipeline": "engine", "tokens_per_s": 1000.0 - 100 * s.level - (150 if s.offload else 0),
                "peak_memory_gib": 79.0 - 5 * s.level}


def test_search_reports_the_fastest_that_fits_and_every_attempt():
    runner = FakeRunner(fits_from=2, offload_helps=True)  # block 8 fits on GPU, selective only offloaded
    best, attempts = search.search(search.ladder(32), runner, log=lambda *_: None)
    outcomes = [(a["setting"], a["outcome"]) for a in attempts]
    assert outcomes[:6] == [
        ("recompute none, optimizer on GPU", "out_of_memory"), ("recompute none, optimizer offloaded", "out_of_memory"),
        ("recompute selective/core_attn+mlp, optimizer on GPU", "out_of_memory"),
        ("recompute selective/core_attn+mlp, optimizer offloaded", "ok"),
        ("recompute full/block/8, optimizer on GPU", "ok"),
        ("recompute full/block/8, optimizer offloaded", "skipped")]
    assert {a["outcome"] for a in attempts[6:]} == {"skipped"} and len(attempts) == 12
    assert len(runner.calls) == 5  # nothing dominated by a fitting setting ran
    # block 8 on the GPU: 800 tokens/s beats selective offloaded (1000 - 100 - 150 = 750)
    assert best["setting"] == "recompute full/block/8, optimizer on GPU" and best["tokens_per_s"] == 800.0
    assert best["flags"] == ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "8"]
    assert attempts[0]["detail"].startswith("CUDA out of memory")


def test_search_when_nothing_fits_and_when_everything_does():
    best, attempts = search.search(search.ladder(4), FakeRunner(fits_from=99), log=lambda *_: None)
    assert best is None and {a["outcome"] for a in attempts} == {"out_of_memory"}
    best, attempts = search.search(search.ladder(4), FakeRunner(fits_from=0), log=lambda *_: None)
    assert best["setting"] == "recompute none, optimizer on GPU"
    assert [a["outcome"] for a in attempts] == ["ok"] + ["skipped"] * (len(attempts) - 1)


def test_search_command_line_with_an_injected_runner(capsys, tmp_path):
    argv = ["--preset", "llava-1.5-7b", "--data-prefix", "unused", "--search", "--json-out", str(tmp_path / "s.jsonl")]
    a = benchmark.parse(argv)
    rows = benchmark.run_search(a, argv, runner=FakeRunner(fits_from=5))  # only full recompute of every layer
    assert rows[-1]["setting"] == "recompute full/uniform/1, optimizer on GPU"
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(printed) == 13 and printed[-1]["pipeline"] == "search-best"
    with pytest.raises(SystemExit, match="chooses the recompute and offload flags itself"):
        benchmark.run_search(benchmark.parse(argv + ["--recompute-granularity", "full"]), argv)


def test_memory_flags_reach_the_trainer():
    a = benchmark.parse(["--data-prefix", "x", "--recompute-granularity", "selective", "--recompute-modules",
                         "core_attn", "layernorm", "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"])
    assert benchmark.memory_flags(a) == ["--recompute-granularity", "selective", "--optimizer-offload-fraction", "0.5",
                                         "--recompute-modules", "core_attn", "layernorm", "--optimizer-cpu-offload"]
    assert benchmark.layers_per_stage(benchmark.parse(
        ["--data-prefix", "x", "--preset", "llava-1.5-7b", "--train-args=--pipeline-model-parallel-size 4"])) == 8
    assert Recompute.from_flags("full", "block", 8).describe() == "full/block/8"


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, tokenizer_model):
    from engine.cli.preprocess import main as preprocess

    prefix = tmp_path_factory.mktemp("bench") / "sample"
    assert preprocess(["--input", str(REPO / "examples/data/textbook_sample.jsonl"), "--image-root",
                       str(REPO / "examples/data/images"), "--output-prefix", str(prefix),
                       "--tokenizer-model", tokenizer_model, "--workers", "1"]) == 0
    return str(prefix)


@pytest.mark.slow
def test_search_on_cpu_with_the_tiny_preset(sample_data, tmp_path):
    """The real thing, one process per attempt: on a CPU nothing runs out of memory, so the first
    setting (no recompute, optimizer on the device) is the answer and every other is skipped."""
    out = tmp_path / "search.jsonl"
    argv = ["--preset", "tiny", "--data-prefix", sample_data, "--seq-length", "1536", "--steps", "1", "--warmup", "1",
            "--global-batch-size", "2", "--num-workers", "0", "--search", "--json-out", str(out)]
    subprocess.run([sys.executable, "-m", "engine.cli.benchmark", *argv], check=True, cwd=REPO, timeout=600,
                   env=search.single_process_env())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["outcome"] for r in rows[:-1]] == ["ok"] + ["skipped"] * 11
    best = rows[-1]
    assert best["pipeline"] == "search-best" and best["flags"] == [] and best["tokens_per_s"] > 0
    assert best["config"]["recompute"] is None and best["config"]["optimizer_cpu_offload"] is False


@pytest.mark.slow
def test_plain_run_with_recompute_flags(sample_data, tmp_path):
    out = tmp_path / "run.jsonl"
    argv = ["--preset", "tiny", "--data-prefix", sample_data, "--seq-length", "1536", "--steps", "1", "--warmup", "1",
            "--global-batch-size", "2", "--num-workers", "0", "--recompute-granularity", "full",
            "--recompute-method", "block", "--recompute-num-layers", "2", "--json-out", str(out)]
    subprocess.run([sys.executable, "-m", "engine.cli.benchmark", *argv], check=True, cwd=REPO, timeout=600,
                   env=search.single_process_env())
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["pipeline"] == "engine" and row["config"]["recompute"] == "full/block/2" and row["tokens_per_s"] > 0
