"""Helpers shared by the reliability tests: example counts, real photos, file mutations."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

from PIL import Image
from skimage import data as skdata


def examples(n: int) -> int:
    """`n` examples in CI; ``RELIABILITY_EXAMPLES=k`` multiplies them when exploring."""
    return n * int(os.environ.get("RELIABILITY_EXAMPLES", "1"))


def photo(name: str, size: tuple[int, int] | None = None, mode: str = "RGB") -> Image.Image:
    """A scikit-image sample photograph, optionally resized (bicubic) and converted."""
    img = Image.fromarray(getattr(skdata, name)())
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    return img.convert(mode) if img.mode != mode else img


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def flip_bits(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """`data` with bit `bit` of byte `offset % len(data)` inverted, for each (offset, bit)."""
    out = bytearray(data)
    for offset, bit in flips:
        out[offset % len(out)] ^= 1 << bit
    return bytes(out)


def tokenizer_path() -> str:
    import mistral_common

    return str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


@contextlib.contextmanager
def hang_guard(seconds: float, what: str):
    """Turn a hang into a test failure: SIGALRM interrupts blocking calls (open() of a FIFO,
    a read) in the main thread and raises here."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds:g} s (a hang)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class DyingDataset:
    """Wraps a dataset; building sample `k` ends the worker process without a word: ``exit``
    (os._exit, as a crash in native code does) or ``kill`` (SIGKILL, as the out-of-memory killer
    does)."""

    def __init__(self, dataset, k: int, how: str):
        self.dataset, self.k, self.how = dataset, k, how

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        if k == self.k:
            if self.how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.dataset[k]

    def __repr__(self) -> str:
        return f"DyingDataset({self.dataset!r})"
