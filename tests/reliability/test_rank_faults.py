"""Faults on one rank of two: a checkpoint save that fails there (its disk full), a rank killed
(`kill -9`) or frozen (SIGSTOP). The other rank must not wait for it until the distributed
timeout: every rank stops within seconds with one message naming the rank at fault.

Runs are real `python -m engine.pretrain` processes (tiny preset, CPU, gloo), two ranks started
as torchrun starts them (faultlib.start_ranks) or by torchrun itself.
"""

from __future__ import annotations

import time

import pytest

from faultlib import ENOSPC_DRIVER, start_ranks, tracker, training_flags
from helpers import kill_group

pytestmark = pytest.mark.slow


def _wait_all(ranks: list, timeout: float) -> tuple[list[int], list[float]]:
    """Exit statuses and exit times (time.monotonic) of every rank; all are killed at `timeout`."""
    deadline = time.monotonic() + timeout
    codes, ended = [None] * len(ranks), [None] * len(ranks)
    try:
        while None in codes and time.monotonic() < deadline:
            for i, r in enumerate(ranks):
                if codes[i] is None and r.proc.poll() is not None:
                    codes[i], ended[i] = r.proc.returncode, time.monotonic()
            time.sleep(0.05)
    finally:
        for r in ranks:
            kill_group(r.proc)
    return codes, ended


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("llava-pretrain: error:")]


@pytest.mark.parametrize("extra", [[], ["--async-save"]], ids=["sync", "async"])
def test_save_failing_on_one_rank_stops_every_rank_with_one_message(training_data, tmp_path, monkeypatch, extra):
    """Rank 1's checkpoint writes fail with ENOSPC from the iteration-4 save on: both ranks exit
    with status 2 within seconds of each other, printing the same line that names rank 1, the
    cause and iteration 2 as the checkpoint a resume uses; the half-written directory is gone and
    the tracker still names iteration 2."""
    monkeypatch.setenv("FAIL_FROM", "4")
    monkeypatch.setenv("FAIL_RANK", "1")
    argv = training_flags(training_data, tmp_path, "--num-workers", 0, *extra)
    ranks = start_ranks(argv, tmp_path / "logs", driver=ENOSPC_DRIVER)
    codes, ended = _wait_all(ranks, timeout=240)
    outputs = [r.output for r in ranks]
    assert codes == [2, 2], "\n".join(f"--- rank {i} ({c})\n{o[-3000:]}" for i, (c, o) in
                                      enumerate(zip(codes, outputs)))
    assert abs(ended[0] - ended[1]) < 10, ended
    lines = [_error_lines(o) for o in outputs]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    ckpt = tmp_path / "ckpt"
    line = lines[0][0]
    assert line.startswith(f"llava-pretrain: error: saving checkpoint iteration 4 under {ckpt} failed on rank 1: ")
    assert "No space left on device" in line, line
    assert line.endswith(f"the newest complete checkpoint is still {ckpt / 'iter_0000002'}"), line
    assert all("Traceback" not in o for o in outputs)
    assert tracker(ckpt) == 2 and (ckpt / "iter_0000002").is_dir()
    assert not (ckpt / "iter_0000004").exists() and not list(ckpt.glob(".tmp_iter_*"))
