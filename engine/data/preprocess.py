"""Interleaved image-text documents (OBELICS / Multimodal Textbook, MMC4) -> the binary dataset.

    llava-preprocess --input docs.jsonl shards/ --image-root images/ \\
        --tokenizer-model tokenizer.model --output-prefix out/textbook --workers 16

Writes ``<prefix>.idx``, ``.tokens.bin``, ``.images.bin`` (engine/data/format.py), the rejected
documents with their reasons in ``<prefix>.errors.jsonl`` and counts in ``<prefix>.summary.json``.

How it works. Documents are read in order (files sorted, folders walked in sorted order) and
grouped into *parts* of ``--docs-per-part`` documents. Workers turn chunks of documents into token
streams and preprocessed images; the main process consumes their results in submission order and
writes each part as a small dataset under ``<prefix>.parts/``, renamed into place when complete.
At the end the parts are merged into ``<prefix>`` and the folder is removed. Hence:
- the output is the same bytes whatever ``--workers`` (every result depends only on its document);
- a rerun after an interruption reuses the finished parts and ends with the same bytes as an
  uninterrupted run (a part folder left by different inputs or settings is discarded);
- nothing named ``<prefix>.idx`` exists until the whole job is done.

Document semantics (the seed's, see DESIGN.md and engine/data/tokenizer.py):
- OBELICS: ``images`` and ``texts`` (or ``--text-field text_ocr_list``) lists of equal length with
  exactly one non-null entry per position; an optional ``valid_image`` list of booleans drops
  images. ``images[i]`` is a path relative to ``--image-root``, or a URL, which names the file
  ``sha256(url)`` (hex) in the root, as the seed's data loaders name downloaded images.
- MMC4: ``text_list``, ``image_info`` (``image_name``, else ``sha256(image_url or raw_url)``),
  ``similarity_matrix`` [images x sentences], optional ``valid_image_ids``. Each image goes before
  the sentence that maximum-weight matching (scipy ``linear_sum_assignment``) gives it; with more
  images than sentences the unmatched images are dropped.
- The first ``--max-num-images`` images (in reading order) are kept; later ones are dropped with
  their placeholders. A document needs at least one image.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import json
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/preprocess_interleaved.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from engine.data import format as fmt
from engine.data.images import DEFAULT_MAX_PIXELS, ImageError, encode_jpeg, preprocess_file
from engine.data.tokenizer import build_tokenizer, encode_document

CHUNK_DOCS = 8  # documents per worker task: small enough to balance, large enough to amortise IPC


class DocumentError(Exception):
    """A document that is skipped; `kind` groups the summary, the message is for a person."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class PreprocessError(RuntimeError):
    """Stops the run (bad arguments, unreadable input, or a document error with --on-error fail)."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes (and nothing else, so --workers is absent)."""

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


# ------------------------------------------------------------------------------ documents


