"""Image files of every mode, size and corruption -> a CLIP-ready picture or an ImageError.

`engine.data.images.preprocess_file` is what the preprocessing tool calls on every image, so
"never a crash" here means: it returns uint8 [size, size, 3], or raises ImageError whose `kind`
is one the tool reports. Real photographs (scikit-image's samples) are encoded in every format
and mode Pillow writes, then truncated, bit-flipped, overwritten and spliced by hypothesis.
Decompression bombs (claimed sizes, padding to a square, inflating text chunks) are refused or
converted without the memory they ask for.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.data.images import PAD_COLOR, ImageError, load_image, preprocess_file
from faultlib import encoded, examples, hang_guard, photo

REPO = Path(__file__).resolve().parents[2]
KINDS = {"corrupt_image", "unreadable_image", "decompression_bomb", "unsupported_mode"}
SIZE = 32  # output size for the fuzzing tests: decoding dominates, not resizing

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa",
         "I;16", "I;16B", "I;16L", "I;16N"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "JPEG2000", "QOI", "PCX", "SGI",
           "SPIDER", "XBM", "DDS", "AVIF", "ICNS", "DIB"]  # (IM: deprecated by Pillow)
LOSSLESS = {"PNG", "BMP", "TIFF", "PPM", "TGA", "QOI", "PCX", "SGI", "DIB"}  # RGB kept as is (ICO/ICNS resize)


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # through 16-bit values, not Pillow's 8-bit copy
        return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).convert(mode)
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        with_alpha = img.convert("RGBA")
        with_alpha.putalpha(Image.linear_gradient("L").resize(img.size))  # every alpha from 0 to 255
        return with_alpha.convert(mode)
    return img.convert(mode)


def _zoo() -> list[tuple[str, str, bytes]]:
    """(mode, format, file bytes) for every pair Pillow can write."""
    base = photo("chelsea", (45, 30))
    out = []
    for mode in MODES:
        img = _convert(base, mode)
        for fmt in FORMATS:
            try:
                out.append((mode, fmt, encoded(img, fmt)))
            except (OSError, KeyError, ValueError, TypeError):
                continue  # Pillow cannot write this mode in this format
    return out


ZOO = _zoo()


def _expected_rgb(path: Path) -> np.ndarray | None:
    """The 8-bit RGB picture the spec (images.py docstring) gives for a file, computed with numpy
    from the decoded values; None where the spec delegates to Pillow's own conversion."""
    with Image.open(path) as im:
        im.load()
        mode, arr = im.mode, np.asarray(im)
        if mode == "P" and "transparency" not in im.info:
            pal = np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)
            return pal[arr]
        if mode == "P":
            return None
    if mode == "RGB":
        return arr
    if mode in ("L", "1"):
        return np.repeat((arr.astype(np.uint8) * (255 if mode == "1" else 1))[..., None], 3, axis=-1)
    if mode.startswith("I;16") or mode == "I":
        gray = arr if (mode == "I" and arr.max() <= 255) else np.clip(arr, 0, 65535).astype(np.uint32) >> 8
        return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA"):
        color = arr[..., :3] if mode == "RGBA" else np.repeat(arr[..., :1], 3, axis=-1)
        alpha = arr[..., -1:].astype(np.float64) / 255
        return np.round(color * alpha + 255 * (1 - alpha)).astype(np.uint8)  # over white
    return None


