"""Preprocessing throughput on >= 720p JPEGs made from real photographs; prints one JSON line.

    llava-benchmark-preprocess --images 960 --workers 1 2 --height 720
    (or: python tools/benchmark_preprocess.py ...)

Inputs: scikit-image's photographs, centre-cropped to 16:9 and upscaled (bicubic) to
``--height`` p, saved as JPEG q90, six per document, with the photos' own descriptions (the
docstrings of ``skimage.data``) as the text. Measured:
- ``pipeline``: decode + CLIP pad/resize/crop + JPEG encode of the 336 result, one process,
  with and without JPEG draft decoding: [images per wall second, images per CPU second];
- ``tool``: the whole ``llava-preprocess`` run (reading, tokenizing, writing, merging) for each
  ``--workers``: images/s, images/s per worker, and images per CPU second (workers included,
  the spawn of the workers too), which is what one dedicated core does on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.images import encode_jpeg, preprocess_file

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"]
IMAGES_PER_DOC = 6


def make_inputs(folder: Path, n_images: int, height: int) -> tuple[Path, list[Path]]:
    from skimage import data as skdata

    width = height * 16 // 9
    images = []
    for k, name in enumerate(PHOTOS):
        arr = getattr(skdata, name)()
        arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
        h, w = arr.shape[:2]
        ch = min(h, w * 9 // 16)
        cw = ch * 16 // 9
        crop = arr[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        path = folder / f"{name}_{height}p.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BICUBIC).save(path, quality=90)
        images.append(path)
    prose = [" ".join((getattr(skdata, n).__doc__ or n).split()[:60]) for n in PHOTOS]
    docs = folder / "docs.jsonl"
    with open(docs, "w") as f:
        for d in range(0, n_images, IMAGES_PER_DOC):
            imgs, texts = [], []
            for j in range(d, min(d + IMAGES_PER_DOC, n_images)):
                imgs += [images[j % len(images)].name, None]
                texts += [None, prose[j % len(prose)]]
            f.write(json.dumps({"images": imgs, "texts": texts}) + "\n")
    return docs, images


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool's workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_pipeline(images: list[Path], n: int, draft: bool) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one process."""
    preprocess_file(images[0], draft=draft)  # warm up
    start, cpu = time.perf_counter(), _cpu_s()
    for k in range(n):
        encode_jpeg(preprocess_file(images[k % len(images)], draft=draft), 95)
    return n / (time.perf_counter() - start), n / (_cpu_s() - cpu)


def bench_tool(docs: Path, folder: Path, n_images: int, workers: int, tokenizer: str) -> dict:
    from engine.cli.preprocess import main

    prefix = folder / f"out_w{workers}"
    argv = ["--input", str(docs), "--output-prefix", str(prefix), "--tokenizer-model", tokenizer,
            "--workers", str(workers), "--no-progress", "--docs-per-part", "1000000"]
    start, cpu = time.perf_counter(), _cpu_s()
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")  # the tool prints its summary; we print ours
    try:
        rc = main(argv)
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    if rc != 0:
        raise SystemExit(f"preprocessing failed with workers={workers}")
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert summary["images_out"] == n_images, summary
    return {"workers": workers, "wall_s": round(wall, 2), "images_per_s": round(n_images / wall, 1),
            "images_per_s_per_worker": round(n_images / wall / workers, 1),
            "images_per_cpu_s": round(n_images / cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=960)
    p.add_argument("--height", type=int, default=720, help="input height in pixels (16:9)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--tokenizer-model", default=None, help="default: mistral-common's tokenizer.model.v1")
    args = p.parse_args(argv)
    if args.tokenizer_model is None:
        import mistral_common

        args.tokenizer_model = str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        docs, images = make_inputs(folder, args.images, args.height)
        n_pipe = min(args.images, 200)
        result = {
            "benchmark": "preprocess",
            "input": f"{args.height * 16 // 9}x{args.height} JPEG q90 (skimage photos, upscaled)",
            "images": args.images,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "pipeline": {k: [round(v, 1) for v in bench_pipeline(images, n_pipe, draft=draft)]
                         for k, draft in (("draft", True), ("no_draft", False))},
            "tool": [bench_tool(docs, folder, args.images, w, args.tokenizer_model) for w in args.workers],
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
