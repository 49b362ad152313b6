"""Tensor-parallel generation on the CPU (gloo): a checkpoint saved at one layout loads at another,
and TP=2 gives the same greedy tokens as TP=1."""

from __future__ import annotations

import pytest
import torch

from helpers import run_distributed
from generation_inputs import interleaved_requests

from engine.inference import SamplingParams

PARAMS = SamplingParams(max_new_tokens=4)


def _generate(ckpt: str, requests) -> list:
    from engine.inference import EngineGenerator

    gen = EngineGenerator.from_checkpoint(ckpt, dtype=torch.float32, batch_size=4)
    return gen.generate(requests, PARAMS)


@pytest.fixture(scope="module")
def pp2_ckpt(tmp_path_factory, hf_dir):
    """The same model imported at TP=1, PP=2 (two pipeline stages on disk)."""
    from engine.cli.convert import run_import

    target = tmp_path_factory.mktemp("gen_engine_pp2") / "ckpt"
    run_import("llava-hf", hf_dir, target, 1, 2, dtype="fp32", progress=False, log=lambda *_: None)
    return target


@pytest.mark.slow
def test_tp2_equals_tp1_from_any_saved_layout(engine_ckpt, pp2_ckpt):
    requests = interleaved_requests(8)
    (tp1,) = run_distributed(_generate, 1, str(engine_ckpt), requests)
    assert all(r.error is None and len(r.token_ids) == 4 for r in tp1)
    tp2 = run_distributed(_generate, 2, str(pp2_ckpt), requests, timeout=900)
    assert [r.token_ids for r in tp2[0]] == [r.token_ids for r in tp1]
    assert tp2[1] == tp2[0]  # every rank returns the same results
