"""Data-pipeline benchmarks; each result is one JSON line on stdout.

    llava-benchmark-data packing [--documents 10000000] [--seq-length 4096]
    llava-benchmark-data loader [--workers 0 1 4] [--samples 256]
    llava-benchmark-data all          (or: python tools/benchmark_data.py ...)

`packing` times the C++ packing index over synthetic documents shaped like interleaved web /
lecture data: text lengths log-normal (median ~400 tokens, long tail), images per document
Poisson(3) (at most 12, as the preprocessing keeps), images spread through the text.

`loader` writes a dataset of real photographs (scikit-image's sample images, or `--image-dir`)
in JPEG and raw storage, then measures images/s through `PackedDataset` + `build_loader`: with
`--workers 0` in the calling process on one thread (one worker's job, plus collation and
pinning), else per worker of a DataLoader (total rate / workers). Where CUDA is present every
batch goes through `to_device`, as in training: images travel as stored (uint8) and are
normalised on the GPU.
Token ids are synthetic: tokenization is not on this path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.config import IMAGE_TOKEN_ID
from engine.data.packing import PackingConfig, build_packing_index


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------------------------------- packing


def synthetic_corpus(num_docs: int, seed: int = 0):
    """(doc_lengths, doc_image_offsets, image_positions) of `num_docs` documents."""
    rng = np.random.default_rng(seed)
    images = np.minimum(rng.poisson(3.0, num_docs), 12)
    text = np.clip(rng.lognormal(np.log(400), 1.0, num_docs), 8, 60_000).astype(np.int64)
    lengths = text + images + 2  # BOS, EOS
    offsets = np.zeros(num_docs + 1, np.int64)
    np.cumsum(images, out=offsets[1:])
    doc = np.repeat(np.arange(num_docs), images)
    j = np.arange(offsets[-1]) - offsets[doc]  # index of the image within its document
    positions = 1 + j + (j + 1) * text[doc] // (images[doc] + 1)  # evenly spread, strictly increasing
    return lengths, offsets, positions


def bench_packing(args) -> None:
    t0 = time.perf_counter()
    lengths, offsets, positions = synthetic_corpus(args.documents)
    made = time.perf_counter() - t0
    documents = np.arange(args.documents, dtype=np.int64)
    for policy in ("split", "truncate"):
        config = PackingConfig(seq_length=args.seq_length, max_images_per_sample=args.max_images, policy=policy,
                               seed=1234)
        t0 = time.perf_counter()
        index = build_packing_index(documents, lengths, offsets, positions, config, num_samples=1)
        seconds = time.perf_counter() - t0
        emit(bench="packing_index", policy=policy, documents=args.documents, images=int(offsets[-1]),
             llm_positions=int(lengths.sum() + 575 * offsets[-1]), seq_length=args.seq_length,
             max_images_per_sample=args.max_images, seconds=round(seconds, 3), samples=len(index),
             segments=len(index.segments), packing_efficiency=round(index.efficiency(args.seq_length), 4),
             corpus_generation_seconds=round(made, 3))


# ------------------------------------------------------------------------------------- loader


def real_photos(image_dir: str | None) -> list[np.ndarray]:
    """Real photographs preprocessed to 336x336 exactly as the preprocessing tool stores them."""
    from PIL import Image

    from engine.data.images import load_image, preprocess

    if image_dir:
        files = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        return [preprocess(load_image(p)) for p in files]
    import skimage.data

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "motorcycle_left",
             "immunohistochemistry")
    return [preprocess(Image.fromarray(getattr(skimage.data, n)())) for n in names if hasattr(skimage.data, n)]


def write_dataset(prefix: Path, photos: list[np.ndarray], storage: str, num_docs: int, seed: int = 0) -> int:
    from engine.data.format import IndexedDatasetWriter
    from engine.data.images import encode_jpeg

    rng = np.random.default_rng(seed)
    stored = [encode_jpeg(p) if storage == "jpeg" else p.tobytes() for p in photos]
    k = 0
    with IndexedDatasetWriter(prefix, image_token_id=IMAGE_TOKEN_ID, image_size=336, image_storage=storage) as w:
        for _ in range(num_docs):
            pieces = [np.array([1])]
            for _ in range(int(rng.integers(1, 6))):
                pieces.append(rng.integers(3, 32000, int(rng.integers(20, 400))))
                pieces.append(np.array([IMAGE_TOKEN_ID]))
            pieces.append(rng.integers(3, 32000, int(rng.integers(20, 400))))
            pieces.append(np.array([2]))
            stream = np.concatenate(pieces)
            n = int(np.count_nonzero(stream == IMAGE_TOKEN_ID))
            w.add_document(stream, [stored[(k + i) % len(stored)] for i in range(n)])
            k += n
    return k


def time_loader(ds, workers: int, pin, device, args) -> dict:
    """Iterate the loader as training does (each batch moved to `device` when there is one)."""
    import torch

    from engine.data.loader import build_loader, to_device

    loader = build_loader(ds, micro_batch_size=args.micro_batch_size, num_workers=workers, prefetch_factor=4,
                          pin_memory=pin)
    pins = loader.pin_memory
    it = iter(loader)
    next(it)  # start the workers and warm up before timing
    images = samples = 0
    t0 = time.perf_counter()
    for batch in it:
        if device is not None:
            batch = to_device(batch, device)
        images += batch["images"].shape[0]
        samples += batch["tokens"].shape[0]
    if device is not None:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del it, loader
    return dict(to_device=device is not None, pin_memory=pins, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, samples=samples, images=images, seconds=round(seconds, 3),
                images_per_s=round(images / seconds, 1), images_per_s_per_worker=round(images / seconds / max(workers, 1), 1),
                samples_per_s=round(samples / seconds, 1), cpu_count=os.cpu_count())


def bench_loader(args) -> None:
    import torch

    from engine.data.dataset import PackedDataset

    photos = real_photos(args.image_dir)
    pin = {"auto": None, "on": True, "off": False}[args.pin_memory]
    device = "cuda" if torch.cuda.is_available() else None
    torch.set_num_threads(1)  # as in a DataLoader worker, so --workers 0 measures one worker's job
    with tempfile.TemporaryDirectory() as tmp:
        for storage in ("jpeg", "raw"):
            prefix = Path(tmp) / storage
            write_dataset(prefix, photos, storage, args.documents)
            ds = PackedDataset(prefix, PackingConfig(seq_length=args.seq_length, seed=0), split_weights="1",
                               num_samples=args.samples, cache_dir=Path(tmp) / "cache")
            for workers in args.workers:
                emit(bench="loader", storage=storage, workers=workers, **time_loader(ds, workers, pin, device, args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["packing", "loader", "all"])
    p.add_argument("--documents", type=int, default=None,
                   help="packing: documents to pack (default 10M); loader: documents written (default 200)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=None, help="packing: max images per sample")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--samples", type=int, default=256, help="loader: samples to load per measurement")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--pin-memory", choices=["auto", "on", "off"], default="auto",
                   help="loader: pin batches (auto: when CUDA is present, as training does)")
    p.add_argument("--image-dir", default=None, help="loader: folder of photos instead of scikit-image's")
    args = p.parse_args(argv)
    if args.what in ("packing", "all"):
        bench_packing(argparse.Namespace(**{**vars(args), "documents": args.documents or 10_000_000}))
    if args.what in ("loader", "all"):
        bench_loader(argparse.Namespace(**{**vars(args), "documents": args.documents or 200}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
