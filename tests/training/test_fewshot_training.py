"""Few-shot evaluation of the live model during training (--fewshot-eval): scores land in the
log and the JSONL every --fewshot-eval-interval iterations, and training is untouched (the same
losses as a run without it)."""

import sys
from pathlib import Path

import pytest

from helpers import REPO, read_jsonl, start_pretrain
from engine.training.arguments import ConfigError, parse_args

sys.path.insert(0, str(REPO / "tests" / "evaluation"))
from _eval_layouts import write_okvqa  # noqa: E402

pytestmark = pytest.mark.slow


def _flags(data: str, out: Path, *extra) -> list:
    return ["--model", "tiny", "--data-path", data, "--seq-length", "1536", "--train-iters", "4",
            "--global-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1", "--split", "1,0,0",
            "--eval-interval", "0", "--log-interval", "1", "--num-workers", "0", "--seed", "5",
            "--log-jsonl", str(out), *extra]


def _run(argv: list, log: Path) -> list[dict]:
    rank = start_pretrain(argv, log)
    assert rank.proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return rank


def test_scores_are_logged_and_training_is_untouched(tiny_dataset, tokenizer_model, tmp_path):
    root = tmp_path / "bench"
    write_okvqa(root / "okvqa")
    plain, evaluated = tmp_path / "plain.jsonl", tmp_path / "fewshot.jsonl"
    _run(_flags(tiny_dataset, plain), tmp_path / "plain.log")
    _run(_flags(tiny_dataset, evaluated, "--fewshot-eval", "okvqa:0,1", "--fewshot-eval-interval", "2",
                "--fewshot-eval-limit", "2", "--fewshot-eval-data-root", str(root),
                "--tokenizer-model", tokenizer_model), tmp_path / "fewshot.log")
    losses = [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_jsonl(plain, "train")]
    assert [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_jsonl(evaluated, "train")] == losses
    scores = read_jsonl(evaluated, "fewshot")
    assert [r["iteration"] for r in scores] == [2, 4]
    for r in scores:
        for k in (0, 1):
            assert 0.0 <= r[f"fewshot/okvqa/{k}shot"] <= 100.0 and r[f"fewshot/okvqa/{k}shot_errors"] == 0
    assert "fewshot | iteration 2" in (tmp_path / "fewshot.log").read_text()


def test_fewshot_flags_are_checked(tiny_dataset, tmp_path):
    base = ["--model", "tiny", "--data-path", tiny_dataset, "--seq-length", "1536", "--train-iters", "2",
            "--fewshot-eval", "okvqa:0", "--fewshot-eval-interval", "2"]
    with pytest.raises(ConfigError, match="needs --fewshot-eval-data-root"):
        parse_args(base)
    with pytest.raises(ConfigError, match="needs --tokenizer-model"):
        parse_args(base + ["--fewshot-eval-data-root", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown benchmark"):
        parse_args(base + ["--fewshot-eval", "vqa2:0"])
    cfg = parse_args(base + ["--fewshot-eval-data-root", str(tmp_path), "--tokenizer-model", "t.model"])
    assert cfg.fewshot.enabled and cfg.fewshot.fewshot_eval == ("okvqa:0",)
    assert cfg.to_dict()["fewshot_eval_data_root"] == str(tmp_path)
