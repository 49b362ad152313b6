"""The files of an evaluation run, all written by rank 0 into the output directory:

- results.json: {benchmark: {shots: {score, n, errors}}}: score in percent over the n answered
  questions, errors the questions that could not be answered (listed in errors.jsonl);
- predictions.jsonl: one line per answered question and shot count: benchmark, shots, id,
  demo_ids, prompt_length, output (the raw generated text), parsed, score, finish_reason;
- errors.jsonl: one line per question (and shot count) not answered, and per demonstration
  candidate left out, with the picture and the reason;
- results.md: the scores as a Markdown table laid out like the paper's (a row per shot count,
  a column per benchmark, `score (errors)` where some questions could not be answered).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.evaluation.benchmarks import BENCHMARKS


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def markdown_table(results: dict, title: str = "model") -> str:
    names = [b for b in BENCHMARKS if b in results] + [b for b in results if b not in BENCHMARKS]
    shots = sorted({int(k) for r in results.values() for k in r})
    head = "| " + " | ".join(["Model", "Shots"] + [BENCHMARKS[b].title if b in BENCHMARKS else b
                                                   for b in names]) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for k in shots:
        cells = []
        for b in names:
            r = results[b].get(str(k))
            if r is None or r["score"] is None:
                cells.append("–")
            else:
                cells.append(f"{r['score']:.1f}" + (f" ({r['errors']} err)" if r["errors"] else ""))
        lines.append("| " + " | ".join([title, str(k)] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, results: dict, predictions: list[dict], errors: list[dict],
                  title: str = "model") -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    write_jsonl(out_dir / "errors.jsonl", errors)
    _write_text(out_dir / "results.md", markdown_table(results, title))
