"""Throughput accounting and the metrics sinks (console, JSONL, TensorBoard, wandb).

Useful model FLOPs are counted from the actual batch, the same way whichever kernels run, so that
two engines, two attention backends or two parallel layouts compare on one scale; recompute is
not counted. docs/flops.md derives the count; in short, for the default recipe (frozen tower,
trained projector and LLM):

  LLM        6 x (non-embedding matmul params) x tokens
             + 6 x sum_docs(s_doc^2) x hidden x layers      causal attention, within documents only
             + 6 x hidden x vocab x tokens                  LM head
  projector  6 x (its matmul params) x image tokens         (576 per image)
  vision     2 x (its matmul params) x 577 x images          frozen tower: forward only
             + 4 x 577^2 x hidden x layers_run x images      its (bidirectional) attention

"tokens" are the language-model positions that hold a document (image positions included,
padding excluded). Other freeze choices follow the same logic: a trained part costs 6 FLOPs per
weight per token, a frozen part the backward pass crosses 4 (input gradients), a frozen part with
nothing trainable before it 2 (forward only).

MFU = useful FLOP/s per GPU / the GPU's dense bf16 peak, looked up by device name (`mfu_peak`) or
given with --peak-tflops. No MFU is reported on a CPU or on a GPU the table does not know.
"""

from __future__ import annotations

import json
import math
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError

# Dense (no sparsity) bf16 tensor-core peak of one GPU in TFLOP/s, from NVIDIA's product
# datasheets (each lists the sparse figure too, twice these). Matched against
# torch.cuda.get_device_name(), case-insensitively, first match wins: the variants come before
# the plain name ("NVIDIA H100 PCIe" before "NVIDIA H100 80GB HBM3", the SXM card), and whole
# words only, so "A10" is not "A100" or "A10G", nor "H200" "GH200".
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bGH200\b", "GH200 (H100 SXM-class GPU)", 989.0),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.0),
    (r"\bH200\b", "H200 SXM", 989.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bB200\b", "B200", 2250.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bA10\b", "A10", 125.0),
)


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class TrainableParts:
    vision: bool = False
    projector: bool = True
    llm: bool = True


def _matmul_factor(trains: bool, backward_through: bool) -> int:
    """FLOPs per weight per token: 6 for a trained part (docs/flops.md: forward 2 + backward 4), 4 for
    a frozen part that the backward pass still crosses (input gradients only), 2 for a frozen part
    with nothing trainable before it (forward only)."""
    return 6 if trains else (4 if backward_through else 2)


def llm_matmul_params(cfg: ModelConfig) -> int:
    lang = cfg.language
    h, kv = lang.hidden_size, (lang.num_query_groups or lang.num_attention_heads) * lang.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * lang.ffn_hidden_size  # q,o + k,v + SwiGLU
    return lang.num_layers * per_layer


def projector_matmul_params(cfg: ModelConfig) -> int:
    return cfg.vision.hidden_size * cfg.language.hidden_size + cfg.language.hidden_size ** 2


def vision_matmul_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.ffn_hidden_size
    return v.num_layers_run * per_layer


def step_flops(cfg: ModelConfig, doc_lengths, num_images: int, trainable: TrainableParts) -> float:
    """Useful FLOPs of forward+backward over documents of the given LLM lengths with `num_images`
    images among them."""
    lang, vis = cfg.language, cfg.vision
    tokens = float(sum(doc_lengths))
    sq = float(sum(int(s) * int(s) for s in doc_lengths))
    # The backward pass crosses the LLM when the projector or the vision tower trains.
    llm = _matmul_factor(trainable.llm, trainable.projector or trainable.vision)
    flops = llm * llm_matmul_params(cfg) * tokens
    flops += 6 * sq * lang.hidden_size * lang.num_layers  # backward always runs through attention
    flops += llm * lang.hidden_size * lang.vocab_size * tokens

    image_tokens = num_images * vis.tokens_per_image
    flops += _matmul_factor(trainable.projector, trainable.vision) * projector_matmul_params(cfg) * image_tokens

    seq = vis.num_patches + 1  # the tower runs on 577 positions (class token included)
    vis_w = _matmul_factor(trainable.vision, False)
    patch_embed = 3 * vis.patch_size ** 2 * vis.hidden_size * vis.num_patches
    flops += vis_w * (vision_matmul_params(cfg) * seq + patch_embed) * num_images
    flops += (3 if trainable.vision else 1) * 4 * seq * seq * vis.hidden_size * vis.num_layers_run * num_images
    return flops


