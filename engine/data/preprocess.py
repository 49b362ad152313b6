"""The preprocessing pipeline: interleaved documents (engine/data/documents.py) -> the binary
dataset (engine/data/format.py), in parallel, resumable, byte-reproducible. `llava-preprocess`
(engine/cli/preprocess.py) is its command line.

Writes ``<prefix>.idx``, ``.tokens.bin``, ``.images.bin``, the rejected documents with their
reasons in ``<prefix>.errors.jsonl`` and counts in ``<prefix>.summary.json``.

How it works. Documents are read in order (files sorted, folders walked in sorted order) and
grouped into *parts* of ``docs_per_part`` documents. Workers turn chunks of documents into token
streams and preprocessed images; the main process consumes their results in submission order and
writes each part as a small dataset under ``<prefix>.parts/``, renamed into place when complete.
At the end the parts are merged into ``<prefix>`` and the folder is removed. Hence:
- the output is the same bytes whatever the number of workers (every result depends only on its
  document);
- a rerun after an interruption reuses the finished parts and ends with the same bytes as an
  uninterrupted run (a part folder left by different inputs or settings is discarded);
- nothing named ``<prefix>.idx`` exists until the whole job is done.

The first ``max_num_images`` images of a document (in reading order) are kept; later ones are
dropped with their placeholders. A document needs at least one image.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from engine.data import format as fmt
from engine.data.documents import (DocumentError, document_location, is_json_list, keep_first_images,
                                   parse_document, read_documents, resolve_image)
from engine.data.images import ImageError, encode_jpeg, preprocess_file
from engine.data.tokenizer import build_tokenizer, encode_document
from engine.errors import PreprocessError

CHUNK_DOCS = 8  # documents per worker task: small enough to balance, large enough to amortise IPC


@dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes (and nothing else, so the worker count is absent)."""

    image_root: str | None
    text_field: str
    doc_format: str
    max_num_images: int
    image_size: int
    image_storage: str
    jpeg_quality: int
    jpeg_draft: bool
    max_image_pixels: int
    tokenizer_type: str
    tokenizer_model: str
    allow_text_only: bool = False  # keep documents without images (text-only data, trained under loss policy "all")


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, not what it writes."""

    workers: int = 1
    docs_per_part: int = 10000
    on_error: str = "skip"  # "skip": list bad documents in <prefix>.errors.jsonl; "fail": stop at the first
    progress: bool = True


# ------------------------------------------------------------------------------ workers

_worker: dict = {}


def init_worker(settings: Settings, tokenizer) -> None:
    # PIL's own guard must not fire before ours (ours names the file and the limit).
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    _worker.update(settings=settings, tokenizer=tokenizer)


def process_chunk(chunk: list[tuple[int, int, str, object]]) -> list[dict]:
    return [process_document(*task) for task in chunk]


def process_document(source_id: int, loc: int, root: str, payload: bytes | tuple[str, str]) -> dict:
    """One raw document (JSON bytes, or a (kind, reason) the reader already found wrong) ->
    {"tokens", "images", counts} or {"error": kind, "reason"}."""
    s: Settings = _worker["settings"]
    stats = {"images_in": 0}
    try:
        segments, refs = parse_document(payload, s.doc_format, s.text_field)
        stats["images_in"] = len(refs)
        segments, refs = keep_first_images(segments, refs, s.max_num_images)
        if not refs and not s.allow_text_only:
            raise DocumentError("no_images", "no image left after filtering (a document needs at least one; "
                                             "--allow-text-only keeps text-only documents)")
        images = []
        for k, ref in enumerate(refs):
            try:
                pixels = preprocess_file(resolve_image(ref, root), size=s.image_size,
                                         max_pixels=s.max_image_pixels, draft=s.jpeg_draft)
            except ImageError as e:
                raise DocumentError(e.kind, f"image {k} ({ref!r}): {e}") from None
            images.append(encode_jpeg(pixels, s.jpeg_quality) if s.image_storage == "jpeg" else pixels.tobytes())
        tokens = encode_document(_worker["tokenizer"], segments)
    except DocumentError as e:
        return {"source": source_id, "loc": loc, "error": e.kind, "reason": str(e), **stats}
    return {"source": source_id, "loc": loc, "tokens": tokens, "images": images, **stats,
            "images_out": len(images), "images_dropped": stats["images_in"] - len(images)}


# ------------------------------------------------------------------------------ inputs


def expand_inputs(paths: list[str]) -> list[Path]:
    """The input files in reading order: files as given, folders' .json/.jsonl files sorted
    (hidden ones skipped)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl")
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PreprocessError(f"{p}: folder holds no .json or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PreprocessError(f"{p}: no such file or folder")
    return files


def _count_jsonl_docs(sources: list[Path]) -> int | None:
    """Documents in the input when it is all JSONL (a cheap line count), for the progress bar's ETA."""
    if any(is_json_list(p) for p in sources):
        return None
    n = 0
    for p in sources:
        with open(p, "rb") as f:
            n += sum(1 for line in f if line.strip())
    return n


# ------------------------------------------------------------------------------ the run


class _Done:
    """A marker in the ordered stream of tasks; `result()` like a future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _ordered(items, executor, window: int):
    """Run the list-valued items on `executor` (or inline) and yield results in input order,
    with at most `window` tasks in flight (bounded memory, unlike Pool.imap)."""
    pending = deque()
    for kind, payload in items:
        if kind == "chunk":
            pending.append(executor.submit(process_chunk, payload) if executor else _Done(process_chunk(payload)))
        else:
            pending.append(_Done((kind, payload)))
        while len(pending) > window or (pending and isinstance(pending[0], _Done)):
            yield _tag(pending.popleft())
    while pending:
        yield _tag(pending.popleft())


def _tag(future):
    value = future.result()
    return value if isinstance(value, tuple) else ("results", value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fingerprint(settings: Settings, sources: list[Path], docs_per_part: int) -> dict:
    tok = Path(settings.tokenizer_model)
    tok_id = ([tok.stat().st_size, tok.stat().st_mtime_ns] if tok.is_file() else None)
    return {"format_version": fmt.VERSION, "settings": asdict(settings), "docs_per_part": docs_per_part,
            "tokenizer_file": tok_id,
            "inputs": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]}


def _new_stats() -> Counter:
    return Counter(documents_in=0, documents_out=0, images_in=0, images_out=0, images_dropped_over_max=0,
                   tokens=0)


def _task_stream(sources, parts_dir: Path, docs_per_part: int, settings: Settings):
    """("part", info) / ("chunk", tasks) / ("end", info) / ("skip", info), in output order."""
    for sid, src in enumerate(sources):
        root = settings.image_root or str(src.parent)
        part, chunk, info = 0, [], None
        for loc, raw in read_documents(src):
            if info is None:
                info = {"name": f"{sid:05d}-{part:06d}", "source": str(src), "docs": 0}
                info["done"] = (parts_dir / (info["name"] + ".done.json")).is_file()
                if not info["done"]:
                    yield "part", info
            info["docs"] += 1
            if not info["done"]:
                chunk.append((sid, loc, root, raw))
                if len(chunk) == CHUNK_DOCS:
                    yield "chunk", chunk
                    chunk = []
            if info["docs"] == docs_per_part:
                if chunk:
                    yield "chunk", chunk
                    chunk = []
                yield ("skip" if info["done"] else "end"), info
                part, info = part + 1, None
        if info is not None:
            if chunk:
                yield "chunk", chunk
            yield ("skip" if info["done"] else "end"), info


def run(settings: Settings, inputs: list[str], output_prefix: str | os.PathLike, options: RunOptions) -> dict:
    """Preprocess the files and folders `inputs` into `output_prefix`; returns the summary."""
    if settings.image_root is not None and not os.path.isdir(settings.image_root):
        raise PreprocessError(f"--image-root {settings.image_root}: not a folder")
    sources = expand_inputs(inputs)
    tokenizer = build_tokenizer(settings.tokenizer_type, settings.tokenizer_model)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = _prepare_parts_dir(prefix, _fingerprint(settings, sources, options.docs_per_part))
    writer_kw = dict(image_token_id=tokenizer.image_token_id, image_size=settings.image_size,
                     image_storage=settings.image_storage,
                     token_dtype=fmt.token_dtype_for(max(tokenizer.vocab_size, tokenizer.image_token_id)))

    start = time.perf_counter()
    parts, counts = _write_parts(options, settings, tokenizer, sources, parts_dir, writer_kw)
    elapsed = time.perf_counter() - start

    # Every part is on disk: gather counts and errors, then assemble the dataset.
    stats, errors = _new_stats(), []
    for name in parts:
        done = json.loads((parts_dir / (name + ".done.json")).read_text())
        stats.update(done["stats"])
        errors.extend(done["errors"])
    skipped = Counter(e["kind"] for e in errors)
    summary = {
        "output_prefix": str(prefix),
        **{k: stats[k] for k in ("documents_in", "documents_out")},
        "documents_skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        **{k: stats[k] for k in ("images_in", "images_out", "images_dropped_over_max", "tokens")},
        "image_storage": settings.image_storage, "image_size": settings.image_size,
        "image_token_id": tokenizer.image_token_id, "workers": options.workers, "parts": len(parts),
        "parts_reused": counts["reused"], "elapsed_s": round(elapsed, 3),
        # this run's own work (resumed parts excluded)
        "docs_per_s": round(counts["docs"] / elapsed, 2), "images_per_s": round(counts["images"] / elapsed, 2),
    }
    _atomic_write(Path(str(prefix) + ".errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
    _atomic_write(Path(str(prefix) + ".summary.json"), json.dumps(summary, indent=1) + "\n")
    if parts:
        fmt.merge([parts_dir / name for name in parts], prefix)
    else:  # no input documents at all: an empty, valid dataset
        fmt.IndexedDatasetWriter(prefix, **writer_kw).finalize()
    shutil.rmtree(parts_dir)
    return summary


def _prepare_parts_dir(prefix: Path, manifest: dict) -> Path:
    """`<prefix>.parts/`, kept from an earlier run only if that run had the same inputs and settings."""
    parts_dir = Path(str(prefix) + ".parts")
    manifest_path = parts_dir / "manifest.json"
    if parts_dir.is_dir():
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if old != manifest:
            print(f"{parts_dir}: left by a run with other inputs or settings; starting over", file=sys.stderr)
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(exist_ok=True)
    if not manifest_path.is_file():
        _atomic_write(manifest_path, json.dumps(manifest, indent=1))
    return parts_dir


def _write_parts(options: RunOptions, settings: Settings, tokenizer, sources: list[Path], parts_dir: Path,
                 writer_kw: dict) -> tuple[list[str], Counter]:
    """Process every part not finished yet; returns all part names in order and this run's counts."""
    from tqdm import tqdm

    executor = None
    if options.workers > 1:
        executor = cf.ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=init_worker, initargs=(settings, tokenizer))
    init_worker(settings, tokenizer)
    bar = tqdm(total=_count_jsonl_docs(sources), unit="doc", dynamic_ncols=True, disable=not options.progress,
               smoothing=0.1)
    start = time.perf_counter()
    parts, counts, writer, part_stats, part_errors = [], Counter(docs=0, images=0, reused=0), None, None, None
    try:
        stream = _task_stream(sources, parts_dir, options.docs_per_part, settings)
        for kind, value in _ordered(stream, executor, window=4 * options.workers):
            if kind == "part":
                writer = fmt.IndexedDatasetWriter(parts_dir / value["name"], **writer_kw)
                part_stats, part_errors = _new_stats(), []
            elif kind == "results":
                for r in value:
                    _consume(r, writer, part_stats, part_errors, sources, options.on_error)
                    counts["images"] += r.get("images_out", 0)
                counts["docs"] += len(value)
                bar.update(len(value))
                rate = counts["images"] / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} images/s", refresh=False)
            elif kind == "end":
                writer.finalize()
                writer = None
                done = {"name": value["name"], "source": value["source"], "stats": dict(part_stats),
                        "errors": part_errors}
                _atomic_write(parts_dir / (value["name"] + ".done.json"), json.dumps(done))
                parts.append(value["name"])
            elif kind == "skip":
                parts.append(value["name"])
                counts["reused"] += 1
                bar.update(value["docs"])
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return parts, counts


def _consume(r: dict, writer, stats: Counter, errors: list, sources: list[Path], on_error: str) -> None:
    stats["documents_in"] += 1
    stats["images_in"] += r["images_in"]
    if "error" in r:
        src = sources[r["source"]]
        where = document_location(src, r["loc"])
        entry = {"source": str(src), **where, "kind": r["error"], "reason": r["reason"]}
        if on_error == "fail":
            raise PreprocessError(f"{src}: {next(iter(where))} {r['loc']}: {r['reason']}")
        errors.append(entry)
        return
    writer.add_document(r["tokens"], r["images"])
    stats["documents_out"] += 1
    stats["images_out"] += r["images_out"]
    stats["images_dropped_over_max"] += r["images_dropped"]
    stats["tokens"] += len(r["tokens"])
