"""End to end on a tiny random LLaVA on CPU: the engine checkpoint and its llava-hf export give
the same predictions through llava-evaluate, at 0 and 2 shots, with random and RICES demos.

The model is the conversion tests' tiny llava-hf model (the tiny preset's shapes, the real
vocabulary and image geometry), imported into an engine checkpoint with the project's converter.
Runs once the generation API (engine.inference) is installed.
"""

from __future__ import annotations

import json
import shutil

import pytest

from convert.conftest import build_tiny_llava  # tests/ is on sys.path
from engine.cli.evaluate import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_model):
    from engine.cli.convert import run_import

    hf = tmp_path_factory.mktemp("eval_llava_hf")
    build_tiny_llava(seed=5).save_pretrained(hf)
    shutil.copy(tokenizer_model, hf / "tokenizer.model")
    ckpt = tmp_path_factory.mktemp("eval_engine") / "ckpt"
    run_import("llava-hf", hf, ckpt, 1, 1, dtype="fp32", progress=False, log=lambda *_: None)
    return hf, ckpt


def _run(tmp_path, data_root, flag, path, *extra):
    out = tmp_path / flag.strip("-")
    rc = main([flag, str(path), "--benchmark", "okvqa", "scienceqa", "--data-root", str(data_root),
               "--shots", "0", "2", "--dtype", "float32", "--output", str(out), *extra])
    assert rc == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), preds


@pytest.mark.slow
@pytest.mark.parametrize("demos", ["random", "rices"])
def test_engine_and_hf_backends_agree(tmp_path, data_root, model_dirs, demos):
    hf, ckpt = model_dirs
    r_engine, p_engine = _run(tmp_path, data_root, "--checkpoint", ckpt, "--demos", demos)
    r_hf, p_hf = _run(tmp_path, data_root, "--hf-model", hf, "--demos", demos)
    assert len(p_engine) == 2 * 3 + 2 * 3  # okvqa val: 3 questions; scienceqa IMG test: 3
    keys = ("benchmark", "shots", "id", "demo_ids", "prompt_length", "output", "parsed", "score")
    assert [[p[k] for k in keys] for p in p_engine] == [[p[k] for k in keys] for p in p_hf]
    assert r_engine == r_hf
    assert all(p["prompt_length"] > 0 for p in p_engine)
    two_shot = [p for p in p_engine if p["shots"] == 2]
    assert all(len(p["demo_ids"]) == 2 for p in two_shot)
