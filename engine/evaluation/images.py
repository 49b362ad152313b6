"""Opening a benchmark picture, whatever form its reader gave it (a path, encoded bytes from a
parquet export, a PIL image), and telling a usable picture from a missing or broken one.

A question whose picture cannot be opened is not scored and not dropped: the run lists it in its
errors file with this module's reason and counts it beside the score.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from engine.data.images import ImageError, load_image, to_rgb


def open_image(image) -> Image.Image:
    """An RGB PIL image (decoded at full size). Raises ImageError with a readable reason."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (bytes, bytearray)):
        try:
            img = Image.open(io.BytesIO(image))
            img.load()
        except Exception as e:  # PIL raises many types for corrupt data
            raise ImageError("unreadable_image", f"embedded image bytes: {e}") from e
        return to_rgb(img)
    if image is None:
        raise ImageError("missing_image", "the question has no image")
    return load_image(Path(image), draft=False)


def image_problem(image) -> str | None:
    """None when the picture opens, else why not (for the errors file)."""
    try:
        open_image(image)
    except (ImageError, OSError, ValueError) as e:
        return str(e)
    return None


def describe(image) -> str:
    """How the errors file names a picture."""
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} embedded bytes>"
    return str(image)