def batch_documents(batch: dict, pad_id: int) -> tuple[list[int], int]:
    """(LLM lengths of the document segments, number of images) of one collated micro-batch.

    Padding is excluded: a sample's padding tail is the last segment of its row in `cu_seqlens`
    and holds only `pad_id` tokens with no loss (engine/data/dataset.py); a document segment
    always holds its own tokens (BOS, text, <image>), never only pad ids.
    """
    cu = batch["cu_seqlens"].tolist()
    seq = batch["tokens"].shape[1]
    flat_tokens = batch["tokens"].reshape(-1)
    lengths = []
    for a, b in zip(cu[:-1], cu[1:]):
        if b % seq == 0 and bool((flat_tokens[a:b] == pad_id).all()):
            continue  # the padding tail of a row
        lengths.append(b - a)
    return lengths, int(batch["images"].shape[0])


# --------------------------------------------------------------------------- MFU peak


@dataclass(frozen=True)
class MfuPeak:
    """The peak MFU is measured against, and where it comes from."""

    flops: float | None  # FLOP/s of one device; None: no MFU is reported
    source: str  # the device and its table row, the flag, or why there is none

    def describe(self) -> str:
        """The start-up line that says which peak MFU uses."""
        if self.flops is None:
            return f"MFU: not reported ({self.source})"
        return f"MFU peak: {self.flops / 1e12:g} TFLOP/s per GPU, dense bf16 ({self.source})"


def peak_for_device(device_name: str | None, override_tflops: float | None = None) -> MfuPeak:
    """The MFU peak of a device named as torch.cuda.get_device_name() names it (None: no GPU).

    --peak-tflops wins over the table, on any device. Without it, a CPU and a GPU the table does
    not know get no MFU (rather than a ratio to another card's peak, which would read as a real
    figure); the describe() line says how to give one."""
    if override_tflops is not None:
        if not (math.isfinite(override_tflops) and override_tflops > 0):
            raise ConfigError(f"--peak-tflops {override_tflops}: must be a positive number of TFLOP/s")
        return MfuPeak(override_tflops * 1e12, f"--peak-tflops {override_tflops:g}")
    if device_name is None:
        return MfuPeak(None, "no GPU")
    for pattern, card, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return MfuPeak(tflops * 1e12, f"{device_name}: {card}")
    return MfuPeak(None, f"unknown GPU {device_name!r}; give its dense bf16 peak with --peak-tflops")


