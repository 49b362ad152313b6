"""Training throughput on real preprocessed data, optionally side by side with the seed-style
Hugging Face pipeline, in one process.

    llava-benchmark --preset llava-7b-bench --num-layers 8 --data-prefix out/sample \
        --seq-length 4096 --steps 10 --baseline hf --json-out docs/benchmarks/run.json

(or `python tools/benchmark.py ...`). Engine: the trainer's own pieces (engine.training.pretrain
builds the model, DDP, distributed optimizer and packed-data loader from the same flags as
`llava-pretrain`); one step = one global batch through mcore's schedule and the optimizer.

Baseline `hf` (engine/bench/hf_baseline.py): transformers' LlavaForConditionalGeneration fed one
padded document per sample, the way the seed feeds it, for the same number of optimizer steps.

Both are scored with the same formula (engine.training.metrics.step_flops: useful FLOPs only,
within-document attention pairs, no recompute). Prints one JSON line per pipeline and, with a
baseline, a final line with the ratio of useful tokens/s.

Memory settings: the recompute flags (--recompute-granularity/-method/-num-layers/-modules) and the
optimizer offload (--optimizer-cpu-offload, --optimizer-offload-fraction,
--overlap-cpu-optimizer-d2h-h2d) are llava-pretrain's. A run that does not fit under
--memory-limit-gib prints an "out_of_memory" row and exits with status 3. `--search` finds the
fastest setting that fits (engine/bench/search.py): one JSON row per attempt with its outcome, then
the fastest as a "search-best" row whose "flags" are the ones to train with.

    llava-benchmark --preset llava-1.5-7b --data-prefix out/textbook --seq-length 8192 \
        --global-batch-size 4 --memory-limit-gib 79.6 --search
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch

from engine.bench.profile import profile_step
from engine.bench.rows import result_row, run_config
from engine.bench.search import OOM_EXIT, ladder, process_runner, search
from engine.bench.timing import median_cuda_seconds, sync


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-7b-bench")
    p.add_argument("--num-layers", type=int, default=None, help="language-model layers (preset's if omitted)")
    p.add_argument("--data-prefix", required=True, help="a dataset written by tools/preprocess_interleaved.py")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--recompute-granularity", choices=["selective", "full"], default=None)
    p.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--recompute-modules", nargs="+", default=None, metavar="MODULE")
    p.add_argument("--optimizer-cpu-offload", action="store_true")
    p.add_argument("--optimizer-offload-fraction", type=float, default=None)
    p.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true")
    p.add_argument("--search", action="store_true",
                   help="try recompute / optimizer-offload settings fastest first under --memory-limit-gib, "
                        "one process each, and report the fastest that fits (engine/bench/search.py)")
    p.add_argument("--search-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --search: the longest one attempt may take")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--baseline", choices=["hf"], default=None)
    p.add_argument("--hf-micro-batch-size", type=int, default=2,
                   help="documents per padded micro-batch for the baseline")
    p.add_argument("--hf-gradient-checkpointing", action="store_true", help="the seed's setting")
    p.add_argument("--matmul-ceiling", action="store_true", help="also measure the card's bf16 matmul rate")
    p.add_argument("--json-out", default=None)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 TFLOP/s of one GPU for MFU (default: looked up by device name)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help="more llava-pretrain flags for the engine, e.g. --train-args=--no-gradient-accumulation-fusion")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cap this process's GPU memory (e.g. 80 to check that a run fits an 80 GB card)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile one engine step: top kernels printed, trace to DIR")
    return p.parse_args(argv)


def matmul_ceiling() -> float:
    """Measured dense bf16 matmul TFLOP/s of this card (8192^3, random data, median of 20)."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / median_cuda_seconds(lambda: a @ b) / 1e12


# --------------------------------------------------------------------------- engine


