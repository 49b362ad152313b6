"""Writing checkpoints: atomically, and published only once every rank agrees that its part worked.

A save runs in phases: prepare the directory (rank 0), plan and stage the shards (mcore), write
them (in this process, or in a background process with --async-save: then the phases after it
run when the write is finalized), mcore's finalisation (the shards' metadata), and publish
(rank 0: rename `.tmp_iter_N` to `iter_N`, then rewrite the tracker; checkpoint.py describes
the layout). A phase never raises on its own: a failure (a full disk, no permission, a file too
large) is kept, and after the phase every rank reports how it went to every other in an
all_gather_object on a gloo group of the saver's own, which every rank reaches whatever
happened in the phase. If any rank failed, every rank raises the same CheckpointError, naming
that rank, its cause and the checkpoint a resume would use, and rank 0 alone removes the
half-written directory. A disk that fills up on one node therefore stops every rank within
seconds with one message, rather than leaving the others waiting in a collective until
--distributed-timeout-minutes; nothing half-written is ever published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import re
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.training.checkpoint import (OPTIM_LAYOUTS, TRACKER, _adam_steps, _layout, _rank, _state_dict, _unwrap,
                                        iteration_dir, read_tracker)


class Saver:
    """Saves checkpoints under one root; with `async_save` the tensor writes run in the background
    and the rename + tracker update happen when they complete (`finalize`). Each rank writes its
    shards with `threads` threads; replicated tensors (e.g. the weights on every DP rank) are
    spread over the data-parallel ranks so that no rank writes everything (mcore's fully
    parallel save). Built on every rank (it creates the agreement group, a collective call)."""

    def __init__(self, root: str | Path, keep_last: int | None = None, async_save: bool = False,
                 log=print, optim_layout: str = "dp", threads: int = 2, with_optimizer: bool = True):
        if optim_layout not in OPTIM_LAYOUTS:
            raise ValueError(f"optim_layout must be one of {sorted(OPTIM_LAYOUTS)}, got {optim_layout!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.log = log
        self.optim_metadata = OPTIM_LAYOUTS[optim_layout]
        self.threads = threads
        self.with_optimizer = with_optimizer  # False: --no-save-optim
        multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.group = torch.distributed.new_group(backend="gloo") if multi else None
        self.async_queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def _strategy(self):
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        strategy = TorchDistSaveShardedStrategy(thread_count=self.threads)
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, group)
        return strategy

    def save(self, iteration: int, model, optimizer, scheduler, consumed_samples: int,
             model_config: ModelConfig, args_dict: dict | None = None, data_state: dict | None = None) -> None:
        start = time.perf_counter()
        self.finalize(blocking=True)  # never two saves in flight
        agreement = _Agreement(self, iteration)
        with agreement.phase():
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(agreement.tmp, ignore_errors=True)
                agreement.tmp.mkdir()
        agreement.agree()

        optimizer = optimizer if self.with_optimizer else None
        with agreement.phase():
            state = _state_dict(model, optimizer, loading=False, with_optimizer=True, with_rng=True,
                                optim_metadata=self.optim_metadata)
            state.update(
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                iteration=iteration,
                consumed_samples=consumed_samples,
                model_config=dataclasses.asdict(model_config),
                layout=_layout(),
                kernels=_unwrap(model).kernels.as_dict(),
                args=args_dict or {},
                adam_steps=_adam_steps(optimizer),
                data=data_state,  # the blend and what each source gave (engine/data/sources.py)
            )
            # Always as a request, so that its write and its finalisation are phases of their own.
            request = dist_checkpointing.save(state, str(agreement.tmp), sharded_strategy=self._strategy(),
                                              content_metadata=dict(self.optim_metadata),
                                              async_sharded_save=True, async_strategy="mcore")
        agreement.agree()

        conclude = partial(self._conclude, agreement, list(request.finalize_fns), start)
        with agreement.phase():
            if self.async_queue is None:
                _write_here(request)
            else:
                write = _ReportingWrite(request.async_fn, agreement.child_errors)
                self.async_queue.schedule_async_request(request._replace(async_fn=write, finalize_fns=[conclude]))
        agreement.agree()
        if self.async_queue is None:
            conclude()

    def _conclude(self, agreement: _Agreement, finalize_fns: list, start: float) -> None:
        """After the writes (on every rank): mcore's finalisation, then publishing."""
        agreement.collect_child_error()
        with agreement.phase():
            for fn in finalize_fns:
                fn()
        agreement.agree()
        with agreement.phase():
            if _rank() == 0:
                self._publish(agreement.tmp, agreement.iteration)
        agreement.agree()
        self.log(f"saved checkpoint {iteration_dir(self.root, agreement.iteration)} "
                 f"in {time.perf_counter() - start:.1f} s")

    def finalize(self, blocking: bool = False) -> None:
        """Publish a finished background save (every rank calls it: it is collective)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self.async_queue is not None:
            try:
                self.finalize(blocking=True)
            finally:
                self.async_queue.close()

    def _publish(self, tmp: Path, iteration: int) -> None:
        final = iteration_dir(self.root, iteration)
        if final.exists():  # saving the same iteration again (e.g. after a resume)
            shutil.rmtree(final)
        os.rename(tmp, final)
        tracker_tmp = self.root / (TRACKER + ".tmp")
        try:
            with open(tracker_tmp, "w") as f:
                f.write(f"{iteration}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tracker_tmp, self.root / TRACKER)
        except OSError:  # not published after all: the tracker still names the previous one
            tracker_tmp.unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            raise
        for stale in self.root.glob(".tmp_iter_*"):  # left by a save that was killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last:
            saved = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
            for old in saved[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


class _ReportingWrite:
    """The background write process's function: mcore's, reporting the first error mcore's writer
    logged (the cause, which mcore passes on only as a generic failure) through `errors`, a
    queue the process inherits when it is forked."""

    def __init__(self, write, errors):
        self.write, self.errors = write, errors

    def __call__(self, *args, **kwargs):
        records = _ErrorRecords()
        logging.getLogger("megatron.core.dist_checkpointing").addHandler(records)
        try:
            if self.write is not None:
                self.write(*args, **kwargs)
        except Exception as e:
            records.first = records.first or f"{type(e).__name__}: {e}"
            raise
        finally:
            self.errors.put(records.first)


def _write_here(request) -> None:
    """Write this rank's shards in this process: mcore's AsyncRequest.execute_sync without its
    barrier (the agreement that follows takes its place)."""
    args = list(request.async_fn_args)
    if request.preload_fn is not None:
        args[1] = request.preload_fn()
    if request.async_fn is not None:
        request.async_fn(*args, **request.async_fn_kwargs)


# --------------------------------------------------------------------------- the agreement


class _Agreement:
    """The phases of one save on this rank: what failed here (`own`), what mcore's coordinator
    reported of the other ranks (`reported`), and the collective verdict after each phase."""

    def __init__(self, saver: Saver, iteration: int):
        self.saver, self.iteration = saver, iteration
        self.tmp = saver.root / f".tmp_iter_{iteration:07d}"
        self.own: str | None = None
        self.reported: dict[int, str] = {}
        self.seen: str | None = None  # the error as it reached this rank (when nobody names a cause)
        self.logged: str | None = None  # the first error mcore's writer logged on this rank
        # From a background write (mcore forks its process):
        self.child_errors = multiprocessing.get_context("fork").SimpleQueue() if saver.async_queue else None

    def collect_child_error(self) -> None:
        """The background write has ended (mcore joined it): what its writer logged, if anything."""
        if self.child_errors is None:
            return
        while not self.child_errors.empty():
            self.logged = self.logged or self.child_errors.get()
        self.child_errors.close()
        self.child_errors = None

    @contextlib.contextmanager
    def phase(self):
        records = _ErrorRecords()
        writer_log = logging.getLogger("megatron.core.dist_checkpointing")
        writer_log.addHandler(records)
        try:
            yield
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            self.logged = self.logged or records.first
            self._note(e, self.logged)
        finally:
            writer_log.removeHandler(records)
            self.logged = self.logged or records.first  # a failed write surfaces in a later phase

    def _note(self, e: BaseException, logged: str | None) -> None:
        """mcore's writer threads report only a generic error upward and log the cause (on the
        rank that failed); its coordinator learns which ranks failed, the others only that
        something did. A cause of this rank is made precise by a test write (disk full, file
        size limit, no permission, with the space left)."""
        rank = _rank()
        failures = getattr(e, "failures", None) or {}  # {rank: (exception, traceback)}
        for r, (exc, _) in failures.items():
            self.reported.setdefault(r, f"{type(exc).__name__}: {exc}")
        self.seen = self.seen or f"{type(e).__name__}: {e}"
        if logged is not None:
            own = re.sub(r"^(Local worker \d+ encountered an error|An error is caught while starting worker \d+, "
                         r"error): ", "", logged)
        elif isinstance(e, CheckpointException):
            own = self.reported.get(rank)
        else:
            own = f"{type(e).__name__}: {e}"
        if own is not None and self.own is None:
            self.own = _probe_write(self.saver.root) or own

    def agree(self) -> None:
        """Collective: returns when every rank's phase went well; otherwise raises the same
        CheckpointError on every rank (rank 0 removes the half-written directory first)."""
        failed = self.own is not None or self.reported or self.seen is not None
        mine = (self.own, self.reported, self.seen, _newest(self.saver.root)) if failed else None
        group = self.saver.group
        if group is None:
            outcomes = [mine]
        else:
            outcomes = [None] * torch.distributed.get_world_size(group)
            torch.distributed.all_gather_object(outcomes, mine, group=group)
        if all(o is None for o in outcomes):
            return
        message = self._message(outcomes, multi=group is not None)
        if _rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointError(message)

    def _message(self, outcomes: list, multi: bool) -> str:
        causes = {r: o[0] for r, o in enumerate(outcomes) if o is not None and o[0] is not None}
        for o in outcomes:
            for r, text in (o[1] if o is not None else {}).items():
                causes.setdefault(r, text)
        if not causes:  # nobody knows why: the error as the first rank that saw one saw it
            causes = {r: o[2] for r, o in enumerate(outcomes) if o is not None}
        first = min(causes)
        where = ""
        if multi:
            others = sorted(set(causes) - {first})
            where = f" on rank {first}" + (f" (and on rank(s) {', '.join(map(str, others))})" if others else "")
        newest = next(o[3] for o in outcomes if o is not None)
        return (f"saving checkpoint iteration {self.iteration} under {self.saver.root} failed{where}: "
                f"{causes[first]}; the newest complete checkpoint is still {newest}")


def _newest(root: Path) -> str:
    try:
        newest = read_tracker(root)
    except CheckpointError as e:
        return f"unknown ({e})"
    return str(iteration_dir(root, newest)) if newest is not None else "none"


def _probe_write(directory: Path, nbytes: int = 64 << 20) -> str | None:
    """After a failed save: the OS error of writing a file of `nbytes` there (a full disk, a file
    size limit, no permission), with the space left; None when that works (the cause lies elsewhere)."""
    probe = directory / f".write_probe_{_rank()}"
    try:
        with open(probe, "wb") as f:
            block = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:
            free = f", {shutil.disk_usage(directory).free / 2**30:.2f} GiB free there"
        except OSError:
            free = ""
        return f"{e.strerror or e} (a test write to {directory} failed too{free})"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


class _ErrorRecords(logging.Handler):
    """Keeps the first error message logged while it is attached."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.first = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record.getMessage()
