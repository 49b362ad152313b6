"""`llava-benchmark-evaluate` on the CPU: the tiny preset's random weights shared by the engine and
transformers, the real tokenizer, a synthetic OK-VQA folder; every figure is there and the two
backends give the same greedy answers under the same stopping rules (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engine.cli.benchmark_evaluate import main
from engine.evaluation.synthetic import synthetic_okvqa
from engine.evaluation.vqa_readers import read_okvqa


def test_synthetic_okvqa_reads_as_the_release(tmp_path):
    root = synthetic_okvqa(tmp_path / "okvqa", 5, 7, seed=1)
    val, train = read_okvqa(root, "val"), read_okvqa(root, "train")
    assert len(val) == 5 and len(train) == 7
    assert len({q.id for q in val + train}) == 12 and all(len(q.answers) == 10 for q in val + train)
    assert all(q.question.endswith("?") and "{" not in q.question for q in val)
    with Image.open(val[0].image) as im:
        assert im.format == "JPEG" and im.size == (640, 480)
    again = read_okvqa(synthetic_okvqa(tmp_path / "again", 5, 7, seed=1), "val")  # the seed fixes everything
    assert [(q.id, q.question, q.answers) for q in again] == [(q.id, q.question, q.answers) for q in val]
    assert again[-1].image.read_bytes() == val[-1].image.read_bytes()


def test_flags_are_checked(capsys):
    assert main(["--checkpoint", "ck"]) == 2
    assert main(["--questions", "0"]) == 2
    assert "--questions" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path, capsys, tokenizer_model):
    if torch.cuda.is_available():
        pytest.skip("CPU run of the tiny preset")
    out = tmp_path / "eval.json"
    argv = ["--preset", "tiny", "--tokenizer", tokenizer_model, "--questions", "3", "--demo-pool", "6",
            "--batch-size", "2", "--json-out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["shots"] == 4 and result["model"]["preset"] == "tiny" and result["model"]["dtype"] == "float32"
    assert result["data"] == {**result["data"], "synthetic": True, "questions": 3, "demo_pool": 6}
    assert result["mean_prompt_positions"] > 5 * 576  # four demonstrations and the question, one picture each
    engine, seed, same = result["engine"], result["seed_way"], result["hf_engine_rules"]
    assert (engine["batch_size"], engine["max_new_tokens"], engine["stop"]) == (2, 10, ["\n"])
    assert (same["batch_size"], same["max_new_tokens"], same["stop"]) == (1, 10, ["\n"])
    assert (seed["batch_size"], seed["max_new_tokens"], seed["stop"]) == (1, 128, [])
    for way in (engine, seed, same):
        assert way["questions"] == 3 and way["errors"] == 0 and way["questions_per_s"] > 0
        assert sum(way["finish_reasons"].values()) == 3
        assert 1 <= way["mean_new_tokens"] <= way["max_new_tokens"]
    # the same weights, greedy, fp32: identical answers under the same rules; the seed's way
    # continues the engine's tokens
    assert same["agreement_with_engine"] == {"questions": 3, "identical_outputs": 1.0, "identical_answers": 1.0,
                                             "engine_tokens_are_a_prefix": 1.0}
    assert seed["agreement_with_engine"]["engine_tokens_are_a_prefix"] == 1.0
    assert same["mean_new_tokens"] == engine["mean_new_tokens"] <= seed["mean_new_tokens"]
    assert result["speedup_vs_seed_way"] == pytest.approx(engine["questions_per_s"] / seed["questions_per_s"])
    assert result["speedup_vs_hf_engine_rules"] == pytest.approx(engine["questions_per_s"] / same["questions_per_s"])
    assert result["new_tokens_seed_way_over_engine"] == pytest.approx(seed["mean_new_tokens"] / engine["mean_new_tokens"])
