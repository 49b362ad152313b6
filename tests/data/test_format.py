"""The binary dataset format: round trip, merge, atomic finalize, and every way a file can be bad."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from engine.data.format import (
    HEADER_SIZE, FormatError, IndexedDataset, IndexedDatasetWriter, dataset_paths, merge,
)

IMG = 32000
SIZE = 48


def _jpeg(photo: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).resize((SIZE, SIZE), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def _docs(photos):
    """Three documents: two images, none, one (the real photos at SIZE x SIZE)."""
    return [
        ([1, 415, IMG, 28705, IMG, 2], [photos[0], photos[1]]),
        ([1, 9, 10, 11, 2], []),
        ([1, IMG, 333, 2], [photos[2]]),
    ]


def _write(prefix, photos, storage="jpeg"):
    with IndexedDatasetWriter(prefix, image_token_id=IMG, image_size=SIZE, image_storage=storage) as w:
        for toks, imgs in _docs(photos):
            if storage == "jpeg":
                stored = [_jpeg(p) for p in imgs]
            else:
                stored = [np.asarray(Image.fromarray(p).resize((SIZE, SIZE), Image.BICUBIC)).tobytes() for p in imgs]
            w.add_document(toks, stored)
    return stored


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_round_trip(tmp_path, photos, storage):
    prefix = tmp_path / "ds"
    _write(prefix, photos, storage)
    ds = IndexedDataset(prefix)
    assert (ds.num_documents, ds.num_images, ds.image_token_id, ds.image_size, ds.image_storage) == (3, 3, IMG, SIZE, storage)
    assert ds.doc_lengths.tolist() == [6, 5, 4]
    assert ds.doc_image_counts.tolist() == [2, 0, 1]
    assert ds.doc_token_offsets.tolist() == [0, 6, 11, 15]
    assert ds.doc_image_offsets.tolist() == [0, 2, 2, 3]
    assert ds.image_positions.tolist() == [2, 4, 1]
    for d, (toks, imgs) in enumerate(_docs(photos)):
        assert ds.tokens(d).tolist() == toks
        assert isinstance(ds.tokens(d), np.memmap)
        for k, i in enumerate(ds.doc_images(d)):
            ref = np.asarray(Image.fromarray(imgs[k]).resize((SIZE, SIZE), Image.BICUBIC)).astype(int)
            got = ds.image(i)
            assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8
            # raw is exact; JPEG q90 stays close to the pixels it was given
            assert np.abs(got.astype(int) - ref).mean() < (0.01 if storage == "raw" else 6)
    assert ds.tokens(0, 2, 5).tolist() == [IMG, 28705, IMG]
    assert ds.token_dtype == np.dtype("<u2")
    ds.verify()
    # A reader sent to a worker process re-opens the files rather than pickling the arrays.
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob).tokens(2).tolist() == [1, IMG, 333, 2]


def test_wide_token_ids_use_int32(tmp_path):
    with IndexedDatasetWriter(tmp_path / "w", image_token_id=128256, image_size=SIZE, image_storage="raw") as w:
        w.add_document([128000, 100000, 128256, 128001], [bytes(SIZE * SIZE * 3)])
    ds = IndexedDataset(tmp_path / "w")
    assert ds.token_dtype == np.dtype("<i4")
    assert ds.tokens(0).tolist() == [128000, 100000, 128256, 128001]


def test_merge_concatenates_in_order(tmp_path, photos):
    _write(tmp_path / "a", photos)
    with IndexedDatasetWriter(tmp_path / "b", image_token_id=IMG, image_size=SIZE) as w:
        w.add_document([1, IMG, 7, 2], [_jpeg(photos[1])])
    a, b = IndexedDataset(tmp_path / "a"), IndexedDataset(tmp_path / "b")
    m = merge([tmp_path / "a", tmp_path / "b", tmp_path / "a"], tmp_path / "m")
    m.verify()
    assert m.num_documents == 7 and m.num_images == 7
    assert [m.tokens(d).tolist() for d in range(7)] == [a.tokens(d).tolist() for d in range(3)] + [
        b.tokens(0).tolist()] + [a.tokens(d).tolist() for d in range(3)]
    assert bytes(m.image_bytes(3)) == bytes(b.image_bytes(0))
    assert bytes(m.image_bytes(6)) == bytes(a.image_bytes(2))
    assert m.image_positions.tolist() == [2, 4, 1, 1, 2, 4, 1]


def test_merge_rejects_incompatible(tmp_path, photos):
    _write(tmp_path / "a", photos)
    _write(tmp_path / "r", photos, storage="raw")
    with pytest.raises(ValueError, match="image_storage"):
        merge([tmp_path / "a", tmp_path / "r"], tmp_path / "m")
    assert not any(tmp_path.glob("m.*")), "a failed merge leaves nothing behind"


def test_unfinished_writer_leaves_no_dataset(tmp_path, photos):
    prefix = tmp_path / "ds"
    w = IndexedDatasetWriter(prefix, image_token_id=IMG, image_size=SIZE)
    w.add_document([1, IMG, 2], [_jpeg(photos[0])])
    assert not any(p.exists() for p in dataset_paths(prefix))
    with pytest.raises(FormatError, match="missing"):
        IndexedDataset(prefix)
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, image_token_id=IMG, image_size=SIZE) as w:
            w.add_document([1, 2])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_inconsistent_documents(tmp_path, photos):
    with IndexedDatasetWriter(tmp_path / "x", image_token_id=IMG, image_size=SIZE) as w:
        with pytest.raises(ValueError, match="1 <image> tokens but 0 images"):
            w.add_document([1, IMG, 2], [])
        with pytest.raises(ValueError, match="FFD8"):
            w.add_document([1, IMG, 2], [b"PNG..."])
        with pytest.raises(ValueError, match="non-empty"):
            w.add_document([], [])
        with pytest.raises(ValueError, match="range"):
            w.add_document([1, 70000, 2], [])
    with IndexedDatasetWriter(tmp_path / "y", image_token_id=IMG, image_size=SIZE, image_storage="raw") as w:
        with pytest.raises(ValueError, match="raw image has"):
            w.add_document([1, IMG, 2], [b"\0" * 10])


@pytest.fixture
def written(tmp_path, photos):
    prefix = tmp_path / "ds"
    _write(prefix, photos)
    return prefix, dataset_paths(prefix)


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_truncated_files_raise(written):
    prefix, (idx, toks, imgs) = written
    for path, cut in ((idx, 40), (idx, HEADER_SIZE + 16), (toks, 3), (imgs, 100)):
        original = path.read_bytes()
        path.write_bytes(original[:-cut])
        with pytest.raises(FormatError, match=f"{path.name}.*truncated"):
            IndexedDataset(prefix)
        path.write_bytes(original)
    IndexedDataset(prefix)
    imgs.write_bytes(imgs.read_bytes() + b"junk")
    with pytest.raises(FormatError, match="trailing bytes"):
        IndexedDataset(prefix)


def test_wrong_magic_and_version_raise(written):
    prefix, (idx, _, _) = written
    original = idx.read_bytes()
    idx.write_bytes(b"NOTANIDX" + original[8:])
    with pytest.raises(FormatError, match=f"{idx}.*bad magic"):
        IndexedDataset(prefix)
    idx.write_bytes(original[:8] + (99).to_bytes(4, "little") + original[12:])
    with pytest.raises(FormatError, match="format version 99"):
        IndexedDataset(prefix)


def test_bit_flips_are_caught(written):
    prefix, (idx, toks, imgs) = written
    _flip(idx, 30)  # inside the header's counts
    with pytest.raises(FormatError, match="header checksum"):
        IndexedDataset(prefix)
    _flip(idx, 30)
    _flip(idx, HEADER_SIZE + 9)  # inside doc_token_offsets
    with pytest.raises(FormatError, match="index checksum"):
        IndexedDataset(prefix)
    _flip(idx, HEADER_SIZE + 9)

    _flip(toks, 2 * 7)  # document 1, token 1
    ds = IndexedDataset(prefix)  # data checksums are checked where the data is read
    assert ds.tokens(0).tolist()[:2] == [1, 415]
    with pytest.raises(FormatError, match="document 1 fails its checksum"):
        ds.tokens(1, 0, 3)  # a partial read checks the whole document (once per reader)
    with pytest.raises(FormatError, match="document 1 fails its checksum"):
        ds.tokens(1)
    with pytest.raises(FormatError, match="document 1"):
        ds.verify()
    _flip(toks, 2 * 7)

    ds = IndexedDataset(prefix)
    start = int(ds.image_byte_offsets[2])
    _flip(imgs, start + 500)
    ds = IndexedDataset(prefix)
    ds.image(0)
    with pytest.raises(FormatError, match="image 2 fails its checksum"):
        ds.image(2)
    with pytest.raises(FormatError, match="image 2"):
        ds.verify()


def test_out_of_range_access(written):
    ds = IndexedDataset(written[0])
    with pytest.raises(IndexError):
        ds.tokens(3)
    with pytest.raises(IndexError):
        ds.tokens(0, 2, 99)
    with pytest.raises(IndexError):
        ds.image(3)
