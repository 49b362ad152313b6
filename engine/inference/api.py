"""The generation API: requests in, texts and token ids out, the same for every model kind.

`EngineGenerator` (an engine checkpoint, KV cache, tensor parallel) and `HFGenerator`
(transformers' `generate` on a llava-hf directory, the reference) both implement `Generator`,
so an evaluation harness runs either without knowing which. A request that cannot be answered
(an image that cannot be read, a marker count that differs from the images, a prompt longer
than the model's context) comes back as a `Result` with `error` set; the others are answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Request:
    """One prompt: text with one "<image>" marker per image, and the images in order (each a
    file path, raw encoded bytes, or a PIL.Image)."""

    id: str
    prompt: str
    images: tuple = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to continue. temperature 0 is greedy; top_k 0 and top_p 1 are off. Stop strings are
    checked on the decoded text and are not part of `Result.text`. Each request draws from its
    own generator seeded by (`seed`, request id), so a sample does not depend on the batch."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class Result:
    """The continuation of one request. `token_ids` are the new tokens (EOS and the tokens after a
    stop string's end excluded); `logprobs` (when asked for) the log-probability of each under the
    model's own distribution (temperature 1, never-generated ids excluded); `prompt_length` the
    language model positions of the prompt, images expanded."""

    id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""  # "eos" | "stop" | "length" | "error"
    error: str | None = None
    logprobs: tuple[float, ...] | None = None
    prompt_length: int = 0


def error_result(request_id: str, why: str) -> Result:
    return Result(id=request_id, finish_reason="error", error=why)


class Generator(Protocol):
    tokens_per_image: int
    max_context: int

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Result]:
        """Results in the order of `requests`."""
        ...

    def image_features(self, images: Sequence) -> torch.Tensor:
        """[N, D] float32 pooled CLS features of the vision tower, on the CPU."""
        ...
