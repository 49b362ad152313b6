"""Launch `python -m engine.pretrain` on N local CPU ranks the way torchrun does (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), as real subprocesses: exit codes, signals, checkpoint
writer processes and data-loader workers behave as in a real run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Rank:
    proc: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(argv: list[str], nproc: int, logdir: Path) -> list[Rank]:
    logdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    ranks = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1" if nproc > 1 else "2",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = logdir / f"rank{r}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "engine.pretrain", *map(str, argv)], cwd=REPO,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        ranks.append(Rank(proc, log))
    return ranks


def wait(ranks: list[Rank], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for r in ranks:
            codes.append(r.proc.wait(timeout=max(deadline - time.monotonic(), 1)))
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGKILL)
                r.proc.wait()
    return codes


def run(argv: list[str], nproc: int, logdir: Path, timeout: float = 300, check: bool = True) -> list[Rank]:
    """Run to completion; with `check`, fail showing every rank's output unless all exit 0."""
    ranks = start(argv, nproc, logdir)
    codes = wait(ranks, timeout)
    if check and any(codes):
        logs = "\n".join(f"--- rank {i} (exit {c}) ---\n{r.output[-6000:]}" for i, (r, c) in
                         enumerate(zip(ranks, codes)))
        raise AssertionError(f"engine.pretrain {' '.join(map(str, argv))} failed:\n{logs}")
    return ranks


def records(jsonl: Path, kind: str = "train") -> list[dict]:
    """The logged records of one kind ('train' or 'valid') from a --log-jsonl file."""
    return [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["kind"] == kind]
