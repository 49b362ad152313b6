"""Hugging Face exports of checkpoints while training runs (--export-hf-interval N).

Every N-th checkpoint this run publishes is exported to ``<save>/hf/iter_XXXXXXX`` by
``llava-convert export`` in a background process at low priority (``os.nice``), so training does
not wait for it. The native checkpoint stays the resumable one; the export is a by-product:

- Rank 0 notices a published checkpoint by its tracker file (`checkpoint.read_tracker`), after a
  synchronous save or once an asynchronous one is finalised, and asks for an export then.
- The checkpoint's files are hard-linked into ``<save>/hf/.src_iter_XXXXXXX`` first, so
  ``--keep-last`` may delete the checkpoint meanwhile; the export writes
  ``<save>/hf/.tmp_iter_XXXXXXX`` and is renamed to ``iter_XXXXXXX`` when it succeeded, so a
  directory of that name is always complete.
- One export at a time: a checkpoint published while one runs waits, and only the newest waiting
  one is exported. ``--export-hf-keep K`` keeps the K newest exports.
- A failed export is logged with its log file (``<save>/hf/iter_XXXXXXX.log``) and training goes
  on. At the end of the run the exporter waits for the export in progress.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.training.checkpoint import iteration_dir, read_tracker

NICENESS = 10
# Variables of the training job's process group that the export (a job of its own) must not see.
_JOB_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID")


def _lower_priority() -> None:
    os.nice(NICENESS)


class HfExporter:
    """Rank 0's background exports of every `interval`-th checkpoint published under `save`."""

    def __init__(self, save: str | Path, interval: int, keep: int | None, tokenizer: str, log=print):
        self.root = Path(save)
        self.out = self.root / "hf"
        self.interval, self.keep, self.tokenizer, self.log = interval, keep, str(tokenizer), log
        self.seen = read_tracker(self.root) if (self.root / "latest_checkpointed_iteration.txt").is_file() else None
        self.published = 0  # checkpoints this run has published
        self.waiting: int | None = None  # the newest iteration due for export
        self.running: tuple[subprocess.Popen, int, Path] | None = None

    def poll(self) -> None:
        """Note a newly published checkpoint, reap a finished export, start the next one."""
        newest = read_tracker(self.root) if (self.root / "latest_checkpointed_iteration.txt").is_file() else None
        if newest is not None and newest != self.seen:
            self.seen = newest
            self.published += 1
            if self.published % self.interval == 0:
                self._link(newest)
        if self.running is not None and self.running[0].poll() is not None:
            self._finish()
        if self.running is None and self.waiting is not None:
            self._start(self.waiting)
            self.waiting = None

    def close(self) -> None:
        """Wait for the export in progress (and start and wait for one still due)."""
        self.poll()
        while self.running is not None:
            self.log(f"waiting for the Hugging Face export of iteration {self.running[1]} (log {self.running[2]})")
            self.running[0].wait()
            self.poll()

    def _paths(self, iteration: int) -> tuple[Path, Path, Path, Path]:
        name = iteration_dir(self.out, iteration).name
        return self.out / f".src_{name}", self.out / f".tmp_{name}", self.out / name, self.out / f"{name}.log"

    def _link(self, iteration: int) -> None:
        """Hard-link the checkpoint's files now: --keep-last may delete it before its turn."""
        src, _, _, _ = self._paths(iteration)
        if self.waiting is not None:
            shutil.rmtree(self._paths(self.waiting)[0], ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(src, ignore_errors=True)
        try:
            shutil.copytree(iteration_dir(self.root, iteration), src, copy_function=os.link)
        except OSError:  # another file system or no hard links: copy
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(iteration_dir(self.root, iteration), src)
        self.waiting = iteration

    def _start(self, iteration: int) -> None:
        src, tmp, _, log_path = self._paths(iteration)
        shutil.rmtree(tmp, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
        command = [sys.executable, "-m", "engine.cli.convert", "export", "--source", str(src), "--target", str(tmp),
                   "--tokenizer", self.tokenizer]
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_lower_priority, cwd=os.getcwd())
        self.running = (proc, iteration, log_path)
        self.log(f"exporting iteration {iteration} to Hugging Face in the background: {self._paths(iteration)[2]} "
                 f"(log {log_path})")

    def _finish(self) -> None:
        proc, iteration, log_path = self.running
        self.running = None
        src, tmp, final, _ = self._paths(iteration)
        shutil.rmtree(src, ignore_errors=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"the Hugging Face export of iteration {iteration} failed (exit status {proc.returncode}); "
                     f"see {log_path}. Training goes on; the checkpoint itself is intact")
            return
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        self.log(f"exported iteration {iteration} to {final}")
        if self.keep:
            done = sorted(p for p in self.out.glob("iter_*") if p.is_dir())
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
                Path(f"{old}.log").unlink(missing_ok=True)