def _check_text(value, where: str) -> None:
    """A text segment must be a string of valid Unicode: JSON's \\ud800 escapes decode to lone
    surrogates, which no tokenizer (nor UTF-8) can take."""
    if not isinstance(value, str):
        raise DocumentError("bad_field", f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentError("bad_field", f"{where} is not valid Unicode: {e.reason} at character {e.start}") from None


def _list_field(rec: dict, name: str) -> list:
    if name not in rec:
        raise DocumentError("bad_field", f"missing field {name!r}")
    value = rec[name]
    if not isinstance(value, list):
        raise DocumentError("bad_field", f"field {name!r} must be a list, got {type(value).__name__}")
    return value


def obelics_segments(rec: dict, text_field: str) -> tuple[list[str | None], list[str]]:
    """(segments with None at each image, image references in order)."""
    images, texts = _list_field(rec, "images"), _list_field(rec, text_field)
    if len(images) != len(texts):
        raise DocumentError("unequal_lengths",
                            f"'images' has {len(images)} entries but {text_field!r} has {len(texts)}")
    if not images:
        raise DocumentError("empty_document", "the document is empty ('images' and "
                                              f"{text_field!r} are empty lists)")
    valid = rec.get("valid_image")
    n_images = sum(img is not None for img in images)
    if valid is not None and (not isinstance(valid, list) or len(valid) != n_images):
        raise DocumentError("bad_field", f"'valid_image' must be a list of {n_images} booleans (one per image)")
    segments, refs, k = [], [], 0
    for i, (img, txt) in enumerate(zip(images, texts)):
        if img is not None and txt is not None:
            raise DocumentError("both_image_and_text", f"position {i} has both an image ({img!r}) and a text")
        if img is None and txt is None:
            raise DocumentError("neither_image_nor_text", f"position {i} has neither an image nor a text")
        if txt is not None:
            _check_text(txt, f"{text_field}[{i}]")
            segments.append(txt)
            continue
        if not isinstance(img, str) or not img:
            raise DocumentError("bad_field", f"images[{i}] must be a non-empty string, got {img!r}")
        if valid is None or valid[k]:
            segments.append(None)
            refs.append(img)
        k += 1
    return segments, refs


def mmc4_segments(rec: dict) -> tuple[list[str | None], list[str]]:
    from scipy.optimize import linear_sum_assignment

    sentences, info = _list_field(rec, "text_list"), _list_field(rec, "image_info")
    for j, s in enumerate(sentences):
        _check_text(s, f"text_list[{j}]")
    if not sentences and not info:
        raise DocumentError("empty_document", "the document is empty ('text_list' and 'image_info' are empty)")
    ids = rec.get("valid_image_ids", list(range(len(info))))
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(info) for i in ids):
        raise DocumentError("bad_field", f"'valid_image_ids' must list indices into the {len(info)} images")
    refs = []
    for i in ids:
        entry = info[i]
        if not isinstance(entry, dict):
            raise DocumentError("bad_field", f"image_info[{i}] must be an object")
        name = entry.get("image_name")
        url = entry.get("image_url") or entry.get("raw_url")
        if isinstance(name, str) and name:
            refs.append(name)
        elif isinstance(url, str) and url:
            refs.append(_url_file_name(url))
        else:
            raise DocumentError("bad_field", f"image_info[{i}] has no 'image_name', 'image_url' or 'raw_url'")
    by_sentence: dict[int, str] = {}
    if refs and sentences:
        try:
            sim = np.asarray(rec.get("similarity_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            raise DocumentError("bad_field", "'similarity_matrix' must be a numeric [images][sentences] list")
        if sim.shape != (len(info), len(sentences)):
            raise DocumentError("bad_field", f"'similarity_matrix' has shape {sim.shape}, expected "
                                             f"({len(info)}, {len(sentences)}) = (images, sentences)")
        if not np.isfinite(sim).all():  # JSON parsers accept NaN and Infinity; the matching cannot
            raise DocumentError("bad_field", "'similarity_matrix' holds NaN or infinite values")
        rows, cols = linear_sum_assignment(sim[ids], maximize=True)
        by_sentence = {int(c): refs[r] for r, c in zip(rows, cols)}
    segments, ordered = [], []
    for j, s in enumerate(sentences):
        if j in by_sentence:
            segments.append(None)
            ordered.append(by_sentence[j])
        segments.append(s)
    return segments, ordered


def detect_format(rec: dict, forced: str) -> str:
    if forced != "auto":
        return forced
    if "text_list" in rec or "image_info" in rec:
        return "mmc4"
    if "images" in rec:
        return "obelics"
    raise DocumentError("unknown_format", "neither OBELICS fields ('images', 'texts') nor MMC4 fields "
                                          "('text_list', 'image_info') are present")


def keep_first_images(segments: list[str | None], refs: list[str], n: int) -> tuple[list[str | None], list[str]]:
    """Drop the images after the first `n`, with their placeholders."""
    if len(refs) <= n:
        return segments, refs
    out, seen = [], 0
    for seg in segments:
        if seg is None:
            seen += 1
            if seen > n:
                continue
        out.append(seg)
    return out, refs[:n]


def _url_file_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def resolve_image(ref: str, root: str) -> str:
    """The file of image reference `ref`; refuses anything that resolves outside `root`
    (``..``, absolute paths, symlinks)."""
    if "://" in ref:
        ref = _url_file_name(ref)
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        raise DocumentError("bad_field", f"image path {ref!r} is not valid Unicode (a lone surrogate)") from None
    if "\0" in ref:
        raise DocumentError("bad_field", f"image path {ref!r} contains a NUL byte")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, ref))
    if os.path.commonpath([path, real_root]) != real_root:
        raise DocumentError("unsafe_path", f"image path {ref!r} resolves outside the image root {root}")
    return path


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
        if isinstance(payload, tuple):
            raise DocumentError(*payload)
        try:
            rec = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DocumentError("malformed_json", f"not valid JSON: {e}") from None
        except RecursionError:
            raise DocumentError("malformed_json", "JSON nested too deeply to parse") from None
        if not isinstance(rec, dict):
            raise DocumentError("malformed_json", f"a document must be a JSON object, got {type(rec).__name__}")
        kind = detect_format(rec, s.doc_format)
        segments, refs = mmc4_segments(rec) if kind == "mmc4" else obelics_segments(rec, s.text_field)
        stats["images_in"] = len(refs)
        if not refs and not any(segments):
            raise DocumentError("empty_document", "the document has no image and no text")
        segments, refs = keep_first_images(segments, refs, s.max_num_images)
        if not refs:
            raise DocumentError("no_images", "no image left after filtering (a document needs at least one)")
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


