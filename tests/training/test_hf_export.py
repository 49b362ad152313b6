"""--export-hf-interval: checkpoints exported to Hugging Face in the background while the tiny
preset trains on one CPU rank; a failed export is logged and training goes on."""

from __future__ import annotations

import json

import pytest

import helpers

pytestmark = pytest.mark.slow


def _argv(data: str, save, *extra, iters: int = 3) -> list:
    return ["--model", "tiny", "--seq-length", 1536, "--micro-batch-size", 1, "--global-batch-size", 1,
            "--train-iters", iters, "--lr-warmup-iters", 1, "--split", "80,20,0", "--eval-interval", 0,
            "--num-workers", 0, "--data-path", data, "--save", save, "--save-interval", 1, *extra]


def test_every_second_checkpoint_is_exported_and_the_newest_kept(tiny_dataset, tokenizer_model, tmp_path):
    (rank,) = helpers.run_ranks(_argv(tiny_dataset, tmp_path / "ckpt", "--export-hf-interval", 2, "--export-hf-keep", 1,
                                      "--tokenizer-model", tokenizer_model, iters=4), 1, tmp_path / "logs", timeout=600)
    hf = tmp_path / "ckpt" / "hf"
    # Checkpoints 1-4 are published; the 2nd and 4th are exported, the newest export is kept.
    assert "exported iteration 2 to" in rank.output and "exported iteration 4 to" in rank.output
    assert sorted(p.name for p in hf.iterdir()) == ["iter_0000004", "iter_0000004.log"]
    config = json.loads((hf / "iter_0000004" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]


def test_a_failed_export_is_logged_and_training_goes_on(tiny_dataset, tmp_path):
    bad = tmp_path / "not_a_tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    (rank,) = helpers.run_ranks(_argv(tiny_dataset, tmp_path / "ckpt", "--export-hf-interval", 1,
                                      "--tokenizer-model", bad), 1, tmp_path / "logs", timeout=600)
    out = rank.output
    assert "the Hugging Face export of iteration 1 failed" in out and "iter_0000001.log" in out
    assert (tmp_path / "ckpt" / "iter_0000003").is_dir()  # training finished and saved
    hf = tmp_path / "ckpt" / "hf"
    assert not [p for p in hf.iterdir() if p.is_dir()]  # no half-written export, no linked sources left
