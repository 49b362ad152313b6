"""Shared fixtures: the real tokenizer model and real photographs shipped by installed packages.
Plain helper functions (ports, process launchers, JSONL logs) are in tests/helpers.py."""

import os
from pathlib import Path

import pytest

from helpers import REPO, tokenizer_path

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tokenizer_model() -> str:
    return tokenizer_path()


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """The bundled sample corpus's images (real photographs)."""
    return REPO / "examples" / "data" / "images"