# ------------------------------------------------------------------------------ reading inputs


def expand_inputs(paths: list[str]) -> list[Path]:
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


@functools.lru_cache(maxsize=None)
def is_json_list(path: Path) -> bool:
    """A JSON list of documents (first non-blank byte '['), else JSON lines, whatever the suffix."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return block.lstrip()[:1] == b"["
    return path.suffix == ".json"


def read_documents(path: Path):
    """(location, raw bytes) per document: 1-based line numbers for JSON lines, indices for a JSON
    list, which is scanned from a memory map so an 11 GB file is never loaded whole."""
    if not is_json_list(path):
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, line
        return
    yield from _json_list_items(path)


# A JSON string, an unterminated quote, or a structural character.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|"|[\[\]{},]', re.S)


def _json_list_items(path: Path):
    """Splits the top-level list at depth-1 commas; each item is parsed later, in a worker.
    A broken structure (not a list, truncated) is reported as a malformed document there."""
    if path.stat().st_size == 0:
        yield 0, ("malformed_json", "empty file (expected a JSON list of documents)")
        return
    not_a_list = ("malformed_json", "the file is not a JSON list of documents")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        depth, start, index = 0, None, 0
        for m in _JSON_TOKEN.finditer(mm):
            c = mm[m.start()]
            if c == ord('"'):
                if m.end() - m.start() == 1:
                    break  # an unterminated string: the file ends inside a document
                if depth == 0:
                    yield index, not_a_list
                    return
            elif depth == 0:
                if c != ord("[") or mm[: m.start()].strip():
                    yield index, not_a_list
                    return
                depth, start = 1, m.end()
            elif c in b"[{":
                depth += 1
            elif depth == 1 and c in b",]":
                item = mm[start : m.start()].strip()
                if item or c == ord(","):
                    yield index, item
                    index += 1
                start = m.end()
                if c == ord("]"):
                    if mm[m.end() :].strip():
                        yield index, ("malformed_json", "unexpected data after the top-level list")
                    return
            elif c in b"]}":
                depth -= 1
        yield index, ("malformed_json", "the file ends inside this document (truncated?)")


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


def run(args) -> dict:
    """Preprocess `args.input` into `args.output_prefix`; returns the summary."""
    settings = Settings(
        image_root=args.image_root, text_field=args.text_field, doc_format=args.format,
        max_num_images=args.max_num_images, image_size=args.image_size, image_storage=args.image_storage,
        jpeg_quality=args.jpeg_quality, jpeg_draft=not args.no_jpeg_draft, max_image_pixels=args.max_image_pixels,
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
    if settings.image_root is not None and not os.path.isdir(settings.image_root):
        raise PreprocessError(f"--image-root {settings.image_root}: not a folder")
    sources = expand_inputs(args.input)
    tokenizer = build_tokenizer(settings.tokenizer_type, settings.tokenizer_model)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = _prepare_parts_dir(prefix, _fingerprint(settings, sources, args.docs_per_part))
    writer_kw = dict(image_token_id=tokenizer.image_token_id, image_size=settings.image_size,
                     image_storage=settings.image_storage,
                     token_dtype=fmt.token_dtype_for(max(tokenizer.vocab_size, tokenizer.image_token_id)))

    start = time.perf_counter()
    parts, counts = _write_parts(args, settings, tokenizer, sources, parts_dir, writer_kw)
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
        "image_token_id": tokenizer.image_token_id, "workers": args.workers, "parts": len(parts),
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


def _write_parts(args, settings: Settings, tokenizer, sources: list[Path], parts_dir: Path,
                 writer_kw: dict) -> tuple[list[str], Counter]:
    """Process every part not finished yet; returns all part names in order and this run's counts."""
    from tqdm import tqdm

    executor = None
    if args.workers > 1:
        executor = cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=init_worker, initargs=(settings, tokenizer))
    init_worker(settings, tokenizer)
    bar = tqdm(total=_count_jsonl_docs(sources), unit="doc", dynamic_ncols=True, disable=args.no_progress,
               smoothing=0.1)
    start = time.perf_counter()
    parts, counts, writer, part_stats, part_errors = [], Counter(docs=0, images=0, reused=0), None, None, None
    try:
        stream = _task_stream(sources, parts_dir, args.docs_per_part, settings)
        for kind, value in _ordered(stream, executor, window=4 * args.workers):
            if kind == "part":
                writer = fmt.IndexedDatasetWriter(parts_dir / value["name"], **writer_kw)
                part_stats, part_errors = _new_stats(), []
            elif kind == "results":
                for r in value:
                    _consume(r, writer, part_stats, part_errors, sources, args.on_error)
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
        where = {"index": r["loc"]} if is_json_list(src) else {"line": r["loc"]}
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


