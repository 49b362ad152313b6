"""A test double of a generator (engine.inference's Generator contract) whose answers are scripted
per request id.

ScriptedGenerator keeps the Generator contract: results in request order; a request whose
"<image>" markers do not match its images, or with a picture that cannot be opened, gets
Result(error=..., finish_reason="error"); stop strings end the text and are not part of it;
prompt_length counts words plus tokens_per_image per picture; image_features are computed from
the pixels (a 4x4 grey thumbnail), so similar pictures have similar features.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.inference import Result


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
    img = Image.open(src)
    img.load()
    return img


class ScriptedGenerator:
    tokens_per_image = 4
    max_context = 4096

    def __init__(self, answers=None, default: str = "cat\n"):
        self.answers = answers or {}   # request id -> text (or a callable of the request)
        self.default = default
        self.calls: list[tuple[list, object]] = []

    def _result(self, req, params):
        if req.prompt.count("<image>") != len(req.images):
            return Result(id=req.id, finish_reason="error", error="marker count differs from images")
        try:
            for im in req.images:
                _open(im)
        except Exception as e:
            return Result(id=req.id, finish_reason="error", error=f"bad image: {e}")
        text = self.answers.get(req.id, self.default)
        text = text(req) if callable(text) else text
        finish = "eos"
        for s in params.stop:
            if s in text:
                text, finish = text.split(s, 1)[0], "stop"
        return Result(id=req.id, text=text, finish_reason=finish,
                          prompt_length=len(req.prompt.split()) + self.tokens_per_image * len(req.images))

    def generate(self, requests, params):
        self.calls.append((list(requests), params))
        return [self._result(r, params) for r in requests]

    def image_features(self, images) -> torch.Tensor:
        rows = [np.asarray(_open(im).convert("L").resize((4, 4)), np.float32).reshape(-1) / 255 - 0.5
                for im in images]
        return torch.from_numpy(np.stack(rows))
