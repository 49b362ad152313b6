"""End-to-end training runs of `python -m engine.pretrain` on CPU ranks over gloo, on a small real
dataset (tests/training/conftest.py), with the tiny preset.

One reference run (one rank, two micro-batches per step, checkpoints every 2 steps) is compared
with: a resume from its step-4 checkpoint (bit-exact), two data-parallel ranks (one micro-batch
each), and resumes from the same checkpoint into TP=2 and PP=2 layouts (resharded weights and
optimizer state; equal up to fp32 reduction order). Then a SIGTERM stop and an incompatible
checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.slow

ITERS = 6
FIELDS = ("iteration", "consumed_samples", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s",
          "images_per_s", "tflops_per_gpu", "mfu", "peak_mem_gib", "data_wait_s", "data_wait_frac")


def _common(data: str) -> list:
    return ["--data-path", data, "--log-interval", 1, "--eval-interval", 3, "--eval-iters", 1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset):
    """The reference run, configured through a YAML file (flags given too win over it)."""
    root = tmp_path_factory.mktemp("reference")
    config = root / "run.yaml"
    config.write_text(
        "model: tiny\n"
        "seq-length: 1536\n"
        "micro-batch-size: 1\n"
        "global-batch-size: 2\n"
        f"train-iters: {ITERS}\n"
        "lr: 1.0e-3\n"
        "min-lr: 1.0e-4\n"
        "lr-decay-style: cosine\n"
        "lr-warmup-iters: 2\n"
        "split: '80,20,0'\n"
        "dist-ckpt-optim-fully-reshardable: true\n")  # so that TP/PP resumes get the optimizer too
    argv = ["--config", config, *_common(tiny_dataset), "--num-workers", 1,
            "--save", root / "ckpt", "--save-interval", 2, "--keep-last", 2, "--log-jsonl", root / "log.jsonl"]
    helpers.run_ranks(argv, 1, root / "logs")
    return {"root": root, "config": config, "train": helpers.read_jsonl(root / "log.jsonl", "train"),
            "valid": helpers.read_jsonl(root / "log.jsonl", "valid")}


def _resume(tmp_path: Path, reference, data: str, nproc: int, *extra) -> tuple[list, list]:
    """Continue the reference run from its step-4 checkpoint on another layout."""
    argv = ["--config", reference["config"], *_common(data), "--num-workers", 0,
            "--load", reference["root"] / "ckpt" / "iter_0000004", "--save", tmp_path / "ckpt",
            "--log-jsonl", tmp_path / "log.jsonl", *extra]
    helpers.run_ranks(argv, nproc, tmp_path / "logs")
    log = tmp_path / "log.jsonl"
    return helpers.read_jsonl(log, "train"), helpers.read_jsonl(log, "valid")


def test_short_run_learns_logs_and_checkpoints(reference):
    train, valid = reference["train"], reference["valid"]
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))
    for r in train:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["consumed_samples"] == 2 * r["iteration"]
        assert r["tokens_per_s"] > 0 and r["images_per_s"] > 0 and r["tflops_per_gpu"] > 0
        assert r["mfu"] is None  # no MFU on a CPU (engine.training.metrics.mfu_peak)
        assert r["peak_mem_gib"] > 0.1 and 0 <= r["data_wait_frac"] < 1 and r["step_time_s"] > 0
        assert math.isfinite(r["grad_norm"]) and r["skipped"] == 0
    # The schedule: linear warmup from 0 over 2 steps, then cosine from 1e-3 to 1e-4 by step 6.
    assert [train[0]["lr"], train[1]["lr"], train[2]["lr"]] == pytest.approx([0.0, 5e-4, 1e-3])
    assert train[5]["lr"] == pytest.approx(1e-4 + 0.5 * (math.cos(math.pi * 3 / 4) + 1) * 9e-4)
    # It learns: training and validation loss fall (from ~ln(32064) at random initialisation).
    assert train[0]["loss"] == pytest.approx(math.log(32064), abs=0.2)
    assert train[-1]["loss"] < train[2]["loss"] - 0.1
    assert [r["iteration"] for r in valid] == [3, 6] and valid[1]["loss"] < valid[0]["loss"]
    # Checkpoints every 2 steps, the last 2 kept, the tracker names the newest, no leftovers.
    ckpt = reference["root"] / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6\n"


def test_resume_is_bit_exact(reference, tiny_dataset, tmp_path):
    train, valid = _resume(tmp_path, reference, tiny_dataset, 1)
    assert [r["iteration"] for r in train] == [5, 6]
    assert [r["consumed_samples"] for r in train] == [10, 12]  # the data position came back
    for got, want in zip(train, reference["train"][4:]):
        assert (got["loss"], got["grad_norm"], got["lr"]) == (want["loss"], want["grad_norm"], want["lr"])
    assert valid[-1]["loss"] == reference["valid"][-1]["loss"]


def test_data_parallel_equals_micro_batches(reference, tiny_dataset, tmp_path):
    """DP=2 with one micro-batch each = DP=1 with two: the loss is averaged over the supervised
    tokens of the whole global batch, however it is split. Its checkpoint (optimizer state in the
    default per-DP-rank layout) then resumes on one rank, but refuses a TP change."""
    argv = ["--config", reference["config"], *_common(tiny_dataset), "--num-workers", 0,
            "--no-dist-ckpt-optim-fully-reshardable", "--exit-interval", 3, "--save", tmp_path / "ckpt"]
    helpers.run_ranks(argv + ["--log-jsonl", tmp_path / "log.jsonl"], 2, tmp_path / "logs")
    train, valid = (helpers.read_jsonl(tmp_path / "log.jsonl", kind) for kind in ("train", "valid"))
    assert [r["iteration"] for r in train] == [1, 2, 3]
    for got, want in zip(train, reference["train"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert valid[0]["loss"] == pytest.approx(reference["valid"][0]["loss"], rel=1e-6)

    # Step 4 checks the restored weights and data position, step 5 the restored Adam state.
    resume = argv[:-4] + ["--load", tmp_path / "ckpt", "--exit-interval", 5, "--log-jsonl", tmp_path / "dp1.jsonl"]
    helpers.run_ranks(resume, 1, tmp_path / "logs_dp1")
    steps = helpers.read_jsonl(tmp_path / "dp1.jsonl", "train")
    assert [r["iteration"] for r in steps] == [4, 5]
    for got, want in zip(steps, reference["train"][3:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)

    ranks = helpers.run_ranks(resume + ["--tensor-model-parallel-size", 2], 2, tmp_path / "logs_tp2", check=False)
    assert [r.proc.returncode for r in ranks] == [2, 2]
    assert "its optimizer state only loads into that TP/PP layout" in ranks[0].output


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", 2], ["--pipeline-model-parallel-size", 2]],
                         ids=["tp2", "pp2"])
def test_resume_into_another_model_parallel_layout(reference, tiny_dataset, tmp_path, layout):
    train, valid = _resume(tmp_path, reference, tiny_dataset, 2, *layout)
    assert [r["iteration"] for r in train] == [5, 6]
    for got, want in zip(train, reference["train"][4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert valid[-1]["loss"] == pytest.approx(reference["valid"][-1]["loss"], rel=1e-5)


def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_dataset, tmp_path):
    """The signal reaches one rank only; both stop after the same step and save together."""
    from megatron.core import dist_checkpointing

    log = tmp_path / "log.jsonl"
    argv = ["--model", "tiny", "--seq-length", 1536, "--global-batch-size", 2, "--train-iters", 500,
            "--data-path", tiny_dataset, "--split", "1,0,0", "--eval-interval", 0, "--num-workers", 1,
            "--log-interval", 1, "--save", tmp_path / "ckpt", "--log-jsonl", log]
    ranks = helpers.start_ranks(argv, 2, tmp_path / "logs")
    deadline = time.monotonic() + 180
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and all(r.proc.poll() is None for r in ranks), ranks[0].output
        time.sleep(0.2)
    ranks[0].proc.send_signal(signal.SIGTERM)
    assert helpers.wait_ranks(ranks, 180) == [0, 0], ranks[0].output + ranks[1].output
    last = helpers.read_jsonl(log, "train")[-1]["iteration"]
    assert 2 <= last < 500
    assert f"stopping after iteration {last}: received SIGTERM" in ranks[0].output
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == f"{last}\n"
    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "ckpt" / f"iter_{last:07d}"))
    assert (common["iteration"], common["consumed_samples"]) == (last, 2 * last)


def test_incompatible_checkpoint_fails_at_start(reference, tiny_dataset, tmp_path):
    argv = ["--config", reference["config"], *_common(tiny_dataset), "--num-layers", 2,
            "--load", reference["root"] / "ckpt"]
    ranks = helpers.run_ranks(argv, 1, tmp_path / "logs", check=False)
    assert ranks[0].proc.returncode == 2
    out = ranks[0].output
    assert "was saved for a different model" in out and "language.num_layers: checkpoint 4, this run 2" in out
    assert "iteration 1 " not in out  # nothing trained


def test_start_from_pretrained_weights(reference, tiny_dataset, tmp_path):
    """--pretrained-checkpoint: the weights of reference step 4, but a fresh schedule, optimizer
    and data position (iteration 1 on sample 0 again, at warmup lr 0). With lr 0 the first step
    changes nothing, so its loss is the step-4 weights' loss on samples 0-1: far below step 1's."""
    argv = ["--config", reference["config"], *_common(tiny_dataset), "--num-workers", 0, "--exit-interval", 1,
            "--pretrained-checkpoint", reference["root"] / "ckpt" / "iter_0000004",
            "--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt", "--log-jsonl", tmp_path / "log.jsonl"]
    ranks = helpers.run_ranks(argv, 1, tmp_path / "logs")
    assert "loaded pretrained weights from" in ranks[0].output
    (first,) = helpers.read_jsonl(tmp_path / "log.jsonl", "train")
    assert (first["iteration"], first["consumed_samples"], first["lr"]) == (1, 2, 0.0)
    assert first["loss"] < reference["train"][0]["loss"] - 0.2
    # A rerun with the same flags resumes the run's own checkpoint instead (iteration 1 onwards).
    ranks = helpers.run_ranks(argv[:-2] + ["--log-jsonl", tmp_path / "log2.jsonl", "--exit-interval", 2], 1,
                       tmp_path / "logs2")
    assert "resumed from" in ranks[0].output and "loaded pretrained weights" not in ranks[0].output
    assert [r["iteration"] for r in helpers.read_jsonl(tmp_path / "log2.jsonl", "train")] == [2]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_no_save_optim_saves_weights_only(reference, tiny_dataset, tmp_path):
    """--no-save-optim: the checkpoint holds the weights but no optimizer state, so it is a
    fraction of the size; resuming it needs --no-load-optim (without, the run says so and stops)."""
    train, _ = _resume(tmp_path, reference, tiny_dataset, 1, "--no-save-optim", "--exit-interval", 5)
    assert [r["iteration"] for r in train] == [5]
    saved, full = tmp_path / "ckpt" / "iter_0000005", reference["root"] / "ckpt" / "iter_0000004"
    assert _size(saved) < 0.5 * _size(full)
    argv = ["--config", reference["config"], *_common(tiny_dataset), "--num-workers", 0, "--load", tmp_path / "ckpt"]
    ranks = helpers.run_ranks(argv, 1, tmp_path / "logs_plain", check=False)
    assert ranks[0].proc.returncode == 2 and "--no-load-optim" in ranks[0].output
    log = tmp_path / "resumed.jsonl"
    helpers.run_ranks(argv + ["--no-load-optim", "--log-jsonl", log], 1, tmp_path / "logs_weights")
    assert [r["iteration"] for r in helpers.read_jsonl(log, "train")] == [6]
