"""Helpers shared by the reliability tests: example counts, real photos, file mutations."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

from PIL import Image
from skimage import data as skdata

from engine.data.format import IndexedDataset


def examples(n: int) -> int:
    """`n` examples in CI; ``RELIABILITY_EXAMPLES=k`` multiplies them when exploring."""
    return n * int(os.environ.get("RELIABILITY_EXAMPLES", "1"))


def photo(name: str, size: tuple[int, int] | None = None, mode: str = "RGB") -> Image.Image:
    """A scikit-image sample photograph, optionally resized (bicubic) and converted."""
    img = Image.fromarray(getattr(skdata, name)())
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    return img.convert(mode) if img.mode != mode else img


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@contextlib.contextmanager
def hang_guard(seconds: float, what: str):
    """Turn a hang into a test failure: SIGALRM interrupts blocking calls (open() of a FIFO,
    a read) in the main thread and raises here."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds:g} s (a hang)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class DyingDataset:
    """Wraps a dataset; building sample `k` ends the worker process without a word: ``exit``
    (os._exit, as a crash in native code does) or ``kill`` (SIGKILL, as the out-of-memory killer
    does)."""

    def __init__(self, dataset, k: int, how: str):
        self.dataset, self.k, self.how = dataset, k, how

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        if k == self.k:
            if self.how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.dataset[k]

    def __repr__(self) -> str:
        return f"DyingDataset({self.dataset!r})"


def images_of(dataset, k: int) -> list[int]:
    """Global ids of the images in sample `k` of a PackedDataset (a segment never cuts an image,
    so each image belongs to exactly one sample of an epoch)."""
    r = dataset.reader
    out = []
    for d, a, b in dataset.index.segments_of(k).tolist():
        for i in r.doc_images(d):
            if a <= int(r.image_positions[i]) < b:
                out.append(i)
    return out


class StallingReader(IndexedDataset):
    """A dataset reader whose reads of the images `stall` never return: they open `fifo`, a named
    pipe nobody writes to, as a read from a network file system that stopped answering does.
    Before blocking it writes {"worker": DataLoader worker id, "pid": ...} as JSON to `fifo` +
    ".who". Pickles with the stall, so spawned workers get it too."""

    def __init__(self, prefix, stall: list[int], fifo: str):
        super().__init__(prefix)
        self.stall, self.fifo = sorted(stall), str(fifo)

    def __getstate__(self):
        return {**super().__getstate__(), "stall": self.stall, "fifo": self.fifo}

    def __setstate__(self, state):
        IndexedDataset.__init__(self, state["prefix"], check_index_crc=False)
        self.stall, self.fifo = state["stall"], state["fifo"]

    def image(self, i: int):
        if i in self.stall:
            import torch

            worker = torch.utils.data.get_worker_info()
            Path(self.fifo + ".who").write_text(json.dumps({"worker": worker.id if worker else None,
                                                            "pid": os.getpid()}))
            with open(self.fifo, "rb") as f:  # blocks until a writer opens the pipe: never
                f.read()
        return super().image(i)


def stall_sample(dataset, k: int, fifo: Path):
    """Make building sample `k` of a PackedDataset hang in a read (see `StallingReader`); `k`
    must hold an image. Creates the FIFO, and writes the sample's prefix and segments as JSON to
    `fifo` + ".sample" (what a message about it must name)."""
    images = images_of(dataset, k)
    assert images, f"sample {k} holds no image to stall on"
    if not fifo.exists():
        os.mkfifo(fifo)
    Path(str(fifo) + ".sample").write_text(json.dumps({"prefix": dataset.prefix, "sample": k,
                                                        "segments": dataset.index.segments_of(k).tolist()}))
    dataset.reader = StallingReader(dataset.prefix, images, str(fifo))
    return dataset


# ---------------------------------------------------------------------------- training processes


def start_training(argv: list, log: Path, *, preexec_fn=None, driver: str | None = None):
    """`python -m engine.pretrain ARGV` as one rank in its own process group (so that a kill -9
    of the group takes its data-loader workers and checkpoint writers too), output to `log`.
    `driver`: Python source run instead of the module (it reads sys.argv[1:] as the flags)."""
    from helpers import start_pretrain  # here: faultlib is also imported by drivers run without tests/

    return start_pretrain(argv, log, driver=driver, own_group=True, preexec_fn=preexec_fn,
                          pythonpath=(Path(__file__).parent,)).proc


TRAIN_ITERS, SAVE_EVERY = 8, 2


