"""Truncated, extended and bit-flipped ``.idx`` / ``.tokens.bin`` / ``.images.bin`` files.

Property: after any damage to any of the three files, the reader either raises FormatError when
the dataset is opened, or every read -- a document's tokens whole or in part, an image's bytes,
a decoded image, the index arrays -- returns exactly the original data or raises FormatError
(naming the file). Never different data without an error.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.format import HEADER_SIZE, FormatError, IndexedDataset, IndexedDatasetWriter, dataset_paths
from engine.data.images import encode_jpeg, preprocess
from engine.data.tokenizer import SentencePieceTokenizer, encode_document
from faultlib import examples, photo
from helpers import tokenizer_path

SIZE = 24
TEXTS = ["A cat sits on the mat.", "Coffee is a mixture of water and oils.", "The rocket lifts off.",
         "Notice the craters on the Moon.", "Light enters through the lens."]
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "camera"]
INDEX_ARRAYS = ["doc_token_offsets", "doc_image_offsets", "image_positions", "image_byte_offsets",
                "doc_token_crc32", "image_crc32"]


def _write(prefix: Path, storage: str) -> None:
    tok = SentencePieceTokenizer(tokenizer_path())
    pixels = [preprocess(photo(name), SIZE) for name in PHOTOS]
    # Documents of 0-3 images and 1-3 passages; one of text only.
    layouts = [[None, 0, 1], [2, None, 0, None], [0], [1, None, 2, 3, None, 4], [3, None, None, 0]]
    with IndexedDatasetWriter(prefix, image_token_id=tok.image_token_id, image_size=SIZE,
                              image_storage=storage) as w:
        for layout in layouts:
            segments = [TEXTS[k] if k is not None else None for k in layout]
            images = [pixels[k] for k in range(len(PHOTOS))][: segments.count(None)]
            stored = [encode_jpeg(p) if storage == "jpeg" else p.tobytes() for p in images]
            w.add_document(encode_document(tok, segments), stored)


class Original(dict):
    """What was written; a short repr, because hypothesis prints its arguments on failure."""

    def __repr__(self) -> str:
        return f"<dataset {self['prefix']}>"


@pytest.fixture(scope="module", params=["jpeg", "raw"])
def original(request, tmp_path_factory):
    prefix = tmp_path_factory.mktemp(request.param) / "ds"
    _write(prefix, request.param)
    ds = IndexedDataset(prefix)
    ds.verify()
    return Original({
        "prefix": prefix,
        "files": [p.read_bytes() for p in dataset_paths(prefix)],
        "tokens": [np.array(ds.tokens(d)) for d in range(len(ds))],
        "image_bytes": [bytes(ds.image_bytes(i)) for i in range(ds.num_images)],
        "images": [ds.image(i) for i in range(ds.num_images)],
        "arrays": {name: np.array(getattr(ds, name)) for name in INDEX_ARRAYS},
        "meta": _meta(ds),
    })


def _meta(ds: IndexedDataset) -> tuple:
    return (ds.num_documents, ds.num_images, ds.num_tokens, ds.image_token_id, ds.image_size, ds.image_storage,
            ds.token_dtype)


@st.composite
def damage(draw, sizes: list[int]):
    """(file index, kind, arguments): truncate, append, flip bits, overwrite, cut out a run."""
    which = draw(st.sampled_from([0, 0, 1, 2]))  # the index, whose every byte matters, twice as often
    n = sizes[which]
    kind = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "overwrite", "cut"]))
    if which == 0 and draw(st.booleans()):
        at = draw(st.integers(0, HEADER_SIZE - 1))  # the header
    else:
        at = draw(st.integers(0, n - 1))
    if kind == "flip":
        bits = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
        extra = draw(st.lists(st.integers(0, n - 1), min_size=len(bits) - 1, max_size=len(bits) - 1))
        return which, kind, list(zip([at] + extra, bits))
    if kind == "append":
        return which, kind, draw(st.binary(min_size=1, max_size=16))
    if kind == "overwrite":
        return which, kind, (at, draw(st.binary(min_size=1, max_size=16)))
    if kind == "cut":
        return which, kind, (at, draw(st.integers(1, 16)))
    return which, kind, at


def _apply(data: bytes, kind: str, args) -> bytes:
    out = bytearray(data)
    if kind == "flip":
        for at, bit in args:
            out[at] ^= 1 << bit
    elif kind == "truncate":
        del out[args:]
    elif kind == "append":
        out += args
    elif kind == "overwrite":
        at, run = args
        out[at : at + len(run)] = run
    elif kind == "cut":
        at, length = args
        del out[at : at + length]
    return bytes(out)


def _read_all_or_raise(prefix: Path, orig: dict) -> int:
    """Every read returns the original data or raises FormatError; returns the number of reads
    that raised (0 when the damage touched nothing the reader uses)."""
    try:
        ds = IndexedDataset(prefix)
    except FormatError as e:
        assert any(p.name in str(e) for p in dataset_paths(prefix)), str(e)
        return 1
    # Opened: everything the header and index say must be what was written.
    assert _meta(ds) == orig["meta"]
    for name in INDEX_ARRAYS:
        np.testing.assert_array_equal(getattr(ds, name), orig["arrays"][name])
    failures = 0
    for d, want in enumerate(orig["tokens"]):
        n = len(want)
        # Partial reads first (a packed sample reads parts of documents), then the whole.
        for start, end in [(1, max(1, n // 2)), (n // 3, n), (0, n)]:
            try:
                got = np.array(ds.tokens(d, start, end))
            except FormatError as e:
                assert "tokens.bin" in str(e) and f"document {d}" in str(e), str(e)
                failures += 1
                continue
            np.testing.assert_array_equal(got, want[start:end], err_msg=f"document {d} [{start}, {end}) changed silently")
    for i, (want_bytes, want_pixels) in enumerate(zip(orig["image_bytes"], orig["images"])):
        try:
            assert bytes(ds.image_bytes(i)) == want_bytes, f"image {i} bytes changed silently"
            np.testing.assert_array_equal(ds.image(i), want_pixels, err_msg=f"image {i} changed silently")
        except FormatError as e:
            assert "images.bin" in str(e) and f"image {i}" in str(e), str(e)
            failures += 1
    try:
        ds.verify()
        assert failures == 0, "verify() passed a dataset some reads of which failed"
    except FormatError:
        assert failures > 0, "verify() failed a dataset every read of which returned the original data"
    return failures


@settings(max_examples=examples(400))
@given(data=st.data())
def test_damaged_files_raise_or_read_back_exactly(original, data):
    which, kind, args = data.draw(damage([len(b) for b in original["files"]]))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "ds"
        for path, content, k in zip(dataset_paths(prefix), original["files"], range(3)):
            path.write_bytes(_apply(content, kind, args) if k == which else content)
        _read_all_or_raise(prefix, original)


def test_every_single_bit_of_the_index(original, tmp_path):
    """Exhaustively, not by sampling: each of the .idx file's bits flipped on its own is caught at
    open (or, in the unused tail of the header, changes nothing)."""
    idx = original["files"][0]
    for path, content in zip(dataset_paths(tmp_path / "ds"), original["files"]):
        path.write_bytes(content)
    path = dataset_paths(tmp_path / "ds")[0]
    harmless = 0
    with open(path, "r+b") as f:
        for at in range(len(idx)):
            for bit in range(8):
                f.seek(at)
                f.write(bytes([idx[at] ^ (1 << bit)]))
                f.flush()
                try:
                    IndexedDataset(tmp_path / "ds")
                    assert 68 <= at < HEADER_SIZE, f"flip of bit {bit} of byte {at} opened without an error"
                    harmless += 1
                except FormatError:
                    pass
            f.seek(at)
            f.write(bytes([idx[at]]))
    assert harmless == 8 * (HEADER_SIZE - 68)
    _read_all_or_raise(tmp_path / "ds", original)  # put back: reads as the original


def test_a_missing_file_is_named(original, tmp_path):
    for k, name in enumerate(["idx", "tokens.bin", "images.bin"]):
        paths = dataset_paths(tmp_path / f"m{k}")
        for j, (path, content) in enumerate(zip(paths, original["files"])):
            if j != k:
                path.write_bytes(content)
        with pytest.raises(FormatError, match=rf"m{k}\.{name}: missing"):
            IndexedDataset(tmp_path / f"m{k}")

