"""Readers for the three math benchmarks: the annotation JSON/JSONL with an image folder, or the
Hugging Face parquet export with images embedded (used when no annotation file is present).

MathVista (testmini):  annot_testmini.json or testmini.json (an object keyed by pid, or a list),
    fields pid, question, image (a path under the root, e.g. images/1.jpg), choices (null for
    free-form), unit, precision, answer, question_type (multi_choice | free_form), answer_type;
    or data/testmini-*.parquet with decoded_image.
MathVision (test):     data/test.jsonl or test.jsonl, fields id, question, options (empty for
    free-form), image (e.g. images/1.jpg), answer (a letter for choice questions);
    or data/test-*.parquet with decoded_image.
MathVerse (testmini):  testmini.json (a list), fields sample_index, question (options written in
    the text for multi-choice), image (a file name under the root or images/), answer,
    question_type (multi-choice | free-form); or testmini.parquet with image.

Every item's `answers` is one reference; `info` keeps question_type ("choice" | "free"),
answer_type, unit and precision for the rule-based metric.
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluation.items import BenchmarkDataError, Item, load_json, load_jsonl, require
from engine.evaluation.parquet import parquet_files, read_parquet_rows

LETTERS = "ABCDEFGHIJ"


def _records(root: Path, split: str, json_names: list[str], bench: str) -> tuple[list[dict], str, bool]:
    """(records, source name, images embedded?) from the annotation file or the parquet export."""
    for name in json_names:
        path = root / name
        if path.is_file():
            data = load_jsonl(path) if name.endswith(".jsonl") else load_json(path)
            if isinstance(data, dict):
                data = list(data.values())
            if not isinstance(data, list):
                raise BenchmarkDataError(f"{path}: expected a list or an object of problems")
            return data, str(path), False
    files = parquet_files(root, split)
    if files:
        return read_parquet_rows(files), str(files[0].parent / f"{split}*.parquet"), True
    tried = ", ".join([str(root / n) for n in json_names] + [str(root / f"data/{split}-*.parquet")])
    raise BenchmarkDataError(f"{bench}: no annotation file or parquet export found (tried {tried})")


def _image(record: dict, where: str, root: Path, embedded: bool, field: str, dirs: tuple[str, ...] = ("",)):
    if embedded:
        return require(record, field, where, (bytes, bytearray))
    rel = str(require(record, field, where, str))
    for d in dirs:
        if (root / d / rel).is_file():
            return root / d / rel
    return root / dirs[0] / rel  # missing: reported when the image is checked


def read_mathvista(root: Path, split: str = "testmini") -> list[Item]:
    records, src, embedded = _records(root, split, [f"annot_{split}.json", f"{split}.json"], "mathvista")
    items = []
    for k, r in enumerate(records):
        where = f"{src}: entry {k}"
        pid = str(require(r, "pid", where))
        qtype = str(require(r, "question_type", where, str))
        choices = tuple(str(c) for c in (r.get("choices") or ()))
        if qtype == "multi_choice" and not choices:
            raise BenchmarkDataError(f"{where}: multi_choice question without field 'choices'")
        image = _image(r, where, root, embedded, "decoded_image" if embedded else "image")
        items.append(Item(id=pid, question=str(require(r, "question", where, str)), image=image,
                          image_key=f"mathvista/{pid}", answers=(str(require(r, "answer", where)),),
                          choices=choices,
                          info={"question_type": "choice" if qtype == "multi_choice" else "free",
                                "answer_type": str(require(r, "answer_type", where, str)),
                                "unit": str(r.get("unit") or ""), "precision": r.get("precision")}))
    return items


def read_mathvision(root: Path, split: str = "test") -> list[Item]:
    records, src, embedded = _records(root, split, [f"data/{split}.jsonl", f"{split}.jsonl"], "mathvision")
    items = []
    for k, r in enumerate(records):
        where = f"{src}: entry {k}"
        qid = str(require(r, "id", where))
        choices = tuple(str(c) for c in require(r, "options", where, list))
        image = _image(r, where, root, embedded, "decoded_image" if embedded else "image")
        items.append(Item(id=qid, question=str(require(r, "question", where, str)), image=image,
                          image_key=f"mathvision/{qid}", answers=(str(require(r, "answer", where)),),
                          choices=choices,
                          info={"question_type": "choice" if choices else "free", "answer_type": "text",
                                "unit": "", "precision": None}))
    return items


def read_mathverse(root: Path, split: str = "testmini") -> list[Item]:
    records, src, embedded = _records(root, split, [f"{split}.json"], "mathverse")
    items = []
    for k, r in enumerate(records):
        where = f"{src}: entry {k}"
        sid = str(require(r, "sample_index", where))
        qtype = str(require(r, "question_type", where, str))
        image = _image(r, where, root, embedded, "image", ("", "images"))
        items.append(Item(id=sid, question=str(require(r, "question", where, str)), image=image,
                          image_key=f"mathverse/{sid}", answers=(str(require(r, "answer", where)),),
                          info={"question_type": "choice" if qtype == "multi-choice" else "free",
                                "answer_type": "text", "unit": "", "precision": None}))
    return items


def choice_letter(item: Item) -> str:
    """The reference as an option letter (MathVista keeps the option's text), else ''."""
    ref = item.answers[0].strip()
    if item.info.get("question_type") != "choice":
        return ""
    if item.choices and ref in item.choices:
        return LETTERS[item.choices.index(ref)]
    return ref.upper() if len(ref) == 1 and ref.upper() in LETTERS else ""
