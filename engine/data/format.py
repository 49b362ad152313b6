"""The on-disk dataset: ``<prefix>.idx`` + ``<prefix>.tokens.bin`` + ``<prefix>.images.bin``.

Writer and reader live side by side so the byte layout is defined in exactly one place;
docs/data_format.md is the prose version of this file.

``.idx`` = a 128-byte header, then six little-endian arrays, each starting on an 8-byte boundary:

    doc_token_offsets   int64  [D+1]  document d = tokens[off[d]:off[d+1]] in .tokens.bin
    doc_image_offsets   int64  [D+1]  images of document d = off[d]..off[d+1]-1
    image_positions     int64  [I]    position of image i's <image> token in its document
    image_byte_offsets  int64  [I+1]  image i = images.bin[off[i]:off[i+1]]
    doc_token_crc32     uint32 [D]    crc32 of each document's token bytes
    image_crc32         uint32 [I]    crc32 of each image's bytes

The header carries a crc32 of itself and one of the whole array region, both checked at open
(the index is small next to the data); per-document and per-image crc32s are checked when a
document or an image is read, so a flipped bit in the data is caught where it is used. A partial
read (a packed sample takes a slice of a long document) checks the whole document the first time
this reader touches it.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import FormatError

MAGIC = b"LLAVAIDX"
VERSION = 1
HEADER_SIZE = 128

# magic, version, header_size, token dtype code, image storage code, 2 reserved bytes,
# num_documents, num_images, num_tokens, images_bytes, image_token_id, image_size,
# arrays_crc32, header_crc32 (crc32 of the header bytes before this field).
_HEADER = struct.Struct("<8sIIBB2xQQQQIIII")
assert _HEADER.size <= HEADER_SIZE

TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
IMAGE_STORAGES = {1: "jpeg", 2: "raw"}
_STORAGE_CODES = {v: k for k, v in IMAGE_STORAGES.items()}
_COPY_CHUNK = 16 << 20


def dataset_paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(idx, tokens.bin, images.bin) of a dataset prefix."""
    p = str(prefix)
    return Path(p + ".idx"), Path(p + ".tokens.bin"), Path(p + ".images.bin")


def token_dtype_for(max_token_id: int) -> np.dtype:
    """The smallest stored dtype that holds every id up to `max_token_id` (the <image> id included)."""
    return TOKEN_DTYPES[1] if max_token_id < 2**16 else TOKEN_DTYPES[2]


