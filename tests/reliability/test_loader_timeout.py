"""A DataLoader worker that hangs (a read that never returns) while building sample N: a clear
error naming the worker, the sample and its documents, within the loader timeout, not a wait
without end.

The hang is real: the worker opens a named pipe nobody writes to while reading an image of sample
N (faultlib.StallingReader), as a read from a network file system that stopped answering blocks.
Each case runs in a fresh process under a time limit, so a hang fails the test instead of
stalling CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.data.tokenizer import SentencePieceTokenizer
from faultlib import STALL_DRIVER, start_training, tracker, training_flags
from helpers import REPO, kill_group, tokenizer_path

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "tests" / "data"))
from test_dataset import random_documents, write_corpus  # noqa: E402

# Iterates a loader whose worker hangs on sample k; prints what ended the iteration as JSON.
_DRIVER = """
import json, sys, time
from pathlib import Path
from engine.data.dataset import PackedDataset
from engine.data.loader import build_loader
from engine.data.packing import PackingConfig
from faultlib import stall_sample

prefix, k, context, fifo, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), float(sys.argv[5])
ds = stall_sample(PackedDataset(prefix, PackingConfig(seq_length=2048, seed=11), split_weights="1,0,0", cache=False),
                  k, fifo)
loader = build_loader(ds, micro_batch_size=1, num_workers=2, prefetch_factor=2, timeout=timeout,
                      multiprocessing_context=context)
last, batches = time.monotonic(), 0
try:
    for _ in loader:
        last, batches = time.monotonic(), batches + 1
    result = {"error": None}
except Exception as e:
    result = {"error": type(e).__name__, "message": str(e), "runtime_error": isinstance(e, RuntimeError)}
result.update(batches=batches, waited=time.monotonic() - last, at=time.time())
print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tok = SentencePieceTokenizer(tokenizer_path())
    prefix = tmp_path_factory.mktemp("stall") / "docs"
    write_corpus(prefix, tok, random_documents(np.random.default_rng(7), 16))
    return prefix


def _gone(pid: int, within: float) -> bool:
    """Has process `pid` ended (or become a zombie) within `within` seconds?"""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _assert_names_the_stall(message: str, fifo: Path) -> None:
    who = json.loads(Path(f"{fifo}.who").read_text())
    stalled = json.loads(Path(f"{fifo}.sample").read_text())
    k = stalled["sample"]
    assert f"worker {who['worker']} (pid {who['pid']}) has been building sample {k} for " in message, message
    assert stalled["prefix"] in message, message
    for d, a, b in stalled["segments"]:
        assert f"doc {d} tokens [{a}, {b})" in message, message


# A spawned worker imports torch before its first sample: give that time on a busy CI machine.
@pytest.mark.parametrize("context, timeout", [("fork", 10.0), ("spawn", 30.0)])
def test_stuck_worker_is_named_within_the_timeout(corpus, tmp_path, context, timeout):
    k = 5
    fifo = tmp_path / "stall.fifo"
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'reliability'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-c", _DRIVER, str(corpus), str(k), context, str(fifo), str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=env)  # a hang raises TimeoutExpired
    ended = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit code {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    assert result["error"] == "LoaderTimeoutError" and result["runtime_error"], result
    assert f"no batch from the data-loader workers within {timeout:g} s (--loader-timeout)" in result["message"]
    _assert_names_the_stall(result["message"], fifo)
    assert result["batches"] == k  # every batch before the stuck sample, none after it
    assert timeout <= result["waited"] < timeout + 20, result  # from the last batch to the error
    assert ended - result["at"] < 30, f"the process took {ended - result['at']:.0f} s to end after the error"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # the workers ended quietly
    assert _gone(json.loads(Path(f"{fifo}.who").read_text())["pid"], within=10), "the stuck worker outlived its loader"


def test_trainer_stops_with_one_line_and_keeps_the_last_checkpoint(training_data, tmp_path, monkeypatch):
    """Sample 6 is the first of step 4 (2 samples per step); a checkpoint was written at step 2."""
    timeout = 5
    fifo = tmp_path / "stall.fifo"
    monkeypatch.setenv("STALL_SAMPLE", "6")
    monkeypatch.setenv("STALL_FIFO", str(fifo))
    log = tmp_path / "out.log"
    proc = start_training(training_flags(training_data, tmp_path, "--loader-timeout", timeout), log,
                          driver=STALL_DRIVER)
    try:
        code = proc.wait(timeout=300)
        ended = time.time()
        who = Path(f"{fifo}.who")
        # checked before kill_group below, which would end a worker left behind
        worker_gone = who.exists() and _gone(json.loads(who.read_text())["pid"], within=10)
    finally:
        kill_group(proc)
    output = log.read_text(errors="replace")
    assert code == 2, f"exit status {code}:\n{output[-6000:]}"
    errors = [line for line in output.splitlines() if line.startswith("llava-pretrain: error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-6000:]
    assert f"no batch from the data-loader workers within {timeout} s (--loader-timeout)" in errors[0]
    _assert_names_the_stall(errors[0], fifo)
    stalled_at = os.stat(f"{fifo}.who").st_mtime
    assert ended - stalled_at < timeout + 40, f"exited {ended - stalled_at:.0f} s after the worker stalled"
    # nothing half-done: the checkpoint of step 2 is still the newest and nothing else was started
    ckpt = tmp_path / "ckpt"
    assert tracker(ckpt) == 2
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["iter_0000002"]
    assert worker_gone, "the stuck worker outlived training"
