"""A tiny random llava-hf model, its engine import, and interleaved requests over real images.

The llava-hf model is the one the conversion tests build (tests/convert/conftest.py): every
weight random, the tiny preset's shapes, the real vocabulary and image geometry. It is imported
into an engine checkpoint with the project's own converter, so the engine and transformers hold
the same model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from convert.conftest import build_tiny_llava  # tests/ is on sys.path (as for helpers)

@pytest.fixture(scope="session")
def hf_model():
    return build_tiny_llava(seed=3)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model, tokenizer_model) -> Path:
    out = tmp_path_factory.mktemp("gen_llava_hf")
    hf_model.save_pretrained(out)
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def engine_ckpt(tmp_path_factory, hf_dir) -> Path:
    """The llava-hf model imported as an engine checkpoint at TP=PP=1 (fp32)."""
    from engine.cli.convert import run_import

    target = tmp_path_factory.mktemp("gen_engine") / "ckpt"
    run_import("llava-hf", hf_dir, target, 1, 1, dtype="fp32", progress=False, log=lambda *_: None)
    return target


@pytest.fixture(scope="module")
def engine(engine_ckpt):
    import torch

    from engine.inference import EngineGenerator

    if torch.cuda.is_available():
        pytest.skip("CPU suite (megatron-core CPU mode); tests/gpu covers generation on CUDA")
    with EngineGenerator.from_checkpoint(engine_ckpt, dtype=torch.float32, batch_size=8) as gen:
        yield gen