def training_flags(data: str, root: Path, *extra) -> list:
    """A small real run: tiny preset, 1536 positions, 2 samples per step, one loader worker,
    checkpoints every SAVE_EVERY steps into ROOT/ckpt, resumed from there when present."""
    return ["--model", "tiny", "--data-path", data, "--seq-length", 1536, "--micro-batch-size", 1,
            "--global-batch-size", 2, "--train-iters", TRAIN_ITERS, "--lr", "1e-3", "--lr-warmup-iters", 2,
            "--split", "1,0,0", "--eval-interval", 0, "--num-workers", 1, "--log-interval", 1,
            "--save", root / "ckpt", "--load", root / "ckpt", "--save-interval", SAVE_EVERY, *extra]


def run_training(argv: list, log: Path, *, expect: int = 0, timeout: float = 300, **kw) -> str:
    """Run to the end; returns the output, failing with it unless the exit status is `expect`."""
    from helpers import kill_group

    proc = start_training(argv, log, **kw)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    output = log.read_text(errors="replace")
    assert code == expect, f"exit status {code}, expected {expect}:\n{output[-6000:]}"
    return output


def tracker(ckpt: Path) -> int | None:
    try:
        return int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    except (FileNotFoundError, ValueError):
        return None


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a distributed checkpoint directory, by flattened name."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/all.pt")
        state = torch.load(f"{tmp}/all.pt", weights_only=False)

    out = {}

    def walk(value, name):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}/{k}" if name else str(k))
        elif isinstance(value, torch.Tensor):
            out[name] = value

    walk(state, "")
    return out


# Poisons the loss of chosen steps, then runs engine.pretrain: POISON="3:nan_loss,5:inf_loss"
# (step:kind; kinds nan_loss, inf_loss, nan_grad = finite loss whose gradient is NaN), one
# micro-batch per step per rank unless POISON_MICRO says otherwise.
POISON_DRIVER = """
import os, sys
import torch
import engine.training.loop as loop

plan = {int(s): k for s, k in (item.split(":") for item in os.environ["POISON"].split(","))}
micro = int(os.environ.get("POISON_MICRO", "1"))
calls = [0]
real = loop.loss_func

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")

def poisoned(loss_mask, per_token_loss):
    step = calls[0] // micro + 1
    calls[0] += 1
    kind = plan.get(step)
    if kind == "nan_loss":
        per_token_loss = per_token_loss * float("nan")
    elif kind == "inf_loss":  # +Inf where the loss counts; its gradient stays finite
        per_token_loss = torch.where(loss_mask.bool(), per_token_loss + float("inf"), per_token_loss)
    elif kind == "nan_grad":
        per_token_loss = NanGrad.apply(per_token_loss)
    return real(loss_mask, per_token_loss)

loop.loss_func = poisoned
from engine.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


# Runs engine.pretrain with the train split's sample STALL_SAMPLE hanging in a read of a FIFO
# (STALL_FIFO) in the data-loader worker that builds it (faultlib.stall_sample).
STALL_DRIVER = """
import os, sys
from pathlib import Path
import faultlib
import engine.data.dataset as dataset

real_init = dataset.PackedDataset.__init__

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    if self.split == "train":
        faultlib.stall_sample(self, int(os.environ["STALL_SAMPLE"]), Path(os.environ["STALL_FIFO"]))

dataset.PackedDataset.__init__ = init
from engine.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


# Runs engine.pretrain with a checkpoint writer whose every file write fails with ENOSPC, from the
# save of iteration FAIL_FROM on, on the rank FAIL_RANK only when that is set.
ENOSPC_DRIVER = """
import errno, os, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async

fail_from = int(os.environ["FAIL_FROM"])
on_this_rank = os.environ.get("FAIL_RANK", os.environ["RANK"]) == os.environ["RANK"]
real = filesystem_async.FileSystemWriterAsync.write_preloaded_data

def full_disk(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
    if on_this_rank and f"iter_{fail_from:07d}" in str(write_bucket[0]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(write_bucket[0]))
    return real(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(full_disk)
from engine.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def start_ranks(argv: list, logdir: Path, *, nproc: int = 2, driver: str | None = None) -> list:
    """`nproc` ranks of one run (helpers.Rank), each in its own process group, as torchrun starts
    them; rank r logs to LOGDIR/rank{r}.log."""
    from helpers import free_port, start_pretrain

    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [start_pretrain(argv, logdir / f"rank{r}.log", rank=r, world=nproc, port=port, driver=driver,
                           own_group=True, pythonpath=(Path(__file__).parent,)) for r in range(nproc)]
