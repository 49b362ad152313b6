"""Benchmark folders in an official release layout, written rather than downloaded: for speed
benchmarks (no download, any size) and for tests (given questions and pictures).

`write_okvqa_split` writes one OK-VQA split from given questions and a picture writer, using the
reader's own file names (vqa_readers.okvqa_files / okvqa_image). `synthetic_okvqa` fills a
folder with OK-VQA-shaped content: short open questions, 10 annotator answers each, COCO-sized
JPEG pictures (640x480, smooth colour fields with grain) drawn from a seeded generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from engine.evaluation.vqa_readers import okvqa_files, okvqa_image


class VqaEntry(NamedTuple):
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...]  # the annotators' answers (10 in OK-VQA)


def write_okvqa_split(root: Path, split: str, entries: Sequence[VqaEntry],
                      picture: Callable[[int, Path], None]) -> Path:
    """Questions, annotations and pictures of one split; `picture(k, path)` writes the k-th
    entry's picture to `path` (its folder exists)."""
    root = Path(root)
    questions, annotations = [], []
    for k, e in enumerate(entries):
        questions.append({"image_id": e.image_id, "question": e.question, "question_id": e.question_id})
        annotations.append({"question_id": e.question_id, "image_id": e.image_id, "question_type": "other",
                            "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(e.answers)]})
        dst = okvqa_image(root, split, e.image_id)
        dst.parent.mkdir(parents=True, exist_ok=True)
        picture(k, dst)
    qpath, apath = okvqa_files(root, split)
    root.mkdir(parents=True, exist_ok=True)
    qpath.write_text(json.dumps({"questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    return root


QUESTIONS = (
    "What sport can you use this for?",
    "What is the name of the company that makes this {thing}?",
    "Which country is this {thing} most often found in?",
    "What is this {thing} made of?",
    "What is the {thing} used for?",
    "What season is it in this picture?",
    "What kind of animal is shown here?",
    "How old is the {thing} in this photo?",
    "What food is usually served with this?",
    "Why would someone keep a {thing} here?",
)
THINGS = ("bus", "bicycle", "kite", "umbrella", "clock", "bench", "pizza", "dog", "boat", "train", "vase", "cake")
ANSWERS = ("tennis", "surfing", "wood", "metal", "summer", "winter", "cat", "horse", "italy", "japan",
           "transportation", "decoration", "bread", "coffee", "10 years", "safety", "honda", "ski")


def _entries(rng: np.random.Generator, n: int, first_image_id: int) -> list[VqaEntry]:
    out = []
    for i in range(n):
        image_id = first_image_id + i
        question = QUESTIONS[rng.integers(len(QUESTIONS))].format(thing=THINGS[rng.integers(len(THINGS))])
        pool = rng.choice(len(ANSWERS), size=3, replace=False)
        answers = tuple(ANSWERS[pool[j]] for j in rng.choice(3, size=10, p=(0.6, 0.3, 0.1)))
        out.append(VqaEntry(image_id * 10 + 5, image_id, question, answers))
    return out


def _photo_like(rng: np.random.Generator, path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def synthetic_okvqa(root: Path, questions: int, demo_pool: int, *, seed: int = 0,
                    size: tuple[int, int] = (640, 480)) -> Path:
    """An OK-VQA folder with `questions` val questions and `demo_pool` train questions (the
    demonstrations' pool), each with its own picture."""
    rng = np.random.default_rng(seed)
    for split, n, first in (("val", questions, 100_000), ("train", demo_pool, 500_000)):
        write_okvqa_split(root, split, _entries(rng, n, first), lambda k, path: _photo_like(rng, path, size))
    return Path(root)
