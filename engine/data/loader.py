"""Micro-batches for one data-parallel rank: the sampler, the collate function, the DataLoader.

Sample order is global and deterministic: micro-step j of the whole data-parallel group covers
samples ``[consumed + j * B * DP, consumed + (j + 1) * B * DP)`` (B = micro-batch size, DP =
data-parallel size), and rank r takes its slice ``[r * B, (r + 1) * B)`` of each. Resuming from a
checkpoint therefore needs only the number of samples consumed so far, as in Megatron; gradient
accumulation just takes several micro-steps per optimizer step.

Images stay as stored (uint8) until `to_device` normalises them, the one place that does. Worker
processes are watched (`WatchedLoader`): one that dies, or hangs longer than the timeout, stops
the iteration with an error naming it and the sample it was building, instead of a bare torch
message or a wait without end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import torch

from engine.data.images import normalize
from engine.errors import LoaderTimeoutError, SampleError, WorkerDiedError


class PretrainingSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of sample indices) from `consumed_samples` on.

    With ``drop_last`` a final micro-step that is not full is skipped (every rank then stops
    at the same step); without it, each rank gets its part of that step, which may be short or
    empty (then skipped).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, drop_last: bool = True):
        if total_samples <= 0 or micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(f"need total_samples, micro_batch_size, data_parallel_size > 0, got "
                             f"{total_samples}, {micro_batch_size}, {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]")
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.world, self.drop_last = (micro_batch_size, data_parallel_rank,
                                                             data_parallel_size, drop_last)

    @property
    def global_size(self) -> int:
        return self.micro * self.world

    def __len__(self) -> int:
        left = self.total - self.consumed
        full, rest = divmod(left, self.global_size)
        return full + (rest > self.rank * self.micro and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while start + self.global_size <= self.total:
            lo = start + self.rank * self.micro
            yield list(range(lo, lo + self.micro))
            start += self.global_size
        if not self.drop_last:
            lo = start + self.rank * self.micro
            part = list(range(lo, min(lo + self.micro, self.total)))
            if part:
                yield part


def _output(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor | None:
    """In a DataLoader worker, an empty tensor in shared memory (as torch's default collate
    makes), so handing the batch to the training process copies nothing; elsewhere None."""
    if torch.utils.data.get_worker_info() is None:
        return None
    numel = 1
    for n in shape:
        numel *= n
    storage = like._typed_storage()._new_shared(numel, device=like.device)
    return like.new(storage).resize_(*shape)


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """Stack samples into the micro-batch of docs/internals.md: per-position tensors [B, S],
    images concatenated as stored (uint8 [ΣN, H, W, 3]; `to_device` normalises them), and image
    offsets / cu_seqlens moved into the flattened [B * S] sequence."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    seq = samples[0]["tokens"].shape[0]
    if any(s["tokens"].shape[0] != seq for s in samples):
        raise ValueError(f"samples of different lengths in one micro-batch: {[s['tokens'].shape[0] for s in samples]}")
    batch = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        parts = [s[key] for s in samples]
        batch[key] = torch.stack(parts, out=_output(parts[0], (len(parts), seq)))
    images = [s["images"] for s in samples]
    batch["images"] = torch.cat(images, out=_output(images[0], (sum(len(x) for x in images), *images[0].shape[1:])))
    batch["image_offsets"] = torch.cat([s["image_offsets"] + b * seq for b, s in enumerate(samples)])
    bounds = [s["cu_seqlens"][:-1] + b * seq for b, s in enumerate(samples)]
    bounds.append(torch.tensor([len(samples) * seq], dtype=torch.int32))
    batch["cu_seqlens"] = torch.cat(bounds).to(torch.int32)
    batch["max_seqlen"] = int(torch.diff(batch["cu_seqlens"]).max())
    return batch


