"""Micro-batches for one data-parallel rank: the sampler, the collate function, the DataLoader.

Sample order is global and deterministic: micro-step j of the whole data-parallel group covers
samples ``[consumed + j * B * DP, consumed + (j + 1) * B * DP)`` (B = micro-batch size, DP =
data-parallel size), and rank r takes its slice ``[r * B, (r + 1) * B)`` of each. Resuming from a
checkpoint therefore needs only the number of samples consumed so far, as in Megatron; gradient
accumulation just takes several micro-steps per optimizer step.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import torch

from engine.data.dataset import SampleError, normalize_channels_first
from engine.errors import WorkerDiedError


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


def _collate_images(images: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Concatenate images. uint8 [N, H, W, 3] images (as stored) are normalised straight into the
    batch (which saves a float copy of every image), or with ``normalize=False`` kept as they are."""
    if images[0].dtype != torch.uint8 or not normalize:
        return torch.cat(images, out=_output(images[0], (sum(len(x) for x in images), *images[0].shape[1:])))
    n, (h, w) = sum(len(x) for x in images), images[0].shape[1:3]
    like = torch.empty(0, dtype=torch.float32)
    out = _output(like, (n, 3, h, w))
    out = torch.empty((n, 3, h, w), dtype=torch.float32) if out is None else out
    start = 0
    for x in images:
        normalize_channels_first(x, out[start : start + len(x)])
        start += len(x)
    return out


def collate(samples: Sequence[dict[str, torch.Tensor]], normalize_images: bool = True) -> dict[str, torch.Tensor | int]:
    """Stack samples into the micro-batch of docs/internals.md: per-position tensors [B, S],
    images concatenated, and image offsets / cu_seqlens moved into the flattened [B * S] sequence.
    With ``normalize_images=False`` stored uint8 images stay uint8 [ΣN, H, W, 3] (see `to_device`)."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    seq = samples[0]["tokens"].shape[0]
    if any(s["tokens"].shape[0] != seq for s in samples):
        raise ValueError(f"samples of different lengths in one micro-batch: {[s['tokens'].shape[0] for s in samples]}")
    batch = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        parts = [s[key] for s in samples]
        batch[key] = torch.stack(parts, out=_output(parts[0], (len(parts), seq)))
    batch["images"] = _collate_images([s["images"] for s in samples], normalize_images)
    batch["image_offsets"] = torch.cat([s["image_offsets"] + b * seq for b, s in enumerate(samples)])
    bounds = [s["cu_seqlens"][:-1] + b * seq for b, s in enumerate(samples)]
    bounds.append(torch.tensor([len(samples) * seq], dtype=torch.int32))
    batch["cu_seqlens"] = torch.cat(bounds).to(torch.int32)
    batch["max_seqlen"] = int(torch.diff(batch["cu_seqlens"]).max())
    return batch


def build_loader(dataset: torch.utils.data.Dataset, *, micro_batch_size: int, consumed_samples: int = 0,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, num_workers: int = 2,
                 prefetch_factor: int = 4, pin_memory: bool | None = None, drop_last: bool = True,
                 normalize_images: bool = True,
                 multiprocessing_context: str | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's micro-batches of `dataset`, from `consumed_samples` on.

    Workers are persistent (the memory maps stay open between epochs of iteration), each keeps
    `prefetch_factor` micro-batches ready, and batches are pinned when CUDA is present. A sample
    that fails raises ``engine.data.dataset.SampleError`` in the training process, naming the
    sample and documents.

    ``normalize_images=False`` ships images as stored, uint8 [ΣN, H, W, 3]: a quarter of the
    bytes through shared memory, pinning and the host-to-device copy. `to_device` then
    normalises them on the device, to the same float32 values.

    `multiprocessing_context` ("fork", "forkserver", "spawn") defaults to torch's choice;
    datasets pickle cheaply (their memory maps are re-opened), so all of them work.

    A worker that dies without a word (killed, out of memory, a crash in native code) raises
    `WorkerDiedError` naming the sample it was building, when the training process next asks
    for a batch.
    """
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                 data_parallel_size, drop_last)
    workers = num_workers > 0
    dataset = _StoredImages(dataset) if hasattr(dataset, "get") else dataset
    return _Loader(
        _Tracked(dataset, num_workers) if workers else dataset,
        batch_sampler=sampler,
        collate_fn=collate if normalize_images else functools.partial(collate, normalize_images=False),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        multiprocessing_context=multiprocessing_context if workers else None,
    )


