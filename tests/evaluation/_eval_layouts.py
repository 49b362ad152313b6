"""Small benchmark folders in each official release layout, written from real photographs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from PIL import Image

from engine.evaluation.synthetic import VqaEntry, write_okvqa_split

PHOTOS = Path(__file__).resolve().parents[2] / "examples" / "data" / "images" / "skimage"
NAMES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "motorcycle_left", "clock", "coins",
         "page", "text", "moon", "brick"]


def photo(k: int) -> Path:
    return PHOTOS / f"{NAMES[k % len(NAMES)]}.jpg"


def png_bytes(k: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.open(photo(k)).convert("RGB").resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


VQA_ANSWERS = ["cat", "cat", "cat", "dog", "dog", "kitten", "cat", "a cat", "cats", "animal"]


def write_okvqa(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    for split, n, base in (("train", n_train, 100), ("val", n_val, 200)):
        entries = [VqaEntry(base + i, 1000 + base + i, f"What is shown in picture {i}?", tuple(VQA_ANSWERS))
                   for i in range(n)]
        write_okvqa_split(root, split, entries, lambda k, dst, base=base: shutil.copy(photo(base + k), dst))
    return root


def write_textvqa(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    for split, n, base in (("train", n_train, 0), ("val", n_val, 50)):
        data = []
        for i in range(n):
            image_id = f"{split}img{i:03d}"
            data.append({"question_id": base + i, "question": f"what does sign {i} say?", "image_id": image_id,
                         "answers": ["stop"] * 6 + ["stop sign"] * 4, "ocr_tokens": ["stop", f"no{i}"],
                         "set_name": split})
            (root / "train_images").mkdir(parents=True, exist_ok=True)
            shutil.copy(photo(base + i), root / "train_images" / f"{image_id}.jpg")
        _dump(root / f"TextVQA_0.5.1_{split}.json", {"dataset_type": split, "dataset_name": "textvqa", "data": data})
    return root


def write_scienceqa(root: Path) -> Path:
    problems, splits = {}, {"train": [], "val": [], "test": []}
    layout = [("train", 4, True), ("train", 1, False), ("test", 3, True), ("test", 1, False)]
    pid = 1
    for split, n, with_image in layout:
        for _ in range(n):
            problems[str(pid)] = {"question": f"Which animal is in picture {pid}?", "choices": ["cat", "dog", "bird"],
                                  "answer": pid % 3, "hint": "Look at the picture." if pid % 2 else "",
                                  "image": "image.png" if with_image else None, "split": split}
            if with_image:
                dst = root / "images" / split / str(pid) / "image.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(png_bytes(pid))
            splits[split].append(str(pid))
            pid += 1
    _dump(root / "problems.json", problems)
    _dump(root / "pid_splits.json", splits)
    return root


def mathvista_records(n: int = 3) -> list[dict]:
    recs = []
    for i in range(n):
        choice = i % 2 == 0
        recs.append({"pid": str(i + 1), "question": f"What is the value of x in figure {i + 1}?",
                     "image": f"images/{i + 1}.jpg", "choices": ["3", "5", "7"] if choice else None,
                     "unit": "cm" if not choice else None, "precision": 1.0 if not choice else None,
                     "answer": "5" if choice else "2.5", "question_type": "multi_choice" if choice else "free_form",
                     "answer_type": "text" if choice else "float", "metadata": {"split": "testmini"},
                     "query": "unused"})
    return recs


def write_mathvista(root: Path, n: int = 3) -> Path:
    recs = mathvista_records(n)
    for k, r in enumerate(recs):
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo(k + 3), root / r["image"])
    _dump(root / "annot_testmini.json", {r["pid"]: r for r in recs})
    return root


def mathvision_records(n: int = 3) -> list[dict]:
    return [{"id": str(i + 1), "question": f"How many squares are in figure {i + 1}?",
             "options": ["1", "2", "3", "4", "5"] if i % 2 == 0 else [], "image": f"images/{i + 1}.jpg",
             "answer": "C" if i % 2 == 0 else "12", "solution": None, "level": 2, "subject": "counting"}
            for i in range(n)]


def write_mathvision(root: Path, n: int = 3) -> Path:
    recs = mathvision_records(n)
    for k, r in enumerate(recs):
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo(k + 6), root / r["image"])
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def mathverse_records(n: int = 3) -> list[dict]:
    return [{"sample_index": str(i + 1), "problem_index": str(i + 1), "problem_version": "Text Lite",
             "question": f"Find the angle in figure {i + 1}.\nChoices:\nA:30\nB:60" if i % 2 == 0
             else f"Find the length in figure {i + 1}.",
             "image": f"image_{i + 1}.png", "answer": "B" if i % 2 == 0 else "4",
             "question_type": "multi-choice" if i % 2 == 0 else "free-form",
             "metadata": {"split": "testmini"}, "query_wo": "", "query_cot": "", "question_for_eval": ""}
            for i in range(n)]


def write_mathverse(root: Path, n: int = 3) -> Path:
    recs = mathverse_records(n)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(recs):
        (root / "images" / r["image"]).write_bytes(png_bytes(k + 8))
    _dump(root / "testmini.json", recs)
    return root


def write_all(data_root: Path) -> Path:
    write_okvqa(data_root / "okvqa")
    write_textvqa(data_root / "textvqa")
    write_scienceqa(data_root / "scienceqa")
    write_mathvista(data_root / "mathvista")
    write_mathvision(data_root / "mathvision")
    write_mathverse(data_root / "mathverse")
    return data_root