def build_loader(dataset: torch.utils.data.Dataset, *, micro_batch_size: int, consumed_samples: int = 0,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, num_workers: int = 2,
                 prefetch_factor: int = 4, pin_memory: bool | None = None, drop_last: bool = True,
                 timeout: float = 0.0, multiprocessing_context: str | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's micro-batches of `dataset`, from `consumed_samples` on.

    Workers are persistent (the memory maps stay open between epochs of iteration), each keeps
    `prefetch_factor` micro-batches ready, and batches are pinned when CUDA is present. Images
    travel as stored (uint8); `to_device` normalises them. A sample that fails raises
    ``engine.data.dataset.SampleError`` in the training process, naming the sample and documents.

    `multiprocessing_context` ("fork", "forkserver", "spawn") defaults to torch's choice;
    datasets pickle cheaply (their memory maps are re-opened), so all of them work.

    With workers, the loader is a `WatchedLoader`: a worker that dies without a word raises
    `WorkerDiedError`, and with `timeout` > 0 (seconds; 0 waits forever) a batch that does not
    arrive in time raises `LoaderTimeoutError`; both name the worker and the sample it was
    building.
    """
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                 data_parallel_size, drop_last)
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds (0 waits forever), got {timeout}")
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    if num_workers == 0:
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)
    return WatchedLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=True, prefetch_factor=prefetch_factor,
                         timeout=timeout, multiprocessing_context=multiprocessing_context)


HOST_KEYS = ("cu_seqlens",)


def to_device(batch: dict[str, torch.Tensor | int], device: torch.device | str,
              non_blocking: bool = True) -> dict[str, torch.Tensor | int]:
    """The micro-batch on `device`, its uint8 images normalised there (`images.normalize`): the
    one place images are normalised, on the GPU or, in a CPU run, on the CPU, to the same values."""
    # `cu_seqlens` stays on the host: the model reads the document lengths there every micro-batch
    # and makes its own device copy; a device tensor would cost a device-to-host sync each time,
    # which stops the host from queueing work ahead of the GPU.
    out = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) and k not in HOST_KEYS else v
           for k, v in batch.items()}
    out["images"] = normalize(out["images"])
    return out


# --------------------------------------------------------------------------- watching the workers


class _Recorder(torch.utils.data.Dataset):
    """The dataset as the workers see it. Before building sample k a worker writes (its pid, k,
    the time) into its row of a table in shared memory, and clears the time once the sample is
    built: the training process reads the table to name a worker that died or hangs."""

    def __init__(self, dataset, num_workers: int):
        self.dataset = dataset
        # A row per worker: pid, sample, when it began (time.monotonic_ns(); 0 once built).
        self.table = torch.zeros((num_workers, 3), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return self.dataset[k]
        row = self.table[worker.id]
        row.copy_(torch.tensor([os.getpid(), k, time.monotonic_ns()]))
        try:
            return self.dataset[k]
        finally:
            row[2] = 0

    def dead(self) -> tuple[int, int] | None:
        """(pid, last sample) of a worker that has ended, or None."""
        for _ in range(20):  # the error may arrive a moment before the process is gone
            for pid, k, _ in self.table.tolist():
                if pid > 0 and _exited(pid):
                    return pid, k
            time.sleep(0.05)
        return None

    def building(self) -> list[tuple[float, int, int, int]]:
        """(seconds so far, worker id, pid, sample) of every worker building a sample now,
        the longest first."""
        now = time.monotonic_ns()
        rows = [((now - started) / 1e9, w, pid, k) for w, (pid, k, started) in enumerate(self.table.tolist())
                if started > 0]
        return sorted(rows, reverse=True)

    def describe(self, k: int) -> str:
        """Sample k and its documents, as far as the dataset can say."""
        if hasattr(self.dataset, "describe"):
            return self.dataset.describe(k)
        return f"sample {k} of {self.dataset!r}"


class WatchedLoader(torch.utils.data.DataLoader):
    """torch's DataLoader with its workers watched through a `_Recorder` around the dataset.

    A worker's death reaches the training process in several forms (torch's "DataLoader worker
    (pid N) exited unexpectedly", a connection reset while fetching a batch the dead worker had
    shared, ...): any error but a sample's own is checked against the recorded table and becomes
    a `WorkerDiedError`. torch's timeout (`timeout` seconds without a batch) becomes a
    `LoaderTimeoutError` naming the worker that hangs.
    """

    def __init__(self, dataset, *, num_workers: int, **kwargs):
        super().__init__(_Recorder(dataset, num_workers), num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator:
        batches = super().__iter__()  # starts the workers and installs torch's SIGCHLD handler
        _LIVE.add(self.dataset)
        _wrap_sigchld_handler()
        return self._watch(batches)

    def _watch(self, batches) -> Iterator:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (SampleError, WorkerDiedError):
                raise
            except Exception as e:
                named = self._name(e)
                if named is None:
                    raise
                # Stop the workers now (a hung one is terminated after a short grace), rather than
                # at exit, where ending them would raise again from torch's SIGCHLD handler.
                getattr(batches, "_shutdown_workers", lambda: None)()
                raise named from e
            yield batch

    def _name(self, error: Exception) -> Exception | None:
        found = self.dataset.dead()
        if found is not None:
            return WorkerDiedError(_died(self.dataset, *found, error))
        if self.timeout > 0 and str(error).startswith("DataLoader timed out"):
            return LoaderTimeoutError(_stuck(self.dataset, self.timeout))
        return None


def _died(recorder: _Recorder, pid: int, k: int, error: BaseException) -> str:
    return (f"DataLoader worker (pid {pid}) died while building sample {k} of {recorder.dataset!r}; rebuild it in "
            f"this process (dataset[{k}], or --num-workers 0) to see why [{type(error).__name__}: {error}]")


def _stuck(recorder: _Recorder, timeout: float) -> str:
    head = f"no batch from the data-loader workers within {timeout:g} s (--loader-timeout)"
    building = recorder.building()
    if not building:
        idle = [w for w, (pid, _, _) in enumerate(recorder.table.tolist()) if pid == 0]
        where = (f"worker(s) {', '.join(map(str, idle))} have not begun a sample yet (still starting?)" if idle
                 else "none of them is building a sample (the wait is in collation, pinning or the transfer)")
        return f"{head}, and {where}"
    (seconds, worker, pid, k), *others = building
    also = "".join(f"; worker {w} (pid {p}) has been building sample {j} for {s:.0f} s" for s, w, p, j in others)
    return (f"{head}: worker {worker} (pid {pid}) has been building sample {k} for {seconds:.0f} s "
            f"[{recorder.describe(k)}]{also}; a read that never returns (a network file system that "
            f"stopped answering?) is the usual cause")


_LIVE: weakref.WeakSet = weakref.WeakSet()  # the _Recorders of loaders being iterated
_sigchld_wrapped = False


def _wrap_sigchld_handler() -> None:
    """torch's SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal" wherever
    the training process happens to be; wrapped (once per process), it raises the
    WorkerDiedError instead."""
    global _sigchld_wrapped
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if _sigchld_wrapped or not callable(torch_handler) or threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        try:
            torch_handler(signum, frame)
        except RuntimeError as e:
            for recorder in list(_LIVE):
                found = recorder.dead()
                if found is not None:
                    raise WorkerDiedError(_died(recorder, *found, e)) from e
            raise

    signal.signal(signal.SIGCHLD, handler)
    _sigchld_wrapped = True


def _exited(pid: int) -> bool:
    """Has our child process `pid` ended? (Without reaping it: torch's own checks still see it.)"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True
