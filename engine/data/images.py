"""Image preprocessing: file -> CLIP-ready 336x336 RGB (stored), and uint8 -> normalised float.

What LLaVA-1.5 does with `image_aspect_ratio=pad` and CLIP's image processor, in order:
1. pad the image to a square with CLIP's mean colour, int(255 * mean) = (122, 116, 104), the
   original centred;
2. resize the shortest side to 336 with bicubic filtering (the padded image is square, so this
   is a resize to 336x336);
3. centre-crop 336x336 (a no-op after padding);
4. scale to [0, 1] and normalise with CLIP's mean/std (`normalize`). The dataset stores the uint8
   result of steps 1-3 and serves it as stored; training normalises once, on the device
   (`engine.data.loader.to_device`).

Before that, a file is made into a plain 8-bit RGB picture:
- large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, PIL's `draft`) that still
  leaves the padded square at least 336 pixels wide, then resized exactly as above; this makes
  decoding a 720p/1080p photo several times faster and changes pixels by about one grey level;
- the EXIF orientation is applied, so the picture is upright as a viewer shows it;
- CMYK, YCbCr, palette, grayscale, 1-bit and 16-bit images are converted to RGB; 16-bit values
  keep their top 8 bits;
- transparency is composited onto white (how a web page shows a transparent picture), never
  simply dropped (dropping it shows whatever colour the invisible pixels happen to hold);
- 32-bit float images are rejected (no agreed range), as are images above `max_pixels`
  (a decompression bomb: a small file that expands to gigabytes).
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from engine.config import CLIP_MEAN, CLIP_STD
from engine.errors import ImageError

PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)  # as LLaVA's expand2square: (122, 116, 104)
ALPHA_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's default guard (~89.5 MP)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_TO_RGB_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P", "RGBX"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(path: str | os.PathLike, *, size: int = 336, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: bool = True) -> Image.Image:
    """Open, decode (at a reduced JPEG scale where `draft`), orient and convert to RGB."""
    try:  # Only regular files: opening a FIFO or a device for reading can block forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError("unreadable_image", f"not a regular file: {path}")
    except FileNotFoundError:
        raise ImageError("missing_image", f"image file not found: {path}") from None
    except (OSError, ValueError) as e:  # a symlink loop, no permission, a NUL in the name, ...
        raise ImageError("unreadable_image", f"cannot open image file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        with warnings.catch_warnings():
            # Our own `max_pixels` check below replaces PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise ImageError("missing_image", f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", f"decompression bomb: {path}: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("unreadable_image", f"not a readable image file (unknown format): {path}") from None
    except OSError as e:  # a directory, no permission, ...
        raise ImageError("unreadable_image", f"cannot open image file {path}: {e.strerror or e}") from None
    except (SyntaxError, ValueError, EOFError) as e:  # a damaged header, a text chunk inflating past PIL's limit
        raise ImageError("corrupt_image", f"truncated or corrupt image {path}: {e}") from None
    try:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError("decompression_bomb", f"decompression bomb: {path} is {w}x{h} = {w * h} pixels, "
                                                   f"above the limit of {max_pixels}")
        if w == 0 or h == 0:
            raise ImageError("corrupt_image", f"image has zero size: {path}")
        if draft and img.format == "JPEG":
            # The padded square is max(w, h) wide and becomes `size`: ask for at least that.
            scale = size / max(w, h)
            if scale < 0.5:
                img.draft(img.mode, (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
        img.load()  # decodes, and closes the file of a single-frame image
        ImageOps.exif_transpose(img, in_place=True)
        rgb = to_rgb(img, where=str(path))
        if rgb is not img:
            img.close()
        return rgb
    except ImageError:
        img.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        img.close()
        raise ImageError("corrupt_image", f"truncated or corrupt image {path}: {e}") from None


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Any supported mode -> 8-bit RGB (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img)
        if mode == "I" and arr.max(initial=0) <= 255:  # an 8-bit image stored in 32-bit ints
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            arr8 = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in _TO_RGB_MODES:
        return img.convert("RGB")
    raise ImageError("unsupported_mode", f"unsupported image mode {mode!r} in {where}")


def expand_to_square(img: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad to a square with `color`, the picture centred (LLaVA's `image_aspect_ratio=pad`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize_and_crop(img: Image.Image, size: int = 336) -> Image.Image:
    """CLIP's image processor: shortest side to `size` (bicubic), then a centred `size` crop."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def preprocess(img: Image.Image, size: int = 336, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An RGB PIL image -> uint8 [size, size, 3]: pad to square, resize, centre crop.

    The padded square is max(w, h)^2 pixels: a 1 x 60000 strip (a 200-byte PNG, far below any
    pixel limit) would need 10 GB. When the square would exceed `max_pixels`, the picture is first
    shrunk by an integer factor (box filter) to a long side of about 4 x `size`; every other image
    takes the exact CLIP path."""
    img = to_rgb(img)
    side = max(img.size)
    if side * side > max_pixels:
        img = img.reduce(-(-side // (4 * size)))
    return np.asarray(resize_and_crop(expand_to_square(img), size))


def preprocess_file(path: str | os.PathLike, *, size: int = 336, max_pixels: int = DEFAULT_MAX_PIXELS,
                    draft: bool = True) -> np.ndarray:
    """An image file -> uint8 [size, size, 3], ready to store."""
    return preprocess(load_image(path, size=size, max_pixels=max_pixels, draft=draft), size, max_pixels)


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """Stored form of a preprocessed image. 4:4:4 chroma: colour edges survive at 336 px."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


_CLIP_STATS: dict = {}  # device -> (mean, std), float32 [3, 1, 1]


def _clip_stats(device):
    """CLIP mean/std on `device`, copied there once: a copy from pageable host memory on every
    micro-batch would block the host until the GPU drained its queue (one stall per micro-batch)."""
    import torch

    if device not in _CLIP_STATS:
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
        _CLIP_STATS[device] = (mean.to(device), std.to(device))
    return _CLIP_STATS[device]


def normalize(images):
    """uint8 [..., H, W, 3] (numpy or torch, on any device) -> float32 [..., 3, H, W]: x/255,
    minus CLIP mean, over CLIP std, in float32 in that order. The one implementation of step 4:
    training calls it in `engine.data.loader.to_device`, inference on its own images.

    The work is done in place on the channels-first result (several times faster than
    broadcasting over interleaved channels); a numpy array goes through the same torch code."""
    import torch

    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
            raise ValueError(f"normalize expects uint8 [..., H, W, 3], got {images.dtype} {images.shape}")
        # torch wraps only writable arrays (a PIL image's array is read-only): copy such a one
        return normalize(torch.from_numpy(np.require(images, requirements=("C", "W")))).numpy()
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 [..., H, W, 3], got {images.dtype} {tuple(images.shape)}")
    *lead, h, w, _ = images.shape
    pixels = images.reshape(-1, h, w, 3)
    out = torch.empty((pixels.shape[0], 3, h, w), dtype=torch.float32, device=images.device)
    out.copy_(pixels.permute(0, 3, 1, 2))
    mean, std = _clip_stats(out.device)
    return out.mul_(1 / 255).sub_(mean).div_(std).view(*lead, 3, h, w)
