"""Readers for the two open-ended VQA benchmarks, in their official release layouts.

OK-VQA (COCO-style pair of files, 10 answers per question):
    OpenEnded_mscoco_{split}2014_questions.json   {"questions": [{question_id, image_id, question}]}
    mscoco_{split}2014_annotations.json           {"annotations": [{question_id, answers: [{answer}]}]}
    {split}2014/COCO_{split}2014_{image_id:012d}.jpg
TextVQA 0.5.1:
    TextVQA_0.5.1_{split}.json   {"data": [{question_id, question, image_id, answers, ocr_tokens}]}
    train_images/{image_id}.jpg  (the release keeps val images there too)
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluation.items import BenchmarkDataError, Item, load_json, require


def okvqa_files(root: Path, split: str) -> tuple[Path, Path]:
    """(questions file, annotations file) of one OK-VQA split."""
    return root / f"OpenEnded_mscoco_{split}2014_questions.json", root / f"mscoco_{split}2014_annotations.json"


def okvqa_image(root: Path, split: str, image_id: int) -> Path:
    """The COCO picture of `image_id` in one OK-VQA split."""
    return root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"


def read_okvqa(root: Path, split: str) -> list[Item]:
    if split not in ("train", "val"):
        raise BenchmarkDataError(f"okvqa: split must be train or val, got {split!r}")
    qpath, apath = okvqa_files(root, split)
    questions = require(load_json(qpath), "questions", str(qpath), list)
    annotations = require(load_json(apath), "annotations", str(apath), list)
    answers: dict[str, tuple[str, ...]] = {}
    for k, ann in enumerate(annotations):
        where = f"{apath}: annotations[{k}]"
        qid = str(require(ann, "question_id", where))
        entries = require(ann, "answers", where, list)
        answers[qid] = tuple(str(require(a, "answer", f"{where}.answers[{j}]")) for j, a in enumerate(entries))
    items = []
    for k, q in enumerate(questions):
        where = f"{qpath}: questions[{k}]"
        qid = str(require(q, "question_id", where))
        image_id = int(require(q, "image_id", where, (int, str)))
        if qid not in answers:
            raise BenchmarkDataError(f"{apath}: no annotation for question_id {qid} (from {where})")
        image = okvqa_image(root, split, image_id)
        items.append(Item(id=qid, question=str(require(q, "question", where, str)),
                          image=image, image_key=image.name, answers=answers[qid]))
    return items


def read_textvqa(root: Path, split: str) -> list[Item]:
    if split not in ("train", "val"):
        raise BenchmarkDataError(f"textvqa: split must be train or val, got {split!r}")
    path = root / f"TextVQA_0.5.1_{split}.json"
    data = require(load_json(path), "data", str(path), list)
    items = []
    for k, entry in enumerate(data):
        where = f"{path}: data[{k}]"
        image_id = str(require(entry, "image_id", where, str))
        answers = require(entry, "answers", where, list)
        ocr = require(entry, "ocr_tokens", where, list)
        items.append(Item(id=str(require(entry, "question_id", where)),
                          question=str(require(entry, "question", where, str)),
                          image=root / "train_images" / f"{image_id}.jpg", image_key=f"{image_id}.jpg",
                          answers=tuple(str(a) for a in answers),
                          info={"ocr_tokens": tuple(str(t) for t in ocr)}))
    return items
