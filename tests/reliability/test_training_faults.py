"""Training faults other than a kill: NaN/Inf losses and gradients, a checkpoint save that fails
(disk full, file too large), and start-up inputs that cannot work (unknown or contradictory flags,
checkpoints of another model shape, broken checkpoint directories).

Runs are real `python -m engine.pretrain` processes (tiny preset, CPU, one rank); NaN/Inf is
injected by wrapping the loss function (faultlib.POISON_DRIVER), a full disk by a file-size limit
on the process (RLIMIT_FSIZE, which needs no privileges) and by a writer that raises ENOSPC.
"""

from __future__ import annotations

import hashlib
import math
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from faultlib import ENOSPC_DRIVER, POISON_DRIVER, TRAIN_ITERS, checkpoint_tensors, run_training, tracker, training_flags
from helpers import read_jsonl

pytestmark = pytest.mark.slow


def _state_tensors(path: Path) -> dict:
    """Model weights and optimizer state of a checkpoint (RNG states left out)."""
    return {k: v for k, v in checkpoint_tensors(path).items() if k.startswith(("model", "optimizer"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ NaN / Inf


def test_isolated_nan_and_inf_steps_are_skipped(training_data, tmp_path, monkeypatch):
    """Step 2's loss is NaN (its gradients too), step 5's loss is +Inf (its gradients finite):
    both are skipped and logged; weights, optimizer state and learning-rate schedule stay exactly
    as they were; the run goes on and finishes normally."""
    monkeypatch.setenv("POISON", "2:nan_loss,5:inf_loss")
    monkeypatch.setenv("POISON_MICRO", "2")  # two micro-batches per step
    argv = training_flags(training_data, tmp_path, "--save-interval", 1, "--max-skipped-steps", 2,
                          "--train-iters", 6, "--log-jsonl", tmp_path / "log.jsonl")
    output = run_training(argv, tmp_path / "out.log", driver=POISON_DRIVER)
    assert "iteration 2: the loss or the gradients are NaN/Inf (loss sum nan); update skipped (1 in a row" in output
    assert "iteration 5: the loss or the gradients are NaN/Inf (loss sum inf); update skipped (1 in a row" in output
    records = {r["iteration"]: r for r in read_jsonl(tmp_path / "log.jsonl", "train", killed=True)}
    assert [records[i]["skipped"] for i in range(1, 7)] == [0, 1, 0, 0, 1, 0]
    assert all(math.isfinite(records[i]["loss"]) for i in (1, 3, 4, 6))
    ckpt = tmp_path / "ckpt"
    states = {i: _state_tensors(ckpt / f"iter_{i:07d}") for i in range(1, 7)}
    assert _same(states[1], states[2]) and _same(states[4], states[5])  # skipped: nothing changed
    assert not _same(states[2], states[3]) and not _same(states[5], states[6])  # the others trained
    # The schedule stood still on step 2: warmup goes 0, 5e-4, 1e-3 over the *updates*.
    assert [records[i]["lr"] for i in (1, 2, 3, 4)] == [0.0, 5e-4, 5e-4, 1e-3]


def test_consecutive_bad_steps_stop_with_the_last_good_state(training_data, tmp_path, monkeypatch):
    """Gradients turn NaN from step 4 on (the loss stays finite): steps 4, 5, 6 are skipped; the
    third in a row stops the run with exit status 3 after saving, as iteration 6, the weights and
    optimizer state of iteration 3. A restart from it without the fault trains on."""
    monkeypatch.setenv("POISON", ",".join(f"{s}:nan_grad" for s in range(4, 9)))
    monkeypatch.setenv("POISON_MICRO", "2")
    argv = training_flags(training_data, tmp_path, "--save-interval", 3, "--max-skipped-steps", 3,
                          "--log-jsonl", tmp_path / "log.jsonl")
    output = run_training(argv, tmp_path / "out.log", expect=3, driver=POISON_DRIVER)
    assert "update skipped (3 in a row, --max-skipped-steps 3)" in output
    assert ("3 consecutive steps with a NaN/Inf loss or gradients (--max-skipped-steps 3); the weights are "
            f"those of iteration 3; saved as iteration 6 in {tmp_path / 'ckpt'}") in output
    assert "Traceback" not in output
    assert [r["iteration"] for r in read_jsonl(tmp_path / "log.jsonl", "train", killed=True)] == [1, 2, 3, 4, 5, 6]
    ckpt = tmp_path / "ckpt"
    assert tracker(ckpt) == 6
    assert _same(_state_tensors(ckpt / "iter_0000003"), _state_tensors(ckpt / "iter_0000006"))

    monkeypatch.delenv("POISON")
    argv = training_flags(training_data, tmp_path, "--log-jsonl", tmp_path / "resumed.jsonl")
    output = run_training(argv, tmp_path / "resumed.log")
    assert f"resumed from {ckpt / 'iter_0000006'}" in output
    resumed = read_jsonl(tmp_path / "resumed.jsonl", "train", killed=True)
    assert [r["iteration"] for r in resumed] == [7, 8] and all(r["skipped"] == 0 for r in resumed)


# ------------------------------------------------------------------------------ a save that fails


def _file_size_limit(limit: int):
    def apply():  # runs in the child before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("fault", ["file_size_limit", "enospc"])
def test_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(training_data, training_reference,
                                                                         tmp_path, monkeypatch, fault):
    """Train to iteration 4 normally; resume with a disk that cannot take the iteration-6
    checkpoint: a one-line error naming the save and the cause, exit status 2, the iteration-4
    checkpoint untouched and still the newest. A third run resumes from it and matches an
    uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    run_training(training_flags(training_data, tmp_path, "--exit-interval", 4, "--num-workers", 0), tmp_path / "a.log")
    assert tracker(ckpt) == 4
    before = _digest(ckpt / "iter_0000004")

    argv = training_flags(training_data, tmp_path, "--num-workers", 0)  # no shared-memory batches
    if fault == "file_size_limit":
        output = run_training(argv, tmp_path / "b.log", expect=2, preexec_fn=_file_size_limit(1 << 20))
        cause = "File too large"
    else:
        monkeypatch.setenv("FAIL_FROM", "6")
        output = run_training(argv, tmp_path / "b.log", expect=2, driver=ENOSPC_DRIVER)
        cause = "No space left on device"
    assert "llava-pretrain: error: saving checkpoint iteration 6" in output and cause in output, output[-3000:]
    assert "the newest complete checkpoint is still" in output and "iter_0000004" in output
    assert "Traceback" not in output
    assert tracker(ckpt) == 4 and _digest(ckpt / "iter_0000004") == before
    assert not (ckpt / "iter_0000006").exists() and not list(ckpt.glob(".tmp_iter_*"))

    output = run_training([*argv, "--log-jsonl", tmp_path / "c.jsonl"], tmp_path / "c.log")
    assert f"resumed from {ckpt / 'iter_0000004'}" in output
    for r in read_jsonl(tmp_path / "c.jsonl", "train", killed=True):
        want = training_reference["records"][r["iteration"]]
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), r["iteration"]
    assert tracker(ckpt) == TRAIN_ITERS


# ------------------------------------------------------------------------------ start-up inputs


def _fails_before_work(argv: list, log: Path, *words: str) -> str:
    output = run_training(argv, log, expect=2, timeout=120)
    for w in words:
        assert w in output, output[-3000:]
    assert "Traceback" not in output and "train | iteration" not in output
    return output


def test_unknown_and_contradictory_flags(training_data, tmp_path, capsys):
    """Refused by the entry point before any process group, model or file exists."""
    from engine.training.pretrain import main

    base = [str(a) for a in training_flags(training_data, tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*base, "--learning-rate", "1e-3"])
    assert e.value.code == 2 and "unrecognized arguments: --learning-rate" in capsys.readouterr().err
    cases = [(["--max-skipped-steps", "0"], "--max-skipped-steps must be >= 1, got 0"),
             (["--train-samples", "10"], "give exactly one of --train-iters and --train-samples"),
             (["--freeze-vision", "--freeze-projector", "--freeze-llm"], "everything is frozen"),
             (["--micro-batch-size", "2", "--global-batch-size", "3"], "--global-batch-size 3 is not divisible by --micro-batch-size 2"),
             (["--lr-warmup-iters", "9"], "warmup (9 iterations) must be shorter than the decay span")]
    for extra, words in cases:
        assert main([*base, *extra]) == 2, extra
        assert f"llava-pretrain: error: {words}" in capsys.readouterr().err, extra
    assert not (tmp_path / "ckpt").exists()  # nothing was started, nothing written


def test_checkpoint_inputs_that_cannot_be_used(training_data, training_reference, tmp_path):
    ref_ckpt = training_reference["root"] / "ckpt"
    # another model shape: a wider language model
    _fails_before_work([*training_flags(training_data, tmp_path / "a"), "--load", ref_ckpt, "--hidden-size", 96,
                        "--save", tmp_path / "a" / "out"], tmp_path / "a.log",
                       "was saved for a different model", "language.hidden_size: checkpoint 64, this run 96")
    # a tracker that names a checkpoint that is not there, and one that is not a number
    broken = tmp_path / "broken"
    shutil.copytree(ref_ckpt, broken)
    (broken / "latest_checkpointed_iteration.txt").write_text("12\n")
    _fails_before_work([*training_flags(training_data, tmp_path / "b"), "--load", broken], tmp_path / "b.log",
                       "points at iter_0000012, which does not exist")
    (broken / "latest_checkpointed_iteration.txt").write_text("latest\n")
    _fails_before_work([*training_flags(training_data, tmp_path / "c"), "--load", broken], tmp_path / "c.log",
                       "expected an iteration number, found 'latest'")
    # a checkpoint directory whose shard files were lost
    (broken / "latest_checkpointed_iteration.txt").write_text("8\n")
    for shard in (broken / "iter_0000008").glob("*.distcp"):
        shard.unlink()
    _fails_before_work([*training_flags(training_data, tmp_path / "d"), "--load", broken], tmp_path / "d.log",
                       "iter_0000008")
