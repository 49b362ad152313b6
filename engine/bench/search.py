"""The fastest memory setting that fits: the training benchmark's `--search`.

Activation recompute and optimizer offload each trade speed for memory. The search tries
settings in order of expected speed, the recompute ladder outside and the optimizer placement
inside:

    no recompute  ->  selective (core_attn, mlp)  ->  full recompute of the first 1/4, 1/2, 3/4 of
    each stage's layers (block)  ->  full recompute of every layer (uniform, 1)
    each first with the optimizer state on the GPU, then with it offloaded (--optimizer-cpu-offload)

and measures every setting that is not dominated: once a setting fits, any later one that
recomputes as much or more with the same or more offload would only be slower, so it is skipped
(recorded as such). Each attempt runs in its own process (`runner`), so an out-of-memory attempt
leaves nothing behind for the next; it is recorded with its outcome. The fastest measured
setting (tokens/s) is the answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.model.recompute import Recompute

OOM_EXIT = 3  # the exit status of a plain benchmark run that ran out of GPU memory


class OutOfMemory(Exception):
    """An attempt did not fit under the memory cap."""


@dataclass(frozen=True)
class Setting:
    """One point of the search: how much is recomputed (`level`: 0 = nothing, higher = more) and
    whether the optimizer state is offloaded."""

    level: int
    recompute: Recompute | None
    offload: bool

    def flags(self) -> list[str]:
        """The benchmark flags (the same as llava-pretrain's) of this setting."""
        out = []
        r = self.recompute
        if r is not None:
            out += ["--recompute-granularity", r.granularity]
            if r.granularity == "full":
                out += ["--recompute-method", r.method, "--recompute-num-layers", str(r.num_layers)]
            else:
                out += ["--recompute-modules", *r.modules]
        return out + (["--optimizer-cpu-offload"] if self.offload else [])

    def describe(self) -> str:
        return f"recompute {self.recompute.describe() if self.recompute else 'none'}, " \
               f"optimizer {'offloaded' if self.offload else 'on GPU'}"

    def dominates(self, other: Setting) -> bool:
        """`other` saves memory in every way this one does, and so is no faster."""
        return other.level >= self.level and other.offload >= self.offload


def ladder(layers_per_stage: int) -> list[Setting]:
    """Every setting to try, in order of expected speed."""
    recomputes = [None, Recompute("selective", modules=("core_attn", "mlp"))]
    blocks = sorted({max(1, layers_per_stage * q // 4) for q in (1, 2, 3)} - {layers_per_stage})
    recomputes += [Recompute("full", "block", n) for n in blocks] + [Recompute("full", "uniform", 1)]
    return [Setting(level, r, offload) for level, r in enumerate(recomputes) for offload in (False, True)]


def search(settings: list[Setting], runner: Callable[[Setting], dict], log=print) -> tuple[dict | None, list[dict]]:
    """Run `runner` on each setting not dominated by one that fitted. Returns the fastest row (None
    when nothing fits) and one row per setting: its outcome ("ok", "out_of_memory", "skipped")."""
    attempts, fitted = [], []
    for s in settings:
        row = {"pipeline": "search-attempt", "setting": s.describe(), "flags": s.flags()}
        if any(f.dominates(s) for f in fitted):
            attempts.append(row | {"outcome": "skipped", "reason": "a setting with less recompute or offload fits"})
            continue
        log(f"# search: {s.describe()}")
        try:
            result = runner(s)
        except OutOfMemory as e:
            attempts.append(row | {"outcome": "out_of_memory", "detail": str(e)})
            continue
        fitted.append(s)
        attempts.append(row | {"outcome": "ok", "tokens_per_s": result["tokens_per_s"],
                               "peak_memory_gib": result.get("peak_memory_gib"), "result": result})
    ok = [a for a in attempts if a["outcome"] == "ok"]
    if not ok:
        return None, attempts
    best = max(ok, key=lambda a: a["tokens_per_s"])
    return best["result"] | {"pipeline": "search-best", "setting": best["setting"], "flags": best["flags"]}, attempts


def single_process_env() -> dict:
    """An attempt is a one-process run with its own rendezvous: the caller's MASTER_PORT may be
    taken (by the caller itself, or by the previous attempt's lingering socket)."""
    from engine.convert.ranks import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return env | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def process_runner(benchmark_argv: list[str], timeout: float | None = None) -> Callable[[Setting], dict]:
    """Each setting as `python -m engine.cli.benchmark BENCHMARK_ARGV + its flags`, in a fresh
    process; its exit status OOM_EXIT means out of memory."""

    def run(setting: Setting) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.jsonl"
            argv = [sys.executable, "-m", "engine.cli.benchmark", *benchmark_argv, *setting.flags(), "--json-out", str(out)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=single_process_env())
            if proc.returncode == OOM_EXIT:
                raise OutOfMemory(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "out of memory")
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark attempt ({setting.describe()}) failed with exit status "
                                   f"{proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            return json.loads(out.read_text().splitlines()[0])

    return run
