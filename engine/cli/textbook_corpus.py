"""Write a corpus shaped like the Multimodal Textbook, for convergence runs and benchmarks.

    python tools/make_textbook_corpus.py --output out/textbook_like --documents 2000 --workers 8
    python tools/preprocess_interleaved.py --input out/textbook_like/corpus.jsonl \\
        --image-root out/textbook_like --output-prefix out/data/textbook_like --tokenizer-model ...

Each document is one "lecture" in OBELICS format (`images` and `texts` lists, one of the two null
at each position), shaped like the published corpus:

  keyframes   4 to 20 per lecture, most at or over the 12-image cap the preprocessing keeps
              (60 % draw 12-20, 40 % draw 4-11: about 10 images per document after the cap)
  text        40 to 250 words between consecutive keyframes (skewed low, about 100 on average:
              ~1.2k text tokens per document with the LLaMA tokenizer), and a short title first
  frames      16:9 (640 x 360 JPEG), so preprocessing pads them to a square as it does real frames

The words come from a bigram model of the real text of the bundled sample corpus, so the text has
learnable statistics (the loss falls) without being memorisable noise; the frames are random crops,
flips and brightness changes of the bundled photographs, so no two frames are the same bytes.
Deterministic for a given `--seed`, whatever `--workers`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parents[2]
FRAME = (640, 360)


def bigram_model(texts: list[str]) -> dict[str, list[str]]:
    """word -> the words that follow it in `texts` (with repetition: sampling follows frequency)."""
    follows: dict[str, list[str]] = defaultdict(list)
    for text in texts:
        words = re.findall(r"[\w'.,;:()-]+", text)
        for a, b in zip(words, words[1:]):
            follows[a].append(b)
    return dict(follows)


def sample_words(model: dict[str, list[str]], n: int, rng: random.Random) -> str:
    starts = list(model)
    word, out = rng.choice(starts), []
    for _ in range(n):
        out.append(word)
        nxt = model.get(word)
        word = rng.choice(nxt) if nxt else rng.choice(starts)
    return " ".join(out)


def lecture(model: dict[str, list[str]], frames: list[str], rng: random.Random) -> dict:
    """One document: title, then keyframe / transcript pairs."""
    k = rng.randint(12, 20) if rng.random() < 0.6 else rng.randint(4, 11)
    images, texts = [None], [sample_words(model, rng.randint(5, 12), rng)]
    for name in frames[:k]:
        images += [name, None]
        texts += [None, sample_words(model, 40 + int(210 * rng.betavariate(1.2, 3.0)), rng)]
    return {"images": images, "texts": texts}


def _frame(job: tuple[int, str, str, int]) -> None:
    """Write frame `index` of the corpus: a random 16:9 view of one photograph."""
    index, photo, out, seed = job
    rng = random.Random(seed * 1_000_003 + index)
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    cw = rng.randint(max(16, w // 3), w)
    ch = min(h, max(9, cw * 9 // 16))
    cw = min(cw, ch * 16 // 9)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    view = img.crop((x, y, x + cw, y + ch)).resize(FRAME, Image.BICUBIC)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    view.save(out, "JPEG", quality=85)


def write_corpus(output: Path, documents: int, seed: int, source: Path, photos: list[Path], workers: int) -> dict:
    texts = [t for line in source.read_text().splitlines() if line.strip()
             for t in json.loads(line)["texts"] if t]
    model = bigram_model(texts)
    rng = random.Random(seed)
    (output / "frames").mkdir(parents=True, exist_ok=True)
    jobs, docs = [], []
    for d in range(documents):
        names = [f"frames/{d:07d}_{i:02d}.jpg" for i in range(20)]
        doc = lecture(model, names, rng)
        used = [n for n in doc["images"] if n]
        jobs += [(len(jobs), str(rng.choice(photos)), str(output / n), seed) for n in used]
        docs.append(doc)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_frame, jobs, chunksize=64)
    with open(output / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    counts = [sum(1 for n in doc["images"] if n) for doc in docs]
    return {"output": str(output), "documents": documents, "frames": len(jobs),
            "frames_per_document": round(sum(counts) / documents, 2),
            "documents_over_12_frames": sum(c > 12 for c in counts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-textbook-corpus", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for corpus.jsonl and frames/")
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--source", default=str(REPO / "examples/data/textbook_sample.jsonl"),
                   help="OBELICS JSONL whose text trains the word model")
    p.add_argument("--photos", default=str(REPO / "examples/data/images"), help="folder of photographs (searched recursively)")
    a = p.parse_args(argv)
    photos = sorted(q for q in Path(a.photos).rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if a.documents < 1 or not photos:
        p.error("need --documents >= 1 and at least one photograph under --photos")
    print(json.dumps(write_corpus(Path(a.output), a.documents, a.seed, Path(a.source), photos, a.workers)))
    return 0
