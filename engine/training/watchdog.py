"""A heartbeat per rank, watched by another rank, so that a rank that dies (kill -9, the
out-of-memory killer, a lost node) or freezes stops the whole run within --heartbeat-timeout,
with a message naming it.

Without it the survivors learn of a lost rank only from the collective they next wait in: NCCL
never notices and waits until --distributed-timeout-minutes; gloo notices a closed connection at
once but raises a bare "Connection closed by peer" traceback, and a frozen rank (a node that
stopped answering, a SIGSTOPped process) keeps its connections open, so gloo waits too.

Each rank runs a daemon thread with its own client connection to the process group's store
(the TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's, or rank 0's). Every timeout/4 seconds it
bumps its own counter there and reads the counter of the next rank (rank + 1 mod world: one
watcher per rank, so the store's load grows with the world size, not its square). A counter that
has not moved for the timeout means that rank is lost: the watcher writes a verdict naming it
into the store, and every rank's thread, seeing the verdict (or reaching it first), prints it as
one line and ends its process with EXIT_LOST: no rank waits in a collective for a peer that is
gone. A store that cannot be reached while nobody has finished means its host is lost (rank 0
when not under torchrun). A rank that ends its run (normally or with an error of its own) first
says so in the store, and the watchers stop: the run is ending.

The main thread, when a collective fails under it (gloo's closed connection), asks `explain`:
it waits up to the timeout for the verdict, so the run ends with the lost rank's name rather
than a traceback (under torchrun, whose SIGTERM to the survivors is ignored meanwhile).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch

EXIT_LOST = 4  # the exit status of every rank when one was lost


class Watchdog:
    def __init__(self, timeout: float, rank: int, world: int, host: str, port: int, log=print):
        self.timeout, self.rank, self.world, self.log = timeout, rank, world, log
        self.interval = timeout / 4
        self.peer = (rank + 1) % world
        self.address = f"{host}:{port}"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts reuse its store
        self.prefix = f"llava/heartbeat/{attempt}/"
        self.store = torch.distributed.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                                timeout=datetime.timedelta(seconds=max(self.interval, 1.0)))
        self.store.set(self._key("beat", rank), "0")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-watchdog", daemon=True)
        self._thread.start()

    def _key(self, kind: str, rank: int | None = None) -> str:
        return self.prefix + kind + ("" if rank is None else f"/{rank}")

    def stop(self) -> None:
        """This rank ends its run: it is no longer watched, and stops watching."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.add(self._key("done"), 1)
        except RuntimeError:
            pass  # the store is gone: so is the run
        self._thread.join(timeout=self.interval + 5)

    def explain(self) -> None:
        """Called when a collective failed under this rank: give the watcher the time to find
        the lost rank (it then ends the process); returns if none is found. torchrun's SIGTERM
        to the survivors is ignored meanwhile, and errors raised by signal handlers (data-loader
        workers that torchrun stopped) do not cut the wait short."""
        if self._stop.is_set():
            return
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        try:
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:
                    self._thread.join(timeout=deadline - time.monotonic())
                except Exception:  # noqa: S112 - raised by a signal handler meanwhile
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        count, seen, changed, finishing = 0, None, time.monotonic(), False
        while not self._stop.wait(self.interval):
            count += 1
            try:
                self.store.set(self._key("beat", self.rank), str(count))
                if self.store.check([self._key("verdict")]):
                    self._end(self.store.get(self._key("verdict")).decode())
                finishing = int(self.store.add(self._key("done"), 0)) > 0
                if finishing:
                    return  # a rank has ended its run: they all are ending theirs
                value = self.store.get(self._key("beat", self.peer)) if self.store.check(
                    [self._key("beat", self.peer)]) else None
            except RuntimeError as e:  # the store's host is gone
                if self._stop.wait(self.interval) or finishing:
                    return  # this rank is ending its run too
                self._end(f"rank 0 (of {self.world}) or the store it hosts at {self.address} was lost "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})")
            now = time.monotonic()
            if value != seen:
                seen, changed = value, now
            elif now - changed > self.timeout:
                self._end(self._post(f"rank {self.peer} (of {self.world}) was lost: no heartbeat from it for "
                                     f"{now - changed:.0f} s (--heartbeat-timeout {self.timeout:g}); every rank "
                                     "stops. A rerun resumes from the newest complete checkpoint"))

    def _post(self, verdict: str) -> str:
        """The verdict in the store for every rank; the first one posted stands."""
        try:
            self.store.compare_set(self._key("verdict"), "", verdict)
            return self.store.get(self._key("verdict")).decode()
        except RuntimeError:
            return verdict

    def _end(self, verdict: str) -> None:
        if self._stop.is_set():
            return  # this rank is ending its run by itself
        print(f"llava-pretrain: error: {verdict}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST)


def start_watchdog(timeout: float, log=print) -> Watchdog | None:
    """A running watchdog for this rank, or None (one rank, or --heartbeat-timeout 0)."""
    if not timeout or not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        log("--heartbeat-timeout: no MASTER_ADDR/MASTER_PORT (the store of the process group): ranks are not watched")
        return None
    return Watchdog(timeout, torch.distributed.get_rank(), torch.distributed.get_world_size(), host, int(port), log)