@pytest.mark.parametrize("mode,fmt,data", ZOO, ids=[f"{m}-{f}" for m, f, _ in ZOO])
def test_mode_zoo(mode, fmt, data, tmp_path):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    with Image.open(path) as im:
        stored_mode = im.mode
    if stored_mode == "F":  # 32-bit float pixels have no agreed range: rejected, by name
        with pytest.raises(ImageError, match="unsupported image mode 'F'") as e:
            preprocess_file(path, size=SIZE)
        assert e.value.kind == "unsupported_mode"
        return
    loaded = np.asarray(load_image(path, size=SIZE))
    assert loaded.dtype == np.uint8 and loaded.ndim == 3 and loaded.shape[2] == 3
    want = _expected_rgb(path)
    if want is not None:
        tolerance = 1 if stored_mode in ("RGBA", "LA") else 0  # Pillow composites in integers
        assert np.abs(loaded.astype(int) - want.astype(int)).max() <= tolerance, (mode, fmt, stored_mode)
    if fmt in LOSSLESS and stored_mode in ("RGB", "P") and mode == "RGB":
        np.testing.assert_array_equal(loaded, np.asarray(photo("chelsea", (45, 30))))
    out = preprocess_file(path, size=SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_and_multipage_files_use_the_first_frame(fmt, tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in [(220, 20, 20), (20, 220, 20), (20, 20, 220)]]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    out = preprocess_file(path, size=SIZE)
    assert np.abs(out[4:-4, 4:-4].astype(int) - (220, 20, 20)).max() <= 2  # the first frame, red


@pytest.mark.parametrize("orientation", [0, 1, 5, 8, 9, 255, 65535])
def test_any_exif_orientation_value(orientation, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    photo("chelsea", (45, 30)).save(path, quality=95, exif=exif.tobytes())
    out = np.asarray(load_image(path))
    # 5 and 8 turn the picture a quarter; invalid values leave it as stored
    assert out.shape == ((45, 30, 3) if orientation in (5, 8) else (30, 45, 3))


# ------------------------------------------------------------------------------ corruption fuzzing


def _sources() -> dict[str, bytes]:
    cat, rocket = photo("chelsea", (96, 64)), photo("rocket", (80, 45))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": encoded(cat, "JPEG", quality=90),
        "jpeg_progressive": encoded(rocket, "JPEG", quality=85, progressive=True),
        "jpeg_gray_exif": encoded(cat.convert("L"), "JPEG", quality=80, exif=exif.tobytes()),
        "jpeg_cmyk": encoded(rocket.convert("CMYK"), "JPEG"),
        "png": encoded(cat, "PNG"),
        "png_rgba": encoded(_convert(rocket, "RGBA"), "PNG"),
        "png_palette": encoded(cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "png_16bit": encoded(_convert(cat, "I;16"), "PNG"),
        "gif": encoded(rocket, "GIF"),
        "webp": encoded(cat, "WEBP", quality=80),
        "tiff_lzw": encoded(rocket, "TIFF", compression="tiff_lzw"),
        "bmp": encoded(cat, "BMP"),
    }


SOURCES = _sources()


@st.composite
def corruption(draw):
    """A source file and 1-3 edits: truncate, flip bits, overwrite or insert a run of bytes."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    data = bytearray(SOURCES[name])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "overwrite", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            for bit_at in draw(st.lists(st.integers(0, 63), min_size=1, max_size=8)):
                data[min(at + bit_at // 8, len(data) - 1)] ^= 1 << (bit_at % 8)
        elif op == "truncate":
            del data[at:]
        elif op == "overwrite":
            run = draw(st.binary(min_size=1, max_size=32) | st.just(b"\xff" * 16) | st.just(b"\0" * 16))
            data[at : at + len(run)] = run
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return name, bytes(data)


@settings(max_examples=examples(600))
@given(case=corruption())
def test_corrupted_photos_are_converted_or_reported(case, tmp_path_factory):
    name, data = case
    path = tmp_path_factory.mktemp("fuzz") / "photo"
    path.write_bytes(data)
    try:
        with hang_guard(30, f"decoding a corrupted {name}"):
            out = preprocess_file(path, size=SIZE, max_pixels=4_000_000)
    except ImageError as e:
        assert e.kind in KINDS, (e.kind, str(e))
        assert str(path) in str(e)  # the message names the file
        return
    finally:
        path.unlink()
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("w,h", [(1, 1), (1, 2), (2, 1), (3, 7), (1, 5000), (5000, 1), (335, 337), (337, 335)])
def test_odd_sizes(w, h, fmt, tmp_path):
    color = (200, 10, 10)
    path = tmp_path / f"odd.{fmt.lower()}"
    Image.new("RGB", (w, h), color).save(path, format=fmt, quality=95)
    out = preprocess_file(path).astype(int)
    assert out.shape == (336, 336, 3)
    tol = 0 if fmt == "PNG" else 6
    if w == h:
        assert np.abs(out - color).max() <= tol
    elif max(w, h) >= 5000:  # a one-pixel line centred on the pad colour
        far = np.r_[0:150, 186:336]
        band = out[:, far] if w < h else out[far, :]
        assert np.abs(band - PAD_COLOR).max() <= tol
        centre = out[:, 160:176] if w < h else out[160:176, :]
        assert (centre[..., 0] > PAD_COLOR[0]).any()  # the line still shows
    else:  # the middle of the picture (not of the padded square) keeps its colour
        side = max(w, h)
        x = ((side - w) // 2 + w / 2) * 336 / side
        y = ((side - h) // 2 + h / 2) * 336 / side
        assert np.abs(out[int(y), int(x)] - color).max() <= tol + 8


# ------------------------------------------------------------------------------ decompression bombs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _claiming(fmt: str, w: int, h: int) -> bytes:
    """A small valid file of `fmt` whose header claims w x h pixels."""
    small = photo("chelsea", (16, 8))
    data = bytearray(encoded(small, fmt))
    if fmt == "PNG":
        ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
        return bytes(data[:8]) + _png_chunk(b"IHDR", ihdr) + bytes(data[33:])
    if fmt == "JPEG":
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
        return bytes(data)
    if fmt == "GIF":
        data[6:10] = struct.pack("<HH", w, h)  # the logical screen
        data[data.index(b"\x2c") + 5 : data.index(b"\x2c") + 9] = struct.pack("<HH", w, h)  # the frame
        return bytes(data)
    if fmt == "BMP":
        data[18:26] = struct.pack("<ii", w, h)
        return bytes(data)
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_claimed_huge_sizes_are_refused_before_decoding(fmt, tmp_path):
    path = tmp_path / f"bomb.{fmt.lower()}"
    path.write_bytes(_claiming(fmt, 60_000, 60_000))  # 3.6 G pixels, 10.8 GB as RGB
    assert path.stat().st_size < 10_000
    with hang_guard(10, "refusing a bomb"), pytest.raises(ImageError, match="decompression bomb") as e:
        preprocess_file(path)
    assert e.value.kind == "decompression_bomb"


def test_text_chunk_bomb_is_refused(tmp_path):
    """A PNG whose zTXt chunk inflates to 64 MB (a 64 kB file), before or after the pixels."""
    png = encoded(photo("chelsea", (16, 8)), "PNG")
    ztxt = _png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    end = png.index(b"IEND") - 4
    for where, data in {"before": png[:33] + ztxt + png[33:], "after": png[:end] + ztxt + png[end:]}.items():
        path = tmp_path / f"{where}.png"
        path.write_bytes(data)
        with pytest.raises(ImageError) as e:
            preprocess_file(path)
        assert e.value.kind == "corrupt_image" and "too large" in str(e.value), where


_MEASURE = """
import json, sys
from engine.data.images import preprocess_file
out = preprocess_file(sys.argv[1])
# VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, kept across exec)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"shape": list(out.shape), "peak_mb": peak_kb / 1024}))
"""


@pytest.mark.parametrize("w,h", [(1, 30_000), (30_000, 2)])
def test_padding_a_strip_to_a_square_is_not_a_bomb(w, h, tmp_path):
    """A 1 x 30000 PNG is 200 bytes and 30 k pixels, far below any pixel limit; padded to a
    square it would be 900 M pixels (2.7 GB). It is converted in bounded memory."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (w, h), (200, 10, 10)).save(path)
    assert path.stat().st_size < 1000
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["shape"] == [336, 336, 3]
    assert result["peak_mb"] < 400, result
