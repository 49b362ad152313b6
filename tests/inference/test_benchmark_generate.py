"""`llava-benchmark-generate` on the CPU with the tiny preset: every figure is there and sane."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli.benchmark_generate import WordTokenizer, main


def test_word_tokenizer_never_ends():
    tok = WordTokenizer()
    ids = tok.encode("a b a")
    assert len(ids) == 3 and ids[0] == ids[2] and all(3 <= i < 32000 for i in ids) and tok.eos_id not in ids


@pytest.mark.slow
def test_benchmark_runs_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CPU run of the tiny preset")
    out = tmp_path / "gen.json"
    argv = ["--preset", "tiny", "--decode-tokens", "4", "--requests", "3", "--images", "2", "--text-tokens", "30",
            "--new-tokens", "3", "--batch-size", "2", "--hf-batch-sizes", "1,2", "--seed-requests", "1",
            "--decode-modes", "static,eager", "--json-out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    decode, vqa = result["decode"], result["vqa"]
    assert result["preset"] == "tiny" and result["dtype"] == "float32"
    assert result["decode_mode"] == "static" and list(result["decode_by_mode"]) == ["static", "eager"]
    assert decode == result["decode_by_mode"]["static"]
    assert decode["tokens_per_s"] > 0 and decode["bandwidth_gbs"] > 0
    assert decode["weight_bytes"] > 4 * 32064 * 64 * 2  # embedding and output layer alone, fp32
    assert decode["roofline_fraction"] == pytest.approx(decode["tokens_per_s"] / decode["roofline_tokens_per_s"])
    assert vqa["prompt_positions"] > 2 * 576 + 30
    for key in ("engine", "engine_batch1", "seed_way", "hf"):
        assert vqa[key]["requests_per_s"] > 0
    assert vqa["hf"]["best_batch_size"] in (1, 2) and set(vqa["hf"]["by_batch_size"]) == {"1", "2"}
    assert vqa["speedup_vs_hf"] == pytest.approx(vqa["engine"]["requests_per_s"] / vqa["hf"]["requests_per_s"])
