"""Plumbing shared by every test directory (importable as `helpers`: pytest puts tests/ on
sys.path for tests/conftest.py): a free TCP port, the test tokenizer, JSONL logs, and the two
ways tests start distributed processes.

- `run_distributed(fn, N, ...)`: a function on N spawned processes joined by a gloo group, its
  results collected here (what torchrun would start, for work done inside the test's own code).
- `start_pretrain` / `start_ranks` / `wait_ranks` / `run_ranks`: `python -m engine.pretrain` as
  real subprocesses, one per rank with the torchrun environment, so exit codes, signals,
  checkpoint writer processes and data-loader workers behave as in a real run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from engine.convert.ranks import free_port  # noqa: F401  (the one free-port helper, for the tests too)

REPO = Path(__file__).resolve().parents[1]


def tokenizer_path() -> str:
    """The real LLaMA-family SentencePiece model: mistral-common's tokenizer.model.v1, or the copy
    LLAVA_TOKENIZER_MODEL points at (GPU machines without mistral-common)."""
    if os.environ.get("LLAVA_TOKENIZER_MODEL"):
        return os.environ["LLAVA_TOKENIZER_MODEL"]
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return str(path)


def read_jsonl(path: Path, kind: str | None = None, *, killed: bool = False) -> list[dict]:
    """The records of a JSONL file (those whose "kind" is `kind`, when given). `killed`: the
    writer may have been killed, so a missing file is empty and a cut-short last line is dropped."""
    path = Path(path)
    if killed and not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if killed and i == len(lines) - 1:
                break
            raise
    return [r for r in records if kind is None or r.get("kind") == kind]


# ---------------------------------------------------------------------------- a function on N ranks


def _worker(fn, rank: int, world_size: int, port: int, args, kwargs, results) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        import torch

        torch.set_num_threads(1)
        from engine.platform import setup_platform

        setup_platform()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(*args, **kwargs)
        torch.distributed.barrier()
        results.put((rank, True, out))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """`fn(*args, **kwargs)` on ranks 0..world_size-1 of a gloo group; returns what each returned.

    `fn` must be importable by name (a module-level function of a test module); it runs after
    `engine.platform.setup_platform()` (the megatron-core CPU mode) and
    `torch.distributed.init_process_group("gloo")`, with RANK/WORLD_SIZE/LOCAL_RANK set, one thread
    per process. Megatron-core's model-parallel groups are left to `fn`
    (`engine.platform.init_distributed(tp, pp)`). A failure on any rank raises here with that rank's
    traceback; the processes are killed after `timeout` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = [None] * world_size, []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout} s") from None
            if ok:
                out[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            if errors or p.is_alive():
                p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
            p.join()
    if errors:
        raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    return out


# ---------------------------------------------------------------------------- engine.pretrain processes


@dataclass
class Rank:
    proc: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_pretrain(argv: list, log: Path, *, rank: int = 0, world: int = 1, port: int | None = None,
                   driver: str | None = None, own_group: bool = False, preexec_fn=None,
                   pythonpath: tuple = ()) -> Rank:
    """`python -m engine.pretrain ARGV` as rank `rank` of `world`, from the repository root, output
    to `log`. `driver`: Python source run instead of the module (it reads sys.argv[1:] as the
    flags); `own_group`: in its own process group, so that `kill_group` takes its data-loader
    workers and checkpoint writers too; `pythonpath`: folders its imports need besides the repo."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port or free_port()), OMP_NUM_THREADS="1" if world > 1 else "2",
               PYTHONPATH=os.pathsep.join([str(REPO), *map(str, pythonpath), os.environ.get("PYTHONPATH", "")]))
    head = ["-c", driver] if driver else ["-m", "engine.pretrain"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *head, *map(str, argv)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=own_group, preexec_fn=preexec_fn)
    return Rank(proc, Path(log))


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a process started with `own_group`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_ranks(argv: list, nproc: int, logdir: Path, driver: str | None = None) -> list[Rank]:
    """`nproc` ranks of one run, the way torchrun starts them; rank r logs to LOGDIR/rank{r}.log.
    `driver`: as for `start_pretrain`."""
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [start_pretrain(argv, logdir / f"rank{r}.log", rank=r, world=nproc, port=port, driver=driver)
            for r in range(nproc)]


def wait_ranks(ranks: list[Rank], timeout: float = 300) -> list[int]:
    """The exit codes; a rank still running after `timeout` seconds is killed."""
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


def run_ranks(argv: list, nproc: int, logdir: Path, timeout: float = 300, check: bool = True,
              driver: str | None = None) -> list[Rank]:
    """Run to completion; with `check`, fail showing every rank's output unless all exit 0."""
    ranks = start_ranks(argv, nproc, logdir, driver)
    codes = wait_ranks(ranks, timeout)
    if check and any(codes):
        logs = "\n".join(f"--- rank {i} (exit {c}) ---\n{r.output[-6000:]}" for i, (r, c) in
                         enumerate(zip(ranks, codes)))
        raise AssertionError(f"engine.pretrain {' '.join(map(str, argv))} failed:\n{logs}")
    return ranks