HOST_KEYS = ("cu_seqlens",)


def to_device(batch: dict[str, torch.Tensor | int], device: torch.device | str,
              non_blocking: bool = True) -> dict[str, torch.Tensor | int]:
    """The micro-batch on `device`; uint8 images (``normalize_images=False``) are normalised
    there, to exactly the values the workers would have produced."""
    # `cu_seqlens` stays on the host: the model reads the document lengths there every micro-batch
    # and makes its own device copy; a device tensor would cost a device-to-host sync each time,
    # which stops the host from queueing work ahead of the GPU.
    out = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) and k not in HOST_KEYS else v
           for k, v in batch.items()}
    if out["images"].dtype == torch.uint8:
        out["images"] = normalize_channels_first(out["images"])
    return out


class _StoredImages(torch.utils.data.Dataset):
    """A dataset's samples with their images as stored (uint8): `collate` normalises them into
    the batch. The batches are the same, bit for bit."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.dataset.get(k, normalize_images=False)


class _Tracked(torch.utils.data.Dataset):
    """Records in shared memory which sample each worker is building, so that a worker that
    dies without raising can still be named by the training process."""

    def __init__(self, dataset, num_workers: int):
        self.dataset = dataset
        self.building = torch.full((num_workers, 2), -1, dtype=torch.int64).share_memory_()  # (pid, sample)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            self.building[worker.id] = torch.tensor([os.getpid(), k])
        return self.dataset[k]


class _Loader(torch.utils.data.DataLoader):
    """torch's DataLoader whose iterator turns a dead worker into a WorkerDiedError."""

    def __iter__(self):
        batches = super().__iter__()
        if not isinstance(self.dataset, _Tracked):
            return batches
        _LIVE.add(self.dataset)
        _wrap_sigchld_handler()
        return _NameDeadWorkers(batches, self.dataset)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # the _Tracked datasets of loaders that exist
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
            found = _dead_workers(list(_LIVE))
            if found is None:
                raise
            raise WorkerDiedError(_explain(*found, e)) from e

    signal.signal(signal.SIGCHLD, handler)
    _sigchld_wrapped = True


def _exited(pid: int) -> bool:
    """Has our child process `pid` ended? (Without reaping it: torch's own checks still see it.)"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _dead_workers(tracked: list[_Tracked]) -> tuple[_Tracked, int, int] | None:
    """(dataset, pid, sample it was building) of a worker that has ended, or None."""
    for _ in range(20):  # the error may arrive a moment before the process is gone
        for t in tracked:
            for pid, k in t.building.tolist():
                if pid > 0 and _exited(pid):
                    return t, pid, k
        time.sleep(0.05)
    return None


def _explain(tracked: _Tracked, pid: int, k: int, error: BaseException) -> str:
    dataset = tracked.dataset
    if isinstance(dataset, _StoredImages):  # name the user's dataset
        dataset = dataset.dataset
    return (f"DataLoader worker (pid {pid}) died while building sample {k} of {dataset!r}; rebuild it in "
            f"this process (dataset[{k}], or --num-workers 0) to see why [{type(error).__name__}: {error}]")


class _NameDeadWorkers:
    """A worker's death reaches the training process in several forms (torch's "DataLoader worker
    (pid N) exited unexpectedly", a connection reset while fetching a batch the dead worker had
    shared, ...). Any error but a sample's own is checked against the workers' state."""

    def __init__(self, batches, tracked: _Tracked):
        self.batches, self.tracked = batches, tracked

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __next__(self):
        try:
            return next(self.batches)
        except (SampleError, StopIteration):
            raise
        except Exception as e:
            found = _dead_workers([self.tracked])
            if found is None:
                raise
            raise WorkerDiedError(_explain(*found, e)) from e
