"""Shared fixtures: the real tokenizer model and real photographs shipped by installed packages."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer_model() -> str:
    # LLAVA_TOKENIZER_MODEL points at a copy where mistral-common is not installed (GPU machines).
    if os.environ.get("LLAVA_TOKENIZER_MODEL"):
        return os.environ["LLAVA_TOKENIZER_MODEL"]
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return str(path)


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """The bundled sample corpus's images (real photographs)."""
    return REPO / "examples" / "data" / "images"