def _aligned(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


def _array_layout(num_docs: int, num_images: int) -> list[tuple[str, np.dtype, int]]:
    """(name, dtype, length) of each .idx array, in file order."""
    i64, u32 = np.dtype("<i8"), np.dtype("<u4")
    return [
        ("doc_token_offsets", i64, num_docs + 1),
        ("doc_image_offsets", i64, num_docs + 1),
        ("image_positions", i64, num_images),
        ("image_byte_offsets", i64, num_images + 1),
        ("doc_token_crc32", u32, num_docs),
        ("image_crc32", u32, num_images),
    ]


def _arrays_nbytes(num_docs: int, num_images: int) -> int:
    return sum(_aligned(n * dt.itemsize) for _, dt, n in _array_layout(num_docs, num_images))


# ----------------------------------------------------------------------------------------- reader


class IndexedDataset:
    """Memory-mapped reader. Opening checks sizes and the index crc; nothing is loaded whole.

    ``check_index_crc=False`` skips the crc32 of the index arrays (sizes are still checked); it
    is used when a reader is re-opened in a worker process after the parent already checked it.
    """

    def __init__(self, prefix: str | os.PathLike, *, check_index_crc: bool = True):
        self.prefix = str(prefix)
        self.idx_path, self.tokens_path, self.images_path = dataset_paths(prefix)
        self._check_index_crc = check_index_crc
        self._open()

    # -- opening and checking
    def _open(self) -> None:
        idx = self.idx_path
        for path in (self.idx_path, self.tokens_path, self.images_path):
            if not path.is_file():
                raise FormatError(f"{path}: missing (a dataset is <prefix>.idx, .tokens.bin and .images.bin)")
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            if head[:8] == MAGIC:
                raise FormatError(f"{idx}: truncated header ({size} bytes)")
            raise FormatError(f"{idx}: not a dataset index (bad magic {head[:8]!r}, expected {MAGIC!r})")
        (_, version, header_size, dtype_code, storage_code, num_docs, num_images, num_tokens,
         images_bytes, image_token_id, image_size, arrays_crc, header_crc) = _HEADER.unpack_from(head)
        if version != VERSION:
            raise FormatError(f"{idx}: format version {version}, this reader reads version {VERSION}")
        if header_size != HEADER_SIZE or len(head) < HEADER_SIZE:
            raise FormatError(f"{idx}: truncated or malformed header")
        if zlib.crc32(head[: _HEADER.size - 4]) != header_crc:
            raise FormatError(f"{idx}: header checksum mismatch (the file is corrupt)")
        if dtype_code not in TOKEN_DTYPES or storage_code not in IMAGE_STORAGES:
            raise FormatError(f"{idx}: unknown token dtype code {dtype_code} or image storage code {storage_code}")

        expected = HEADER_SIZE + _arrays_nbytes(num_docs, num_images)
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise FormatError(f"{idx}: {what}: {size} bytes, the header implies {expected}")

        self.num_documents, self.num_images, self.num_tokens = num_docs, num_images, num_tokens
        self.image_token_id, self.image_size = image_token_id, image_size
        self.image_storage = IMAGE_STORAGES[storage_code]
        self.token_dtype = TOKEN_DTYPES[dtype_code]
        self._images_bytes = images_bytes

        region = np.memmap(idx, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=(expected - HEADER_SIZE,))
        if self._check_index_crc and zlib.crc32(region) != arrays_crc:
            raise FormatError(f"{idx}: index checksum mismatch (the file is corrupt)")
        pos = 0
        for name, dt, n in _array_layout(num_docs, num_images):
            setattr(self, name, region[pos : pos + n * dt.itemsize].view(dt))
            pos += _aligned(n * dt.itemsize)

        self._tokens = self._map(self.tokens_path, self.token_dtype, num_tokens)
        self._images = self._map(self.images_path, np.dtype(np.uint8), images_bytes)
        if self.doc_token_offsets[0] != 0 or self.doc_token_offsets[-1] != num_tokens:
            raise FormatError(f"{idx}: document offsets do not span the {num_tokens} tokens of {self.tokens_path}")
        if self.doc_image_offsets[0] != 0 or self.doc_image_offsets[-1] != num_images:
            raise FormatError(f"{idx}: document image offsets do not span the {num_images} images")
        if self.image_byte_offsets[0] != 0 or self.image_byte_offsets[-1] != images_bytes:
            raise FormatError(f"{idx}: image byte offsets do not span the {images_bytes} bytes of {self.images_path}")
        self._doc_lengths = self._doc_image_counts = None
        self._doc_checked = None  # documents whose crc this reader has verified (for partial reads)

    @staticmethod
    def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
        size = path.stat().st_size
        if size != count * dtype.itemsize:
            what = "truncated" if size < count * dtype.itemsize else "has trailing bytes"
            raise FormatError(f"{path}: {what}: {size} bytes, the index says {count * dtype.itemsize}")
        if count == 0:  # numpy cannot map an empty file
            return np.empty(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    # A reader handed to a worker process re-opens its files instead of pickling the maps.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"], check_index_crc=False)

    # -- the API of docs/internals.md
    def __len__(self) -> int:
        return self.num_documents

    @property
    def doc_lengths(self) -> np.ndarray:
        if self._doc_lengths is None:
            self._doc_lengths = np.diff(self.doc_token_offsets)
        return self._doc_lengths

    @property
    def doc_image_counts(self) -> np.ndarray:
        if self._doc_image_counts is None:
            self._doc_image_counts = np.diff(self.doc_image_offsets)
        return self._doc_image_counts

    def tokens(self, doc: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """Tokens [start, end) of document `doc` (a read-only memmap slice).

        Reading a whole document checks its crc32; a partial read checks the whole document's the
        first time this reader reads from it (once, so slices of a long document stay cheap)."""
        doc = self._check_doc(doc)
        lo, hi = int(self.doc_token_offsets[doc]), int(self.doc_token_offsets[doc + 1])
        n = hi - lo
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise IndexError(f"token range [{start}, {end}) outside document {doc} of length {n}")
        out = self._tokens[lo + start : lo + end]
        whole = start == 0 and end == n
        if self._doc_checked is None:
            self._doc_checked = np.zeros(self.num_documents, dtype=bool)  # zero pages cost nothing
        if whole or not self._doc_checked[doc]:
            if zlib.crc32(out if whole else self._tokens[lo:hi]) != int(self.doc_token_crc32[doc]):
                raise FormatError(f"{self.tokens_path}: document {doc} fails its checksum (the file is corrupt)")
            self._doc_checked[doc] = True
        return out

    def doc_images(self, doc: int) -> range:
        """Global image indices of document `doc`, in order of appearance."""
        doc = self._check_doc(doc)
        return range(int(self.doc_image_offsets[doc]), int(self.doc_image_offsets[doc + 1]))

    def image_bytes(self, i: int) -> memoryview:
        """The stored bytes of image `i` (JPEG file or raw HWC pixels); checks its crc32."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"image {i} out of range [0, {self.num_images})")
        data = self._images[int(self.image_byte_offsets[i]) : int(self.image_byte_offsets[i + 1])]
        if zlib.crc32(data) != int(self.image_crc32[i]):
            raise FormatError(f"{self.images_path}: image {i} fails its checksum (the file is corrupt)")
        return memoryview(data)

    def image(self, i: int) -> np.ndarray:
        """Image `i` as uint8 [image_size, image_size, 3] (RGB, already CLIP-preprocessed)."""
        return decode_image(self.image_bytes(i), self.image_storage, self.image_size, where=f"{self.images_path} image {i}")

    def verify(self) -> None:
        """Check everything: offsets, image positions, every document's and image's crc32."""
        where = self.idx_path
        for name in ("doc_token_offsets", "doc_image_offsets", "image_byte_offsets"):
            if np.any(np.diff(getattr(self, name)) < 0):
                raise FormatError(f"{where}: {name} is not non-decreasing")
        for d in range(self.num_documents):
            toks = self.tokens(d)  # checks the crc
            imgs = self.doc_images(d)
            found = np.flatnonzero(toks == self.image_token_id)
            if len(found) != len(imgs) or np.any(found != self.image_positions[imgs.start : imgs.stop]):
                raise FormatError(f"{where}: document {d}: image positions disagree with its <image> tokens")
        for i in range(self.num_images):
            self.image_bytes(i)

    def _check_doc(self, doc: int) -> int:
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range [0, {self.num_documents})")
        return int(doc)

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, {self.num_tokens} tokens, "
                f"{self.num_images} {self.image_storage} images of {self.image_size}px)")


def decode_image(data, storage: str, size: int, where: str = "image") -> np.ndarray:
    """Stored bytes -> uint8 [size, size, 3]."""
    if storage == "raw":
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != size * size * 3:
            raise FormatError(f"{where}: {arr.size} raw bytes, expected {size}x{size}x3")
        return arr.reshape(size, size, 3)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB") if im.mode != "RGB" else im
        arr = np.asarray(im)
    if arr.shape != (size, size, 3):
        raise FormatError(f"{where}: decoded to shape {arr.shape}, expected ({size}, {size}, 3)")
    return arr


# ----------------------------------------------------------------------------------------- writer


class IndexedDatasetWriter:
    """Appends documents, then `finalize()` renames the three files into place.

    Until then everything is written under ``*.tmp`` names, so an interrupted writer leaves
    nothing that opens as a dataset. Used as a context manager it finalizes on success and
    removes its temporary files on an exception.
    """

    def __init__(self, prefix: str | os.PathLike, *, image_token_id: int, image_size: int,
                 image_storage: str = "jpeg", token_dtype: np.dtype | str | None = None):
        if image_storage not in _STORAGE_CODES:
            raise ValueError(f"image_storage must be one of {sorted(_STORAGE_CODES)}, got {image_storage!r}")
        self.prefix = str(prefix)
        self.image_token_id, self.image_size, self.image_storage = int(image_token_id), int(image_size), image_storage
        self.token_dtype = np.dtype(token_dtype) if token_dtype is not None else token_dtype_for(self.image_token_id)
        self.token_dtype = self.token_dtype.newbyteorder("<")
        if self.token_dtype not in TOKEN_DTYPES.values():
            raise ValueError(f"token dtype must be one of {list(TOKEN_DTYPES.values())}, got {self.token_dtype}")
        if self.image_token_id > np.iinfo(self.token_dtype).max:
            raise ValueError(f"image_token_id {self.image_token_id} does not fit token dtype {self.token_dtype}")
        self._final = dataset_paths(prefix)
        self._tmp = tuple(Path(str(p) + ".tmp") for p in self._final)
        self._tmp[0].parent.mkdir(parents=True, exist_ok=True)
        self._tokens_f = open(self._tmp[1], "wb")
        self._images_f = open(self._tmp[2], "wb")
        self._doc_token_offsets = array("q", [0])
        self._doc_image_offsets = array("q", [0])
        self._image_positions = array("q")
        self._image_byte_offsets = array("q", [0])
        self._doc_crc = array("I")
        self._image_crc = array("I")
        self._done = False

    @property
    def num_documents(self) -> int:
        return len(self._doc_crc)

    def add_document(self, tokens: Sequence[int] | np.ndarray, images: Sequence[bytes] = ()) -> None:
        """One document: its token stream (BOS ... EOS, one `image_token_id` per image) and the
        stored bytes of its images in order of appearance (JPEG files, or raw HWC uint8)."""
        self._check_open()
        toks = np.asarray(tokens)
        if toks.ndim != 1 or toks.size == 0:
            raise ValueError(f"a document needs a non-empty 1-D token array, got shape {toks.shape}")
        if toks.min() < 0 or toks.max() > np.iinfo(self.token_dtype).max:
            raise ValueError(f"token ids outside the range of {self.token_dtype}")
        positions = np.flatnonzero(toks == self.image_token_id)
        if len(positions) != len(images):
            raise ValueError(f"document has {len(positions)} <image> tokens but {len(images)} images")
        images = [bytes(img) if not isinstance(img, bytes) else img for img in images]
        for img in images:  # validate everything before writing anything
            self._check_image(img)
        data = toks.astype(self.token_dtype, copy=False).tobytes()
        self._tokens_f.write(data)
        self._doc_crc.append(zlib.crc32(data))
        self._doc_token_offsets.append(self._doc_token_offsets[-1] + toks.size)
        for img in images:
            self._images_f.write(img)
            self._image_byte_offsets.append(self._image_byte_offsets[-1] + len(img))
            self._image_crc.append(zlib.crc32(img))
        self._image_positions.extend(positions.tolist())
        self._doc_image_offsets.append(self._doc_image_offsets[-1] + len(images))

    def append_dataset(self, reader: IndexedDataset) -> None:
        """Copy every document of an existing dataset (same storage and ids) by streaming bytes."""
        self._check_open()
        mine = (self.image_token_id, self.image_size, self.image_storage, self.token_dtype)
        theirs = (reader.image_token_id, reader.image_size, reader.image_storage, reader.token_dtype)
        if mine != theirs:
            raise ValueError(f"{reader.idx_path}: (image_token_id, image_size, image_storage, token dtype) = "
                             f"{theirs}, the output has {mine}")
        for src, dst in ((reader.tokens_path, self._tokens_f), (reader.images_path, self._images_f)):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, dst, _COPY_CHUNK)
        for mine_arr, theirs_arr in ((self._doc_token_offsets, reader.doc_token_offsets),
                                     (self._doc_image_offsets, reader.doc_image_offsets),
                                     (self._image_byte_offsets, reader.image_byte_offsets)):
            mine_arr.frombytes((np.asarray(theirs_arr[1:]) + mine_arr[-1]).astype("<i8").tobytes())
        self._image_positions.frombytes(np.asarray(reader.image_positions).astype("<i8").tobytes())
        self._doc_crc.frombytes(np.asarray(reader.doc_token_crc32).astype("<u4").tobytes())
        self._image_crc.frombytes(np.asarray(reader.image_crc32).astype("<u4").tobytes())

    def finalize(self) -> None:
        """Write the index and move the three files to their final names (the index last)."""
        self._check_open()
        for f in (self._tokens_f, self._images_f):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        num_docs, num_images = self.num_documents, len(self._image_crc)
        arrays = {
            "doc_token_offsets": self._doc_token_offsets, "doc_image_offsets": self._doc_image_offsets,
            "image_positions": self._image_positions, "image_byte_offsets": self._image_byte_offsets,
            "doc_token_crc32": self._doc_crc, "image_crc32": self._image_crc,
        }
        body = io.BytesIO()
        for name, dt, n in _array_layout(num_docs, num_images):
            raw = np.frombuffer(arrays[name], dtype=arrays[name].typecode).astype(dt).tobytes()
            assert len(raw) == n * dt.itemsize, name
            body.write(raw + b"\0" * (_aligned(len(raw)) - len(raw)))
        body = body.getvalue()
        fields = (MAGIC, VERSION, HEADER_SIZE, _code(TOKEN_DTYPES, self.token_dtype), _STORAGE_CODES[self.image_storage],
                  num_docs, num_images, self._doc_token_offsets[-1], self._image_byte_offsets[-1],
                  self.image_token_id, self.image_size, zlib.crc32(body))
        head = _HEADER.pack(*fields, 0)[:-4]
        head = (head + struct.pack("<I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")
        with open(self._tmp[0], "wb") as f:
            f.write(head)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        # Remove an old index first: a crash between the renames must not pair it with new data.
        self._final[0].unlink(missing_ok=True)
        for tmp, final in zip(self._tmp[1:] + self._tmp[:1], self._final[1:] + self._final[:1]):
            os.replace(tmp, final)
        _fsync_dir(self._final[0].parent)
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are never touched."""
        if self._done:
            return
        for f in (self._tokens_f, self._images_f):
            f.close()
        for p in self._tmp:
            p.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")

    def _check_image(self, img: bytes) -> None:
        if self.image_storage == "raw":
            if len(img) != self.image_size * self.image_size * 3:
                raise ValueError(f"raw image has {len(img)} bytes, expected {self.image_size}x{self.image_size}x3")
        elif not img.startswith(b"\xff\xd8"):
            raise ValueError("jpeg storage expects JPEG file bytes (missing the FFD8 start marker)")


def merge(prefixes: Sequence[str | os.PathLike], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (in the given order) into `out_prefix`; returns the opened result."""
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    readers = [IndexedDataset(p) for p in prefixes]
    first = readers[0]
    with IndexedDatasetWriter(out_prefix, image_token_id=first.image_token_id, image_size=first.image_size,
                              image_storage=first.image_storage, token_dtype=first.token_dtype) as w:
        for r in readers:
            w.append_dataset(r)
    return IndexedDataset(out_prefix)


def _code(table: dict, value) -> int:
    return next(k for k, v in table.items() if v == value)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