def run_engine(a: argparse.Namespace) -> dict:
    from engine.platform import init_distributed, setup_platform
    from engine.training import pretrain
    from engine.training.arguments import parse_args
    from engine.training.loop import make_forward_step, train_step
    from engine.training.metrics import Throughput, TimedIterator, mfu_peak

    flags = ["--model", a.preset, "--data-path", a.data_prefix, "--seq-length", str(a.seq_length),
             "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
             "--train-iters", str(a.steps + a.warmup + (1 if a.profile else 0)), "--eval-interval", "0", "--split", "1,0,0",
             "--attention-backend", a.attention_backend, "--num-workers", str(a.num_workers),
             "--log-interval", "1000000"]
    if a.num_layers:
        flags += ["--num-layers", str(a.num_layers)]
    flags += memory_flags(a)
    if torch.cuda.is_available():
        flags += ["--bf16"]
    flags += shlex.split(a.train_args)
    args = parse_args(flags)
    info = setup_platform()
    init_distributed(args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size,
                     seed=args.training.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
    model, optimizer, scheduler = pretrain.build_model_and_optimizer(args)
    train_iter, _ = pretrain.build_data(args, 0)
    cfg = args.model_config
    meter = Throughput(mfu_peak(a.peak_tflops).flops)  # the trainer's own accounting: data wait, tokens, images, useful FLOPs
    it = TimedIterator(train_iter, meter, pretrain.batch_counter(args))
    forward_step = make_forward_step(device)
    for _ in range(a.warmup):
        train_step(forward_step, it, model, optimizer, scheduler, args, device)
    sync()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    meter.reset()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        train_step(forward_step, it, model, optimizer, scheduler, args, device)
    sync()
    elapsed = time.perf_counter() - t0
    kernels = model.module.kernels
    memory = {"recompute": args.model.recompute.describe() if args.model.recompute else None,
              "optimizer_cpu_offload": args.optimizer.optimizer_cpu_offload}
    res = result_row("engine", run_config(a, cfg) | memory | {"train_args": a.train_args}, a.steps, elapsed, meter,
                     {"attention_backend": kernels.attention, "transformer_engine": bool(info.has_te),
                      "gradient_accumulation_fusion": kernels.wgrad_fusion != "off", "kernels": kernels.as_dict()})
    if a.profile:  # after the figures are read: the profiled step's batches must not count
        profile_step(a.profile, partial(train_step, forward_step, it, model, optimizer, scheduler, args, device))
    del model, optimizer, scheduler
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def memory_flags(a: argparse.Namespace) -> list[str]:
    """The recompute and optimizer-offload flags, as llava-pretrain takes them."""
    flags = []
    for name in ("recompute_granularity", "recompute_method", "recompute_num_layers", "optimizer_offload_fraction"):
        if getattr(a, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    if a.recompute_modules:
        flags += ["--recompute-modules", *a.recompute_modules]
    return flags + [f for f in ("--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d")
                    if getattr(a, f[2:].replace("-", "_"))]


def layers_per_stage(a: argparse.Namespace) -> int:
    from engine.config import get_preset

    layers = a.num_layers or get_preset(a.preset).language.num_layers
    pp = argparse.ArgumentParser(add_help=False)
    pp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return layers // pp.parse_known_args(shlex.split(a.train_args))[0].pipeline_model_parallel_size


def run_search(a: argparse.Namespace, argv: list[str], runner=None) -> list[dict]:
    """`--search`: every attempt's row, then the fastest (or a "search-none-fits" row)."""
    if a.baseline or a.skip_engine or a.profile or memory_flags(a):
        raise SystemExit("--search chooses the recompute and offload flags itself; it runs the engine alone "
                         "(no --baseline, --skip-engine, --profile or recompute/offload flags)")
    runner = runner or process_runner([x for x in argv if x not in ("--search", "--json-out", a.json_out)],
                                      timeout=a.search_timeout)
    best, attempts = search(ladder(layers_per_stage(a)), runner)
    for row in attempts:
        print(json.dumps({k: v for k, v in row.items() if k != "result"}), flush=True)
    best = best or {"pipeline": "search-none-fits", "memory_limit_gib": a.memory_limit_gib}
    print(json.dumps(best), flush=True)
    return attempts + [best]


def run_baseline(a: argparse.Namespace) -> dict:
    """The Hugging Face baseline; out of memory without recompute, it retries with the seed's own
    gradient checkpointing (its best setting that fits)."""
    from engine.bench.hf_baseline import run_hf

    try:
        return run_hf(a)
    except torch.OutOfMemoryError:
        if a.hf_gradient_checkpointing:
            raise
    # Retried here, outside the handler, once the failed attempt's frames (and tensors) are gone.
    print("# hf baseline: out of memory without recompute; retrying with gradient checkpointing", flush=True)
    torch.cuda.empty_cache()
    a.hf_gradient_checkpointing = True
    return run_hf(a)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.global_batch_size % a.micro_batch_size:
        print("--global-batch-size must be a multiple of --micro-batch-size", file=sys.stderr)
        return 1
    if a.search:  # the attempts run in their own processes; this one never touches the GPU
        _write(a.json_out, run_search(a, argv))
        return 0
    if a.memory_limit_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_limit_gib * 2 ** 30 / total))
    from engine.training.metrics import mfu_peak

    print(f"# {mfu_peak(a.peak_tflops).describe()}", flush=True)
    rows = []
    if not a.skip_engine:
        try:
            rows.append(run_engine(a))
        except torch.OutOfMemoryError as e:
            row = {"pipeline": "engine", "outcome": "out_of_memory", "memory_limit_gib": a.memory_limit_gib,
                   "flags": memory_flags(a), "detail": str(e).splitlines()[0]}
            print(json.dumps(row), flush=True)
            return OOM_EXIT
        print(json.dumps(rows[-1]), flush=True)
    if a.baseline == "hf":
        rows.append(run_baseline(a))
        print(json.dumps(rows[-1]), flush=True)
    if a.matmul_ceiling and torch.cuda.is_available():
        ceiling = matmul_ceiling()
        for r in rows:
            r["ratio_to_matmul_ceiling"] = round(r["tflops"] / ceiling, 4)
            r["matmul_ceiling_tflops"] = round(ceiling, 1)
    if len(rows) == 2:
        rows.append({"pipeline": "ratio", "engine_over_hf_tokens_per_s":
                     round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    _write(a.json_out, rows)
    return 0


def _write(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
