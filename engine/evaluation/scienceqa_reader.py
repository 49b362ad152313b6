"""Reader for ScienceQA in its official release layout.

    problems.json     {pid: {question, choices, answer (index), hint, image ("image.png" | null)}}
    pid_splits.json   {"train": [pid, ...], "val": [...], "test": [...]}
    images/{split}/{pid}/image.png

Only problems with an image are read: the test ones are the IMG subset the benchmark reports,
the train ones the pool demonstrations come from. The reference answer is the option's letter.
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluation.items import BenchmarkDataError, Item, load_json, require

LETTERS = "ABCDEFGHIJ"


def read_scienceqa(root: Path, split: str) -> list[Item]:
    ppath, spath = root / "problems.json", root / "pid_splits.json"
    problems = load_json(ppath)
    if not isinstance(problems, dict):
        raise BenchmarkDataError(f"{ppath}: expected an object keyed by problem id")
    pids = require(load_json(spath), split, str(spath), list)
    items = []
    for pid in pids:
        pid = str(pid)
        where = f"{ppath}: problem {pid}"
        if pid not in problems:
            raise BenchmarkDataError(f"{spath}: {split} lists problem {pid}, absent from {ppath}")
        p = problems[pid]
        if not isinstance(p, dict):
            raise BenchmarkDataError(f"{where}: expected an object")
        if not p.get("image"):
            continue
        choices = tuple(str(c) for c in require(p, "choices", where, list))
        answer = require(p, "answer", where, int)
        if not 0 <= answer < len(choices) or len(choices) > len(LETTERS):
            raise BenchmarkDataError(f"{where}: field 'answer' = {answer} is not an index into its "
                                     f"{len(choices)} choices")
        items.append(Item(id=pid, question=str(require(p, "question", where, str)),
                          image=root / "images" / split / pid / str(p["image"]),
                          image_key=f"{split}/{pid}/{p['image']}", answers=(LETTERS[answer],),
                          choices=choices, info={"hint": str(p.get("hint") or "")}))
    return items
