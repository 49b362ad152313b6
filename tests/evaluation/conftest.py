"""Fixtures of the evaluation tests: benchmark folders in the official layouts and the
generation API (the real one, or the contract's types where it is not installed)."""

import pytest

from _eval_layouts import write_all
from _scripted import install_api_if_missing


@pytest.fixture
def data_root(tmp_path):
    return write_all(tmp_path / "bench")


@pytest.fixture
def inference_api(monkeypatch):
    return install_api_if_missing(monkeypatch)