def _count_jsonl_docs(sources: list[Path]) -> int | None:
    """Documents in the input when it is all JSONL (a cheap line count), for the progress bar's ETA."""
    if any(is_json_list(p) for p in sources):
        return None
    n = 0
    for p in sources:
        with open(p, "rb") as f:
            n += sum(1 for line in f if line.strip())
    return n


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", nargs="+", metavar="PATH", help="JSON (a list) / JSONL files, or folders of them")
    io_.add_argument("--output-prefix", required=True, help="writes PREFIX.idx, .tokens.bin, .images.bin, "
                                                            ".errors.jsonl, .summary.json")
    io_.add_argument("--image-root", default=None,
                     help="folder the image paths are relative to (default: each input file's folder)")
    io_.add_argument("--format", choices=["auto", "obelics", "mmc4"], default="auto",
                     help="document format (default: detected per document)")
    io_.add_argument("--text-field", choices=["texts", "text_ocr_list"], default="texts")
    io_.add_argument("--merge", nargs="+", metavar="PREFIX",
                     help="instead of preprocessing, concatenate these datasets into --output-prefix")
    doc = p.add_argument_group("documents and images")
    doc.add_argument("--max-num-images", type=int, default=12, help="keep the first N images per document")
    doc.add_argument("--image-size", type=int, default=336)
    doc.add_argument("--image-storage", choices=["jpeg", "raw"], default="jpeg")
    doc.add_argument("--jpeg-quality", type=int, default=95)
    doc.add_argument("--no-jpeg-draft", action="store_true",
                     help="decode large JPEGs at full size (slower; differs by about one grey level)")
    doc.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="larger images are rejected as decompression bombs")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default="sentencepiece")
    tok.add_argument("--tokenizer-model", help="SentencePiece .model file or Hugging Face tokenizer folder")
    run_ = p.add_argument_group("running")
    run_.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    run_.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                      help="skip bad documents (listed in PREFIX.errors.jsonl) or stop at the first")
    run_.add_argument("--docs-per-part", type=int, default=10000,
                      help="documents per resumable part (an interrupted run redoes at most one part)")
    run_.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.merge:
            ds = fmt.merge(args.merge, args.output_prefix)
            print(json.dumps({"output_prefix": args.output_prefix, "documents": ds.num_documents,
                              "images": ds.num_images, "tokens": ds.num_tokens}))
            return 0
        if not args.input or not args.tokenizer_model:
            raise PreprocessError("--input and --tokenizer-model are required (or use --merge)")
        if args.max_num_images < 1 or args.workers < 1 or args.docs_per_part < 1:
            raise PreprocessError("--max-num-images, --workers and --docs-per-part must be at least 1")
        if not 1 <= args.jpeg_quality <= 100:
            raise PreprocessError("--jpeg-quality must be in 1..100")
        summary = run(args)
    except (PreprocessError, fmt.FormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
