"""Run a function in N fresh CPU processes joined by a gloo process group (what torchrun would
start), and collect what each returns.

    results = run_distributed(fn, 4, arg1, arg2)   # fn(arg1, arg2) on ranks 0..3

`fn` must be importable by name (a module-level function of a test module); it runs after
`engine.platform.setup_platform()` (the megatron-core CPU mode) and
`torch.distributed.init_process_group("gloo")`, with RANK/WORLD_SIZE/LOCAL_RANK set, one thread
per process. Megatron-core's model-parallel groups are left to `fn`
(`engine.platform.init_distributed(tp, pp)`). A failure on any rank raises here with that rank's
traceback; the processes are killed after `timeout` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
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
