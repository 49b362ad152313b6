"""`kill -9` of `python tools/preprocess_interleaved.py` at many points; the rerun ends byte-identical.

The tool runs as a real process with two spawned workers on the bundled sample corpus (real
photos, real prose) plus a few broken documents, in parts of 3 documents. It is killed with
SIGKILL (its whole process group, or the main process alone, leaving its workers orphaned) after
a seeded random delay, after N parts are finished, while a part is being written, or while the
final dataset is being assembled. Then the same command runs again and must produce the same
`.idx`, `.tokens.bin`, `.images.bin`, `.errors.jsonl` and summary counts as an uninterrupted run,
reusing the parts that were finished.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.data.format import dataset_paths
from helpers import tokenizer_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "data"
VOLATILE = {"elapsed_s", "docs_per_s", "images_per_s", "parts_reused", "output_prefix"}
BROKEN = [
    '{"images": ["skimage/gone.jpg", null], "texts": [null, "The picture is missing."]}',
    '{"images": ["../../README.md"], "texts": [null]}',
    '{"images": [null, "skimage/chelsea.jpg"], "texts": ["cut in the middle',
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The sample lectures with broken documents between them, and the MMC4 sample (a JSON list)."""
    root = tmp_path_factory.mktemp("kill")
    lines = (SAMPLE / "textbook_sample.jsonl").read_text().splitlines()
    for k, bad in enumerate(BROKEN):
        lines.insert(5 + 9 * k, bad)
    (root / "lectures.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(SAMPLE / "mmc4_sample.json", root / "mmc4.json")
    return root


_ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # the script imports this checkout's engine


def _command(corpus: Path, prefix: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "preprocess_interleaved.py"),
            "--input", str(corpus / "lectures.jsonl"), str(corpus / "mmc4.json"),
            "--image-root", str(SAMPLE / "images"), "--tokenizer-model", tokenizer_path(),
            "--output-prefix", str(prefix), "--workers", "2", "--docs-per-part", "3", "--no-progress"]


def _outputs(prefix: Path) -> dict:
    files = {p.name.split(".", 1)[1]: p.read_bytes() for p in [*dataset_paths(prefix), Path(f"{prefix}.errors.jsonl")]}
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    return {**files, "summary": {k: v for k, v in summary.items() if k not in VOLATILE}}


def _run_to_completion(corpus: Path, prefix: Path) -> dict:
    proc = subprocess.run(_command(corpus, prefix), capture_output=True, text=True, timeout=300, env=_ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ref") / "ds"
    summary = _run_to_completion(corpus, prefix)
    assert summary["documents_skipped"] == len(BROKEN) and summary["parts"] > 8
    return _outputs(prefix)


def _done_parts(prefix: Path) -> int:
    return len(list(Path(f"{prefix}.parts").glob("*.done.json")))


def _condition(when: str, arg, prefix: Path, start: float):
    """A predicate: is it time to kill?"""
    parts = Path(f"{prefix}.parts")
    if when == "delay":
        return lambda: time.monotonic() - start >= arg
    if when == "parts":
        return lambda: _done_parts(prefix) >= arg
    if when == "writing_part":  # a part's files exist under .tmp names after `arg` parts are done
        return lambda: _done_parts(prefix) >= arg and any(parts.glob("*.tmp"))
    if when == "assembling":  # the final dataset's temporary files, or the summary written before them
        return lambda: any(Path(prefix).parent.glob(f"{Path(prefix).name}.*.tmp")) or \
            Path(f"{prefix}.summary.json").exists()
    raise ValueError(when)


def _start_and_kill(corpus: Path, prefix: Path, when: str, arg, target: str) -> dict:
    """Start the tool, SIGKILL it when the condition holds; returns what happened."""
    proc = subprocess.Popen(_command(corpus, prefix), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_ENV, start_new_session=True)  # its own process group: the workers are in it
    start = time.monotonic()
    ready = _condition(when, arg, prefix, start)
    workers: set[int] = set()
    try:
        while proc.poll() is None and not ready():
            if time.monotonic() - start > 120:
                raise AssertionError(f"condition {when}={arg} never held")
            if target == "main":  # remember the workers, to end them once orphaned
                try:
                    workers |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
                except psutil.NoSuchProcess:
                    pass
        finished = proc.poll() is not None
        if not finished:
            if target == "group":
                os.killpg(proc.pid, signal.SIGKILL)
            else:  # the main process alone; its workers are orphaned
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in workers:  # orphans of a main-only kill: ours, ended by pid
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    return {"finished": finished, "parts_done": _done_parts(prefix) if Path(f"{prefix}.parts").is_dir() else None,
            "seconds": round(time.monotonic() - start, 3)}


_rng = random.Random(20261124)
CASES = [
    ("parts", 1, "group"),
    ("writing_part", 3, "group"),
    ("writing_part", 8, "main"),
    ("assembling", None, "group"),
    *[("delay", round(_rng.uniform(0.05, 3.0), 2), "group") for _ in range(2)],
]


@pytest.mark.parametrize("when,arg,target", CASES, ids=[f"{w}={a}-{t}" for w, a, t in CASES])
def test_killed_run_resumes_to_identical_output(corpus, reference, tmp_path, when, arg, target):
    prefix = tmp_path / "ds"
    event = _start_and_kill(corpus, prefix, when, arg, target)
    if when != "delay":  # the conditions are met well before the run ends: it was killed
        assert not event["finished"], event
    if when in ("parts", "writing_part"):  # killed before assembly: nothing opens as a dataset
        assert not dataset_paths(prefix)[0].exists()
    summary = _run_to_completion(corpus, prefix)
    assert _outputs(prefix) == reference, event
    assert not Path(f"{prefix}.parts").exists()
    if not event["finished"] and event["parts_done"]:
        assert summary["parts_reused"] >= min(event["parts_done"], summary["parts"]), (event, summary)


def test_killed_twice_then_completed(corpus, reference, tmp_path):
    prefix = tmp_path / "ds"
    first = _start_and_kill(corpus, prefix, "parts", 2, "group")
    second = _start_and_kill(corpus, prefix, "writing_part", 5, "group")
    assert not first["finished"] and not second["finished"]
    assert second["parts_done"] >= 5
    summary = _run_to_completion(corpus, prefix)
    assert summary["parts_reused"] >= 5
    assert _outputs(prefix) == reference
