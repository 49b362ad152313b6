"""The benchmarks: where each one's data lives, which split is scored, where its demonstrations
come from, how long an answer may be, and how an output is parsed and scored.

Demonstrations come from the benchmark's train split (OKVQA, TextVQA, ScienceQA). The math
benchmarks ship no train split; their demonstrations come from another math benchmark, as in the
seed: MathVista from MathVision, MathVision from MathVista, MathVerse from MathVision.

`--data-root DIR` holds one folder per benchmark (okvqa/, textvqa/, scienceqa/, mathvista/,
mathvision/, mathverse/; textvqa_ocr reads textvqa/); when DIR has no such folder, DIR itself is
taken as the benchmark's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.evaluation.choice_metric import letter_accuracy, parse_letter
from engine.evaluation.items import Item
from engine.evaluation.math_metric import extract_answer, math_score
from engine.evaluation.math_readers import read_mathverse, read_mathvision, read_mathvista
from engine.evaluation.scienceqa_reader import read_scienceqa
from engine.evaluation.vqa_metric import parse_short_answer, vqa_accuracy
from engine.evaluation.vqa_readers import read_okvqa, read_textvqa


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str                      # column heading of the Markdown table
    directory: str                  # folder under --data-root
    reader: Callable[[Path, str], list[Item]]
    split: str                      # the split that is scored
    demo_benchmark: str             # where demonstrations come from
    demo_split: str
    task: str                       # vqa | vqa_ocr | scienceqa | math (templates, parsing)
    max_new_tokens: int


BENCHMARKS = {b.name: b for b in (
    Benchmark("scienceqa", "ScienceQA-IMG", "scienceqa", read_scienceqa, "test", "scienceqa", "train",
              "scienceqa", 128),
    Benchmark("okvqa", "OKVQA", "okvqa", read_okvqa, "val", "okvqa", "train", "vqa", 10),
    Benchmark("textvqa", "TextVQA", "textvqa", read_textvqa, "val", "textvqa", "train", "vqa", 10),
    Benchmark("textvqa_ocr", "TextVQA (OCR)", "textvqa", read_textvqa, "val", "textvqa_ocr", "train",
              "vqa_ocr", 10),
    Benchmark("mathvista", "MathVista", "mathvista", read_mathvista, "testmini", "mathvision", "test",
              "math", 512),
    Benchmark("mathvision", "MathVision", "mathvision", read_mathvision, "test", "mathvista", "testmini",
              "math", 512),
    Benchmark("mathverse", "MathVerse", "mathverse", read_mathverse, "testmini", "mathvision", "test",
              "math", 512),
)}


def get_benchmark(name: str, flag: str = "--benchmark") -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"{flag}: unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def benchmark_root(data_root: Path, bench: Benchmark) -> Path:
    sub = Path(data_root) / bench.directory
    return sub if sub.is_dir() else Path(data_root)


def read_split(data_root: Path, bench: Benchmark, split: str | None = None) -> list[Item]:
    return bench.reader(benchmark_root(data_root, bench), split or bench.split)


def read_demo_pool(data_root: Path, bench: Benchmark) -> list[Item]:
    return read_split(data_root, BENCHMARKS[bench.demo_benchmark], bench.demo_split)


def score_output(bench: Benchmark, item: Item, raw: str) -> tuple[str, float]:
    """(parsed answer, score in [0, 1]) of a generated text."""
    if bench.task in ("vqa", "vqa_ocr"):
        parsed = parse_short_answer(raw)
        return parsed, vqa_accuracy(parsed, item.answers)
    if bench.task == "scienceqa":
        parsed = parse_letter(raw, len(item.choices))
        return parsed, letter_accuracy(parsed, item.answers[0])
    parsed = extract_answer(raw, item)
    return parsed, math_score(parsed, item)
