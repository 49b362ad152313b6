"""Prompts become model input exactly as training documents do.

The text is split at its "<image>" markers into the segments of a training document
(`engine.data.tokenizer`: BOS, each text chunk encoded on its own, no spaces around images, no
EOS for a prompt), each image token is expanded to `tokens_per_image` positions, and each image
is preprocessed as the dataset stores it (`engine.data.images`: pad to square with the CLIP mean,
resize, crop) and CLIP-normalised as the loader does. So the engine and transformers see the
input the model was trained on.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGE_MARKER = "<image>"


def prompt_segments(prompt: str) -> list[str | None]:
    """"A <image> B" -> ["A", None, "B"]: text segments (whitespace around images dropped, as in
    the training documents) and None for each image."""
    segments: list[str | None] = []
    for k, text in enumerate(re.split(re.escape(IMAGE_MARKER), prompt)):
        if k:
            segments.append(None)
        if text.strip():
            segments.append(text.strip())
    return segments


def load_pixels(image, size: int) -> np.ndarray:
    """A file path, encoded bytes or a PIL image -> uint8 [size, size, 3] as training stores it.
    Raises `engine.data.images.ImageError` (a ValueError) for a missing or unreadable image."""
    from PIL import Image

    from engine.data.images import ImageError, preprocess, preprocess_file

    if isinstance(image, (str, os.PathLike)):
        return preprocess_file(image, size=size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError("corrupt_image", f"image bytes ({len(image)} bytes) are not a readable image: {e}") from None
        return preprocess(img, size)
    if isinstance(image, Image.Image):
        return preprocess(image, size)
    raise ImageError("unreadable_image", f"an image must be a path, bytes or a PIL.Image, not {type(image).__name__}")


def load_images(images, size: int) -> Tensor:
    """Images -> float32 [N, 3, size, size], CLIP-normalised."""
    from engine.data.images import normalize

    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(normalize(np.stack([load_pixels(im, size) for im in images])))


def prompt_ids(tokenizer, prompt: str, tokens_per_image: int) -> tuple[list[int], list[int], int]:
    """(token ids with each image expanded, image offsets, number of markers)."""
    from engine.data.tokenizer import encode_document

    segments = prompt_segments(prompt)
    ids = encode_document(tokenizer, segments).tolist()[:-1]  # a prompt: no EOS
    expanded, offsets = [], []
    for t in ids:
        if t == tokenizer.image_token_id:
            offsets.append(len(expanded))
            expanded.extend([t] * tokens_per_image)
        else:
            expanded.append(t)
    return expanded, offsets, sum(s is None for s in segments)


def build_input(tokenizer, prompt: str, images, tokens_per_image: int, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [1, S] with each image expanded, images [N, 3, H, W] normalised, offsets [N]).
    Raises ValueError when the marker count differs from the images, or an image is bad."""
    ids, offsets, n_markers = prompt_ids(tokenizer, prompt, tokens_per_image)
    if n_markers != len(images):
        raise ValueError(f"the prompt has {n_markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s) were given")
    pixels = load_images(list(images), image_size)
    return torch.tensor([ids], dtype=torch.int64), pixels, torch.tensor(offsets, dtype=torch.int64)


@dataclass(frozen=True)
class Prompt:
    """One request ready for a model: ids [S] (images expanded), pixels, image offsets."""

    ids: Tensor
    pixels: Tensor
    offsets: Tensor

    @property
    def length(self) -> int:
        return self.ids.numel()


def prepare(tokenizer, request, *, tokens_per_image: int, image_size: int, max_context: int) -> Prompt:
    """A request as model input; ValueError (naming why) when it cannot be answered."""
    tokens, pixels, offsets = build_input(tokenizer, request.prompt, list(request.images), tokens_per_image,
                                          image_size)
    if tokens.size(1) >= max_context:
        raise ValueError(f"the prompt takes {tokens.size(1)} positions (images expanded), the model's context "
                         f"is {max_context}: no room to generate")
    return Prompt(tokens[0], pixels, offsets)
