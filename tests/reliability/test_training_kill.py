"""`kill -9` of a training run at many points, a checkpoint save included: the next start resumes
from the last complete checkpoint and its losses equal an uninterrupted run's, bit for bit.

Runs are real `python -m engine.pretrain` processes (tiny preset, CPU, one rank, a data-loader
worker) on a small real dataset; the whole process group is SIGKILLed, so the loader worker and
an asynchronous checkpoint writer die too.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from faultlib import TRAIN_ITERS, run_training, start_training, tracker, training_flags
from helpers import kill_group, read_jsonl

pytestmark = pytest.mark.slow


def _condition(when: str, arg, root: Path, log: Path):
    ckpt = root / "ckpt"
    if when == "saving":  # a checkpoint directory is being written (not yet renamed into place)
        return lambda: any(p.name == f".tmp_iter_{arg:07d}" for p in ckpt.glob(".tmp_iter_*"))
    if when == "published":
        return lambda: tracker(root / "ckpt") == arg
    if when == "after_step":
        return lambda: len(read_jsonl(log, "train", killed=True)) >= arg
    raise ValueError(when)


def _kill_when(argv: list, root: Path, log: Path, out: Path, when: str, arg) -> dict:
    proc = start_training(argv, out)
    ready = _condition(when, arg, root, log)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, f"{when}={arg} never happened:\n{out.read_text()[-4000:]}"
            time.sleep(0.002)
        finished = proc.poll() is not None
    finally:
        kill_group(proc)
    assert not finished, f"the run ended before {when}={arg}:\n{out.read_text()[-4000:]}"
    return {"tracker": tracker(root / "ckpt"), "steps_logged": len(read_jsonl(log, "train", killed=True)),
            "partial": sorted(p.name for p in (root / "ckpt").glob(".tmp_iter_*"))}


_rng = random.Random(7)
CASES = [
    ("saving", 4, []),                                   # mid-write of the second checkpoint
    ("saving", 2, ["--async-save"]),                     # the background writer dies with it
    ("published", 4, []),                                # just after a checkpoint became the newest
    ("after_step", _rng.randint(3, 7), []),              # between two saves
]


@pytest.mark.parametrize("when,arg,extra", CASES, ids=[f"{w}={a}{'-async' if e else ''}" for w, a, e in CASES])
def test_kill9_then_resume_equals_uninterrupted(training_data, training_reference, tmp_path, when, arg, extra):
    argv = training_flags(training_data, tmp_path, *extra)
    killed = _kill_when([*argv, "--log-jsonl", tmp_path / "killed.jsonl"], tmp_path, tmp_path / "killed.jsonl",
                        tmp_path / "killed.log", when, arg)
    last = killed["tracker"]
    if when == "saving":  # the half-written checkpoint is not the one a resume finds
        assert killed["partial"] == [f".tmp_iter_{arg:07d}"] and (last or 0) < arg, killed
    output = run_training([*argv, "--log-jsonl", tmp_path / "resumed.jsonl"], tmp_path / "resumed.log")
    if last:
        assert f"resumed from {tmp_path / 'ckpt' / f'iter_{last:07d}'} (iteration {last}," in output
    resumed = read_jsonl(tmp_path / "resumed.jsonl", "train", killed=True)
    assert [r["iteration"] for r in resumed] == list(range((last or 0) + 1, TRAIN_ITERS + 1)), killed
    for r in resumed:
        want = training_reference["records"][r["iteration"]]
        got = (r["loss"], r["grad_norm"], r["lr"], r["consumed_samples"])
        assert got == (want["loss"], want["grad_norm"], want["lr"], want["consumed_samples"]), (r["iteration"], killed)
    assert tracker(tmp_path / "ckpt") == TRAIN_ITERS
    assert not list((tmp_path / "ckpt").glob(".tmp_iter_*"))  # the killed save's leftover was redone


def test_sigterm_during_a_save_finishes_saves_and_exits_zero(training_data, training_reference, tmp_path):
    """SIGTERM arrives while the iteration-4 checkpoint is being written: that save completes, the
    next step runs to its end, its checkpoint is written, the exit status is 0; a restart resumes
    from it and matches an uninterrupted run."""
    argv = training_flags(training_data, tmp_path)
    proc = start_training([*argv, "--log-jsonl", tmp_path / "first.jsonl"], tmp_path / "first.log")
    ready = _condition("saving", 4, tmp_path, tmp_path / "first.jsonl")
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, as a scheduler does
        code = proc.wait(timeout=300)
    finally:
        kill_group(proc)
    output = (tmp_path / "first.log").read_text()
    assert code == 0, output[-4000:]
    assert "stopping after iteration 5: received SIGTERM" in output
    assert [r["iteration"] for r in read_jsonl(tmp_path / "first.jsonl", "train", killed=True)] == [1, 2, 3, 4, 5]
    assert tracker(tmp_path / "ckpt") == 5 and (tmp_path / "ckpt" / "iter_0000004").is_dir()
    output = run_training([*argv, "--log-jsonl", tmp_path / "second.jsonl"], tmp_path / "second.log")
    assert "resumed from" in output and "iter_0000005" in output
    for r in read_jsonl(tmp_path / "second.jsonl", "train", killed=True):
        want = training_reference["records"][r["iteration"]]
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), r["iteration"]
