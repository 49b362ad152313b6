"""Fixtures of the evaluation tests: benchmark folders in the official layouts and the
generation API module."""

import pytest

from _eval_layouts import write_all


@pytest.fixture
def data_root(tmp_path):
    return write_all(tmp_path / "bench")


@pytest.fixture
def inference_api():
    import engine.inference

    return engine.inference
