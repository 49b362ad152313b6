"""Scoring an existing predictions file without a model: each prediction's raw output is parsed
and scored again against the benchmark's references, so a metric can be checked, compared with
another implementation, or updated without generating anything.
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluation.benchmarks import get_benchmark, read_split, score_output
from engine.evaluation.items import BenchmarkDataError, load_jsonl, require
from engine.evaluation.runner import BenchmarkRun, summarize


def rescore(benchmark: str, predictions: Path, data_root: Path, errors: list[dict] | None = None) -> tuple[dict, BenchmarkRun]:
    """({shots: {score, n, errors}}, the rescored run) for the lines of `predictions` that belong
    to `benchmark`; `errors` (the run's errors.jsonl records) keeps the error counts beside."""
    bench = get_benchmark(benchmark)
    items = {it.id: it for it in read_split(data_root, bench)}
    run = BenchmarkRun(bench.name, errors=[e for e in (errors or []) if e.get("benchmark") == bench.name])
    for lineno, rec in enumerate(load_jsonl(Path(predictions)), 1):
        where = f"{predictions}:{lineno}"
        if require(rec, "benchmark", where) != bench.name:
            continue
        qid = str(require(rec, "id", where))
        if qid not in items:
            raise BenchmarkDataError(f"{where}: question id {qid} is not in {bench.name} {bench.split}")
        parsed, score = score_output(bench, items[qid], str(require(rec, "output", where, str)))
        run.predictions.append({**rec, "parsed": parsed, "score": score})
    shots = sorted({p["shots"] for p in run.predictions} | {e["shots"] for e in run.errors if e["shots"] is not None})
    return summarize(run, shots), run
