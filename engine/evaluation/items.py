"""One benchmark question as every reader returns it, and the checks readers share.

Each benchmark ships its own layout (COCO-style question/annotation pairs, a `data` list, a dict
keyed by problem id, JSONL, parquet with embedded images); the readers turn all of them into
`Item`s so that prompt building, demo selection and scoring never look at a release format.
A field a reader needs and does not find stops the run with the file and the field named:
guessing a default would silently change the benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BenchmarkDataError  # noqa: F401  (raised here, caught by the readers' callers)


@dataclass(frozen=True)
class Item:
    """A question. `image` is a file path, raw encoded bytes, or None (no image shipped);
    `image_key` names the picture stably (for RICES caches and error lists). `answers` are the
    reference answers (10 annotators for VQA; one for the others); `choices` the options of a
    multiple-choice question, in order; `info` the benchmark-specific fields the prompt and the
    metric use (OCR tokens, hint, unit, precision, question/answer type)."""

    id: str
    question: str
    image: Any
    image_key: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    info: dict = field(default_factory=dict, compare=False, hash=False)


def load_json(path: Path) -> Any:
    """A JSON file, or a clear error naming it."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkDataError(f"{path}: not readable JSON ({e})") from e


def load_jsonl(path: Path) -> list[dict]:
    """A JSONL file (one object a line, blank lines skipped); errors name file and line."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{lineno}: not valid JSON ({e})") from e
    return records


def require(record: Any, name: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """record[name], checked for presence (and type when `kind` is given); the error names the
    place (`file` or `file: entry N`) and the field."""
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected an object with field '{name}', got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise BenchmarkDataError(f"{where}: missing field '{name}'")
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BenchmarkDataError(f"{where}: field '{name}' should be {names}, got {type(value).__name__}")
    return value


def find_file(root: Path, candidates: list[str], what: str) -> Path:
    """The first of `candidates` (relative to root) that exists, or an error listing them all."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    tried = ", ".join(str(root / c) for c in candidates)
    raise BenchmarkDataError(f"{what}: none of these files exists: {tried}")
