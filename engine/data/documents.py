"""Interleaved image-text documents as corpora ship them (OBELICS / Multimodal Textbook, MMC4) ->
text segments and image references, the input of `encode_document` (engine/data/tokenizer.py).

Parsing lives here, apart from the preprocessing pipeline (engine/data/preprocess.py), so that
what a document means is decided in one place and can be tested without running a job. Every
rejection is a `DocumentError` whose `kind` groups the summary and whose message names the field
and position; `document_location` adds the file's line (JSON lines) or index (a JSON list).

- OBELICS: ``images`` and ``texts`` (or ``text_ocr_list``) lists of equal length with exactly one
  non-null entry per position; an optional ``valid_image`` list of booleans drops images.
  ``images[i]`` is a path relative to the image root, or a URL, which names the file
  ``sha256(url)`` (hex) in the root, as the seed's data loaders name downloaded images.
- MMC4: ``text_list``, ``image_info`` (``image_name``, else ``sha256(image_url or raw_url)``),
  ``similarity_matrix`` [images x sentences], optional ``valid_image_ids``. Each image goes before
  the sentence that maximum-weight matching (scipy ``linear_sum_assignment``) gives it; with more
  images than sentences the unmatched images are dropped.

docs/data_format.md describes the accepted documents and the rejection kinds for users.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import re
from pathlib import Path

import numpy as np

from engine.errors import DocumentError

Segments = list[str | None]  # text segments, None where an image goes


# ------------------------------------------------------------------------------ records


def parse_document(payload: bytes | tuple[str, str], doc_format: str, text_field: str) -> tuple[Segments, list[str]]:
    """One raw document as `read_documents` yields it (JSON bytes, or a (kind, reason) the reader
    already found wrong) -> (segments, image references in order). `doc_format`: "auto" (detected
    per document), "obelics" or "mmc4"."""
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
    kind = detect_format(rec, doc_format)
    segments, refs = mmc4_segments(rec) if kind == "mmc4" else obelics_segments(rec, text_field)
    if not refs and not any(segments):
        raise DocumentError("empty_document", "the document has no image and no text")
    return segments, refs


def detect_format(rec: dict, forced: str) -> str:
    if forced != "auto":
        return forced
    if "text_list" in rec or "image_info" in rec:
        return "mmc4"
    if "images" in rec:
        return "obelics"
    raise DocumentError("unknown_format", "neither OBELICS fields ('images', 'texts') nor MMC4 fields "
                                          "('text_list', 'image_info') are present")


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


def obelics_segments(rec: dict, text_field: str) -> tuple[Segments, list[str]]:
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


def mmc4_segments(rec: dict) -> tuple[Segments, list[str]]:
    """(segments with None at each matched image, image references in order)."""
    sentences, info = _list_field(rec, "text_list"), _list_field(rec, "image_info")
    for j, s in enumerate(sentences):
        _check_text(s, f"text_list[{j}]")
    if not sentences and not info:
        raise DocumentError("empty_document", "the document is empty ('text_list' and 'image_info' are empty)")
    ids = rec.get("valid_image_ids", list(range(len(info))))
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(info) for i in ids):
        raise DocumentError("bad_field", f"'valid_image_ids' must list indices into the {len(info)} images")
    refs = [_mmc4_image_ref(info, i) for i in ids]
    by_sentence = _match_images(rec, refs, ids, len(info), len(sentences)) if refs and sentences else {}
    segments, ordered = [], []
    for j, s in enumerate(sentences):
        if j in by_sentence:
            segments.append(None)
            ordered.append(by_sentence[j])
        segments.append(s)
    return segments, ordered


def _mmc4_image_ref(info: list, i: int) -> str:
    entry = info[i]
    if not isinstance(entry, dict):
        raise DocumentError("bad_field", f"image_info[{i}] must be an object")
    name = entry.get("image_name")
    url = entry.get("image_url") or entry.get("raw_url")
    if isinstance(name, str) and name:
        return name
    if isinstance(url, str) and url:
        return url_file_name(url)
    raise DocumentError("bad_field", f"image_info[{i}] has no 'image_name', 'image_url' or 'raw_url'")


def _match_images(rec: dict, refs: list[str], ids: list[int], n_images: int, n_sentences: int) -> dict[int, str]:
    """{sentence index: image reference} by maximum total similarity, one image per sentence."""
    from scipy.optimize import linear_sum_assignment

    try:
        sim = np.asarray(rec.get("similarity_matrix"), dtype=np.float64)
    except (TypeError, ValueError):
        raise DocumentError("bad_field", "'similarity_matrix' must be a numeric [images][sentences] list")
    if sim.shape != (n_images, n_sentences):
        raise DocumentError("bad_field", f"'similarity_matrix' has shape {sim.shape}, expected "
                                         f"({n_images}, {n_sentences}) = (images, sentences)")
    if not np.isfinite(sim).all():  # JSON parsers accept NaN and Infinity; the matching cannot
        raise DocumentError("bad_field", "'similarity_matrix' holds NaN or infinite values")
    rows, cols = linear_sum_assignment(sim[ids], maximize=True)
    return {int(c): refs[r] for r, c in zip(rows, cols)}


def keep_first_images(segments: Segments, refs: list[str], n: int) -> tuple[Segments, list[str]]:
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


# ------------------------------------------------------------------------------ image files


def url_file_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def resolve_image(ref: str, root: str) -> str:
    """The file of image reference `ref`; refuses anything that resolves outside `root`
    (``..``, absolute paths, symlinks)."""
    if "://" in ref:
        ref = url_file_name(ref)
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


# ------------------------------------------------------------------------------ files of documents


@functools.lru_cache(maxsize=None)
def is_json_list(path: Path) -> bool:
    """A JSON list of documents (first non-blank byte '['), else JSON lines, whatever the suffix."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return block.lstrip()[:1] == b"["
    return path.suffix == ".json"


def document_location(path: Path, loc: int) -> dict:
    """Where `read_documents` found a document: {"line": n} (1-based, JSON lines) or {"index": i}
    (0-based, a JSON list)."""
    return {"index": loc} if is_json_list(path) else {"line": loc}


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
