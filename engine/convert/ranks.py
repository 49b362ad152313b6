"""One CPU process per TP x PP rank, for the converters.

Conversion never uses a GPU: the layout is independent of the hardware, and CPU memory is what
bounds it. A rank that meets bad input (a corrupt shard, a missing tensor) raises an engine error
there; it crosses back to the parent as a `RankFailure` record (type name + message) and is raised
again as the same class, "rank N: <message>", so the caller reports it like any other bad input.
Any other exception in a rank is a bug and surfaces with its traceback, as torch reports it.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

from engine.errors import EngineError, RankFailure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, fn, spec: dict, failures: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        fn(rank, spec)
    except EngineError as e:
        RankFailure.of(rank, e).write(failures)
        sys.exit(1)


def run_ranks(fn, world: int, spec: dict) -> None:
    """`fn(rank, spec)` on `world` fresh CPU processes that form one gloo group (MASTER_ADDR/PORT
    set, no GPU visible). Raises the first failed rank's engine error in this process."""
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="ranks-") as failures:
            try:
                mp.start_processes(_rank_entry, args=(world, fn, spec, failures), nprocs=world, join=True,
                                   start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                reported = RankFailure.read_all(failures)
                if not reported:
                    raise
                # The rank torch saw fail first, when it left a record; else the lowest rank that did.
                first = next((f for f in reported if f.rank == e.error_index), reported[0])
                raise first.error() from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
