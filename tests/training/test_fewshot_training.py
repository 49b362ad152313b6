"""Few-shot evaluation of the live model during training (--fewshot-eval): scores land in the
log and the JSONL every --fewshot-eval-interval iterations, and training is untouched (the same
losses as a run without it), also when the evaluation generates with the torch-native copy that a
Transformer Engine spec run uses (forced here onto the CPU's torch-native model: the same scores
as generating with the live model)."""

import sys
from pathlib import Path

import pytest

from helpers import REPO, read_jsonl, run_ranks, start_pretrain
from engine.training.arguments import ConfigError, parse_args

sys.path.insert(0, str(REPO / "tests" / "evaluation"))
from _eval_layouts import write_okvqa  # noqa: E402

pytestmark = pytest.mark.slow

# engine.pretrain with the evaluation generating through the torch-native copy even though the
# CPU's model already has the torch-native spec (engine/inference/live.py).
COPY_DRIVER = """
import sys
import engine.inference.live as live

class Forced(live.TorchNativeCopy):
    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, always=True, **kwargs)

    def __call__(self, model):
        out = super().__call__(model)
        print(f"generating with the torch-native copy: {out is not model}", flush=True)
        print("copy checksum", repr(sum(float(p.double().sum()) for p in out.parameters())), flush=True)
        return out

live.TorchNativeCopy = Forced
from engine.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def _flags(data: str, out: Path, *extra) -> list:
    return ["--model", "tiny", "--data-path", data, "--seq-length", "1536", "--train-iters", "4",
            "--global-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1", "--split", "1,0,0",
            "--eval-interval", "0", "--log-interval", "1", "--num-workers", "0", "--seed", "5",
            "--log-jsonl", str(out), *extra]


def _run(argv: list, log: Path, driver: str | None = None) -> list[dict]:
    rank = start_pretrain(argv, log, driver=driver)
    assert rank.proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return rank


def test_scores_are_logged_and_training_is_untouched(tiny_dataset, tokenizer_model, tmp_path):
    root = tmp_path / "bench"
    write_okvqa(root / "okvqa")
    fewshot = ["--fewshot-eval", "okvqa:0,1", "--fewshot-eval-interval", "2", "--fewshot-eval-limit", "2",
               "--fewshot-eval-data-root", str(root), "--tokenizer-model", tokenizer_model]
    plain, evaluated, copied = tmp_path / "plain.jsonl", tmp_path / "fewshot.jsonl", tmp_path / "copy.jsonl"
    _run(_flags(tiny_dataset, plain), tmp_path / "plain.log")
    _run(_flags(tiny_dataset, evaluated, *fewshot), tmp_path / "fewshot.log")
    _run(_flags(tiny_dataset, copied, *fewshot), tmp_path / "copy.log", driver=COPY_DRIVER)
    losses = [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_jsonl(plain, "train")]
    for run in (evaluated, copied):
        assert [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_jsonl(run, "train")] == losses
    scores = read_jsonl(evaluated, "fewshot")
    assert [r["iteration"] for r in scores] == [2, 4]
    for r in scores:
        for k in (0, 1):
            assert 0.0 <= r[f"fewshot/okvqa/{k}shot"] <= 100.0 and r[f"fewshot/okvqa/{k}shot_errors"] == 0
    assert "fewshot | iteration 2" in (tmp_path / "fewshot.log").read_text()
    copy_log = (tmp_path / "copy.log").read_text()
    assert copy_log.count("generating with the torch-native copy: True") == 2, copy_log[-3000:]
    assert read_jsonl(copied, "fewshot") == scores


def test_the_copy_takes_the_gathered_weights(tiny_dataset, tokenizer_model, tmp_path):
    """With --overlap-param-gather on 2 data-parallel ranks each rank updates its shard of the
    weights and gathers the others' in the next forward; the copy is taken before that forward, so
    it gathers them first: both ranks' copies hold the same weights."""
    root = tmp_path / "bench"
    write_okvqa(root / "okvqa")
    argv = _flags(tiny_dataset, tmp_path / "log.jsonl", "--fewshot-eval", "okvqa:0", "--fewshot-eval-interval", "2",
                  "--fewshot-eval-limit", "1", "--fewshot-eval-data-root", str(root),
                  "--tokenizer-model", tokenizer_model, "--overlap-param-gather")
    ranks = run_ranks(argv, 2, tmp_path / "logs", timeout=600, driver=COPY_DRIVER)
    sums = [[line for line in r.output.splitlines() if line.startswith("copy checksum")] for r in ranks]
    assert len(sums[0]) == 2 and sums[0] == sums[1], sums


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
