"""Faults on one rank of two: a checkpoint save that fails there (its disk full), a rank killed
(`kill -9`) or frozen (SIGSTOP). The other rank must not wait for it until the distributed
timeout: every rank stops within seconds with one message naming the rank at fault.

Runs are real `python -m engine.pretrain` processes (tiny preset, CPU, gloo), two ranks started
as torchrun starts them (faultlib.start_ranks) or by torchrun itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faultlib import ENOSPC_DRIVER, TRAIN_ITERS, start_ranks, tracker, training_flags
from helpers import REPO, kill_group, read_jsonl

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


# ------------------------------------------------------------------------------ a lost rank


def _torchrun(argv: list, log: Path) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 -m engine.pretrain ARGV` in its own session."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "engine.pretrain", *map(str, argv)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _rank_pids(agent: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started."""
    pids = {}
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            pids[rank] = int(child)
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run_torchrun(argv: list, log: Path, timeout: float = 300) -> str:
    agent = _torchrun(argv, log)
    try:
        code = agent.wait(timeout=timeout)
    finally:
        kill_group(agent)
    assert code == 0, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_lost_rank_stops_the_survivor_and_the_rerun_resumes_exactly(training_data, tmp_path, how):
    """torchrun, two ranks: after 5 logged steps rank 1 is SIGKILLed (a crash, the OOM killer) or
    SIGSTOPped (a frozen node: its connections stay open, so gloo would wait for it until the
    distributed timeout). Rank 0 exits within the bound (--heartbeat-timeout 10 s plus one
    heartbeat), status 4, with one line naming rank 1; a rerun resumes from the newest complete
    checkpoint and logs the uninterrupted run's losses, grad norms and learning rates exactly."""
    ref = tmp_path / "reference"
    ref.mkdir()
    _run_torchrun(training_flags(training_data, ref, "--log-jsonl", ref / "log.jsonl"), ref / "out.log")
    reference = {r["iteration"]: r for r in read_jsonl(ref / "log.jsonl", "train")}
    assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))

    argv = training_flags(training_data, tmp_path, "--heartbeat-timeout", 10, "--log-jsonl", tmp_path / "log.jsonl")
    agent = _torchrun(argv, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while len(read_jsonl(tmp_path / "log.jsonl", "train", killed=True)) < 5:
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-4000:]
            time.sleep(0.05)
        pids = _rank_pids(agent)
        os.kill(pids[1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        lost_at = time.monotonic()
        while _alive(pids[0]) and time.monotonic() < lost_at + 120:
            time.sleep(0.05)
        survivor_exit = time.monotonic() - lost_at
        if how == "stop":
            os.kill(pids[1], signal.SIGKILL)
        agent.wait(timeout=60)
    finally:
        kill_group(agent)
    output = (tmp_path / "killed.log").read_text()
    print(f"{how}: rank 0 exited {survivor_exit:.1f} s after rank 1 was lost")
    assert survivor_exit < 60, output[-4000:]
    assert "llava-pretrain: error: rank 1 (of 2) was lost: no heartbeat from it for" in output, output[-4000:]
    assert "exitcode  : 4" in output, output[-3000:]  # torchrun's summary of rank 0
    last = tracker(tmp_path / "ckpt")
    assert last is not None and last >= 4, last

    output = _run_torchrun(argv[:-1] + [tmp_path / "resumed.jsonl"], tmp_path / "resumed.log")
    assert f"resumed from {tmp_path / 'ckpt' / f'iter_{last:07d}'}" in output
    resumed = read_jsonl(tmp_path / "resumed.jsonl", "train")
    assert [r["iteration"] for r in resumed] == list(range(last + 1, TRAIN_ITERS + 1))
    for r in resumed:
        want = reference[r["iteration"]]
        assert (r["loss"], r["grad_norm"], r["lr"]) == (want["loss"], want["grad_norm"], want["lr"]), r["iteration"]
