"""CLIP image preprocessing on real photographs, in every input mode we accept or reject."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from engine.config import CLIP_MEAN, CLIP_STD
from engine.data.images import (
    PAD_COLOR, ImageError, encode_jpeg, load_image, normalize, preprocess, preprocess_file,
)


@pytest.fixture(scope="module")
def cat():
    return skdata.chelsea()  # 300 x 451 RGB: wider than tall


@pytest.fixture(scope="module")
def coffee():
    return skdata.coffee()  # 400 x 600 RGB


def _pad_reference(arr: np.ndarray) -> np.ndarray:
    """LLaVA's expand2square written directly in numpy: the picture centred on a square of the mean colour."""
    h, w, _ = arr.shape
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = [int(255 * m) for m in CLIP_MEAN]
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = arr
    return out


def test_pad_colour_is_clip_mean():
    assert PAD_COLOR == (122, 116, 104)


def test_matches_hf_clip_processor_on_padded_image(cat):
    """pad -> resize shortest side 336 bicubic -> centre crop -> normalise == CLIPImageProcessor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ref = proc(Image.fromarray(_pad_reference(cat)), return_tensors="np")["pixel_values"][0]
    ours = normalize(preprocess(Image.fromarray(cat)))
    assert ours.shape == ref.shape == (3, 336, 336)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_padding_bands(cat):
    out = preprocess(Image.fromarray(cat))
    assert out.shape == (336, 336, 3) and out.dtype == np.uint8
    # 300x451 -> content 223.5 rows tall in the middle: the top/bottom 50 rows are pure pad colour
    assert (out[:50] == PAD_COLOR).all() and (out[-50:] == PAD_COLOR).all()
    assert not (out[120:200] == PAD_COLOR).all(axis=-1).any()


def test_tall_and_small_images(coffee):
    tall = np.ascontiguousarray(coffee.transpose(1, 0, 2))  # 600 x 400
    out = preprocess(Image.fromarray(tall))
    assert (out[:, :50] == PAD_COLOR).all() and (out[:, -50:] == PAD_COLOR).all()
    small = preprocess(Image.fromarray(coffee[:40, :60]))  # upscaled, still 336
    assert small.shape == (336, 336, 3)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_jpeg_draft_decodes_smaller_and_stays_close(coffee, tmp_path):
    path = _save(Image.fromarray(coffee).resize((1280, 720), Image.BICUBIC), tmp_path / "p720.jpg", quality=92)
    assert load_image(path).size == (640, 360)  # DCT-scaled by 2: the long side stays >= 336
    assert load_image(path, draft=False).size == (1280, 720)
    fast, exact = preprocess_file(path), preprocess_file(path, draft=False)
    diff = np.abs(fast.astype(int) - exact)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 12
    big = _save(Image.fromarray(coffee).resize((3000, 2000), Image.BICUBIC), tmp_path / "big.jpg", quality=90)
    assert load_image(big).size == (375, 250)  # scaled by 8: the largest reduction keeping 336


def test_exif_orientation_is_applied(cat, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(cat), tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    upright = load_image(path)
    assert upright.size == (300, 451)  # width, height after rotation
    ref = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(upright).astype(int) - ref).max() == 0


def test_modes_are_converted(cat, tmp_path):
    rgb = Image.fromarray(cat)
    gray = rgb.convert("L")
    cases = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "gray.png": gray,
        "bilevel.png": gray.convert("1"),
        "gray_alpha.png": Image.merge("LA", (gray, gray.point(lambda v: 255))),
        "ycbcr.jpg": rgb.convert("YCbCr"),
    }
    for name, img in cases.items():
        out = preprocess_file(_save(img, tmp_path / name))
        assert out.shape == (336, 336, 3) and out.dtype == np.uint8, name
    # grayscale stays gray; 16-bit keeps the top 8 bits
    g = preprocess_file(tmp_path / "gray.png")
    assert (g[60:270, :, 0] == g[60:270, :, 1]).all()  # the content rows (the padding is not gray)
    ref = preprocess(gray.convert("RGB"))
    assert np.abs(g.astype(int) - ref).max() <= 1  # the pad colour is not gray, so compare to RGB-of-gray
    sixteen = (np.asarray(gray).astype(np.uint16) << 8) | 0x7F
    out16 = preprocess_file(_save(Image.fromarray(sixteen), tmp_path / "g16.png"))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    np.testing.assert_array_equal(out16, ref)


def test_alpha_is_composited_on_white(cat, tmp_path):
    rgba = np.dstack([cat, np.full(cat.shape[:2], 255, np.uint8)])
    rgba[:, :200, 3] = 0  # the left part fully transparent (its RGB still holds the cat)
    loaded = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert (loaded[:, :200] == 255).all()
    np.testing.assert_array_equal(loaded[:, 200:], cat[:, 200:])
    # a palette image with a transparent index
    p = Image.fromarray(cat).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p.info["transparency"] = 0
    idx0 = np.asarray(p) == 0
    loaded = np.asarray(load_image(_save(p, tmp_path / "t.png", transparency=0)))
    assert idx0.any() and (loaded[idx0] == 255).all()


def test_float_images_are_rejected(tmp_path):
    path = _save(Image.fromarray(np.random.default_rng(0).random((64, 64), np.float32)), tmp_path / "f.tif")
    with pytest.raises(ImageError, match="unsupported image mode 'F'") as e:
        preprocess_file(path)
    assert e.value.kind == "unsupported_mode"


def test_bad_files(cat, tmp_path):
    with pytest.raises(ImageError, match="not found") as e:
        preprocess_file(tmp_path / "nope.jpg")
    assert e.value.kind == "missing_image"

    (tmp_path / "text.jpg").write_text("this is not a picture")
    with pytest.raises(ImageError, match="unknown format") as e:
        preprocess_file(tmp_path / "text.jpg")
    assert e.value.kind == "unreadable_image"

    with pytest.raises(ImageError) as e:
        preprocess_file(tmp_path)  # a folder
    assert e.value.kind == "unreadable_image"

    buf = io.BytesIO()
    Image.fromarray(cat).save(buf, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        preprocess_file(tmp_path / "cut.jpg")
    assert e.value.kind == "corrupt_image"

    buf = io.BytesIO()
    Image.fromarray(cat).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[200:260] = bytes(60)  # zeroes inside the compressed pixel data
    (tmp_path / "bad.png").write_bytes(bytes(raw))
    with pytest.raises(ImageError) as e:
        preprocess_file(tmp_path / "bad.png")
    assert e.value.kind == "corrupt_image"


def test_decompression_bomb(cat, tmp_path):
    path = _save(Image.fromarray(cat), tmp_path / "cat.png")
    with pytest.raises(ImageError, match="decompression bomb.*300 = 135300 pixels") as e:
        preprocess_file(path, max_pixels=100_000)
    assert e.value.kind == "decompression_bomb"
    # a real one: a 12000x12000 1-bit PNG is a few kB on disk and 144 MP in memory
    bomb = _save(Image.new("1", (12000, 12000)), tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match="decompression bomb") as e:
        preprocess_file(bomb)
    assert e.value.kind == "decompression_bomb"


def test_normalize_numpy_and_torch_agree(cat, coffee):
    batch = np.stack([preprocess(Image.fromarray(cat)), preprocess(Image.fromarray(coffee))])
    out = normalize(batch)
    assert out.shape == (2, 3, 336, 336) and out.dtype == np.float32
    px = batch[1, 100, 50].astype(np.float64)
    np.testing.assert_allclose(out[1, :, 100, 50], (px / 255 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)
    t = normalize(torch.from_numpy(batch))
    assert t.shape == (2, 3, 336, 336) and t.dtype == torch.float32 and t.is_contiguous()
    np.testing.assert_allclose(t.numpy(), out, atol=1e-6)
    np.testing.assert_allclose(normalize(batch[0]), out[0])  # one image, no batch dim
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.astype(np.float32))


def test_normalize_is_the_float32_formula_bit_for_bit(cat):
    """x/255, minus mean, over std, each rounded to float32 as numpy does it: for every pixel
    value in every channel, on numpy and torch input, for a batch and for a single image."""
    every_value = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    for pixels in (every_value, preprocess(Image.fromarray(cat))):
        want = (pixels.astype(np.float32) * np.float32(1 / 255) - np.asarray(CLIP_MEAN, np.float32)) \
            / np.asarray(CLIP_STD, np.float32)
        want = want.transpose(2, 0, 1)
        assert np.array_equal(normalize(pixels), want)
        assert np.array_equal(normalize(pixels[None])[0], want)
        assert torch.equal(normalize(torch.tensor(pixels)), torch.from_numpy(want))
    assert normalize(torch.zeros((0, 336, 336, 3), dtype=torch.uint8)).shape == (0, 3, 336, 336)


def test_stored_jpeg_round_trip(coffee):
    pixels = preprocess(Image.fromarray(coffee))
    data = encode_jpeg(pixels, quality=95)
    back = np.asarray(Image.open(io.BytesIO(data)))
    assert back.shape == pixels.shape
    assert np.abs(back.astype(int) - pixels).mean() < 1.5
    assert data == encode_jpeg(pixels, quality=95)  # deterministic bytes