def mfu_peak(override_tflops: float | None = None) -> MfuPeak:
    """The MFU peak of this process's current device."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return peak_for_device(name, override_tflops)


# --------------------------------------------------------------------------- step timing


class Throughput:
    """Accumulates per-step counters between two log lines on one rank. `peak_flops` is one
    device's peak (`MfuPeak.flops`); None reports no MFU."""

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.tokens = 0.0
        self.images = 0.0
        self.flops = 0.0
        self.data_wait = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def add_batch(self, tokens: float, images: float, flops: float) -> None:
        self.tokens += tokens
        self.images += images
        self.flops += flops

    def mfu(self, flops_per_s_per_gpu: float) -> float | None:
        return flops_per_s_per_gpu / self.peak_flops if self.peak_flops else None

    def summary(self, dp_group, world_size: int, device) -> dict:
        """Global figures for the interval, reduced over the data-parallel group (every TP/PP rank
        of a DP replica sees the same samples, so summing over DP counts each sample once)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        t = torch.tensor([self.tokens, self.images, self.flops], dtype=torch.float64, device=device)
        if dp_group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, group=dp_group)
        tokens, images, flops = t.tolist()
        steps = max(self.steps, 1)
        return {
            "step_time_s": elapsed / steps,
            "tokens_per_s": tokens / elapsed,
            "images_per_s": images / elapsed,
            "tflops_per_gpu": flops / elapsed / world_size / 1e12,
            "mfu": self.mfu(flops / elapsed / world_size),
            "data_wait_s": self.data_wait / steps,
            "data_wait_frac": self.data_wait / elapsed,
        }


class TimedIterator:
    """Wraps a data iterator and adds the time spent waiting for each batch to `meter.data_wait`;
    also counts each batch's useful work."""

    def __init__(self, iterator, meter: Throughput, count_fn=None):
        self.iterator, self.meter, self.count_fn = iterator, meter, count_fn

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.iterator)
        self.meter.data_wait += time.perf_counter() - t0
        if self.count_fn is not None:
            self.meter.add_batch(*self.count_fn(batch))
        return batch


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --------------------------------------------------------------------------- sinks


class MetricsLogger:
    """Console + optional JSONL / TensorBoard / wandb. Only the logging rank creates one."""

    def __init__(self, jsonl: str | None = None, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None, wandb_name: str | None = None,
                 run_config: dict | None = None, printer=print):
        self.printer = printer
        self.jsonl = None
        if jsonl:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl, "a", buffering=1)  # line-buffered: a crash loses no line
        self.tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            self.tb = SummaryWriter(tensorboard_dir)
        self.wandb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=run_config or {})

    def log(self, record: dict, prefix: str = "train") -> None:
        step = record["iteration"]
        self.printer(format_record(record, prefix))
        if self.jsonl:
            self.jsonl.write(json.dumps({"kind": prefix, **record}, default=_jsonable) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    return str(x)


_FORMATS = [
    ("iteration", "iteration {}"), ("consumed_samples", "consumed samples {}"), ("loss", "loss {:.5f}"),
    ("lr", "lr {:.3e}"), ("grad_norm", "grad norm {:.4f}"), ("step_time_s", "step {:.3f} s"),
    ("tokens_per_s", "tokens/s {:.0f}"), ("images_per_s", "images/s {:.2f}"),
    ("tflops_per_gpu", "TFLOP/s/GPU {:.2f}"), ("mfu", "MFU {:.2%}"), ("peak_mem_gib", "peak mem {:.2f} GiB"),
    ("data_wait_frac", "data wait {:.1%}"), ("skipped", "skipped {}"),
    ("no_loss_microbatches", "no-loss micro-batches {}"),
]
_WHEN_NONZERO = {"no_loss_microbatches"}  # worth a word only when it happens


def format_record(record: dict, prefix: str) -> str:
    parts = [prefix]
    for key, fmt in _FORMATS:
        if record.get(key) is not None and (key not in _WHEN_NONZERO or record[key]):
            parts.append(fmt.format(record[key]))
    if record.get("sources"):
        parts.append(format_sources(record["sources"]))
    parts += [f"{k.removeprefix('fewshot/')} {v:.2f}" for k, v in record.items() if k.startswith("fewshot/")]
    return " | ".join(parts)


def format_sources(sources: dict) -> str:
    """Per-source consumption, compact: ``textbook 30 smp 84 img 41k tok | wiki:all 10 smp ...``."""
    def short(n: float) -> str:
        return f"{n / 1e9:.1f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:.0f}"

    return "sources " + ", ".join(f"{name} {short(v['samples'])} smp {short(v['images'])} img {short(v['loss_tokens'])} "
                                  f"loss-tok" for name, v in sources.items())
