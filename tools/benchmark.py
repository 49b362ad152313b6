"""Training throughput on real preprocessed data, optionally side by side with the seed-style
Hugging Face pipeline, in one process.

    python tools/benchmark.py --preset llava-7b-bench --num-layers 8 --data-prefix out/sample \
        --seq-length 4096 --steps 10 --baseline hf --json-out docs/benchmarks/run.json

Engine: the trainer's own pieces (engine.training.pretrain builds the model, DDP, distributed
optimizer and packed-data loader from the same flags as `llava-pretrain`); one step = one global
batch through mcore's schedule and the optimizer.

Baseline `hf`: transformers' LlavaForConditionalGeneration (SDPA attention, fp32 weights under
bf16 autocast as HF Trainer runs it, frozen vision tower, fused AdamW) fed the way the seed feeds
it: one document per sample (first `seq-length` LLM positions, whole images only), samples padded
to the longest in the micro-batch, images decoded from the dataset's JPEGs by DataLoader workers.
It runs the same number of optimizer steps, each over as many documents as the engine's packed
global batch holds on average.

Both are scored with the same formula (engine.training.metrics.step_flops: useful FLOPs only,
within-document attention pairs, no recompute). Prints one JSON line per pipeline and, with a
baseline, a final line with the ratio of useful tokens/s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

IGNORE_INDEX = -100


def parse() -> argparse.Namespace:
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
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--baseline", choices=["hf"], default=None)
    p.add_argument("--hf-micro-batch-size", type=int, default=2,
                   help="documents per padded micro-batch for the baseline")
    p.add_argument("--hf-gradient-checkpointing", action="store_true", help="the seed's setting")
    p.add_argument("--matmul-ceiling", action="store_true", help="also measure the card's bf16 matmul rate")
    p.add_argument("--json-out", default=None)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help="more llava-pretrain flags for the engine, e.g. --train-args=--no-gradient-accumulation-fusion")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cap this process's GPU memory (e.g. 80 to check that a run fits an 80 GB card)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile one engine step: top kernels printed, trace to DIR")
    return p.parse_args()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_ceiling() -> float:
    """Measured dense bf16 matmul TFLOP/s of this card (8192^3, random data, median of 20)."""
    from bench_attention import median_cuda_seconds  # tools/ is on sys.path when run as a script

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / median_cuda_seconds(lambda: a @ b) / 1e12


def _result(name, cfg_dict, steps, elapsed, meter, extra) -> dict:
    """One JSON row from a `Throughput` meter that counted the timed steps' micro-batches."""
    from engine.training.metrics import H100_PEAK_FLOPS

    tflops = meter.flops / elapsed / 1e12
    out = {
        "pipeline": name,
        "tokens_per_s": round(meter.tokens / elapsed, 1),
        "images_per_s": round(meter.images / elapsed, 2),
        "tflops": round(tflops, 1),
        "mfu": round(tflops * 1e12 / H100_PEAK_FLOPS, 4),
        "step_time_s": round(elapsed / steps, 4),
        "data_wait_fraction": round(meter.data_wait / elapsed, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
        "steps": steps,
        "config": cfg_dict,
    }
    out.update(extra)
    return out


# --------------------------------------------------------------------------- engine


def run_engine(a: argparse.Namespace) -> dict:
    from engine.platform import init_distributed, setup_platform
    from engine.training import pretrain
    from engine.training.arguments import parse_args
    from engine.training.loop import configure_model_config, make_forward_step, train_step
    from engine.training.metrics import Throughput, TimedIterator

    flags = ["--model", a.preset, "--data-path", a.data_prefix, "--seq-length", str(a.seq_length),
             "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
             "--train-iters", str(a.steps + a.warmup + (1 if a.profile else 0)), "--eval-interval", "0", "--split", "1,0,0",
             "--attention-backend", a.attention_backend, "--num-workers", str(a.num_workers),
             "--log-interval", "1000000"]
    if a.num_layers:
        flags += ["--num-layers", str(a.num_layers)]
    if a.recompute_granularity:
        flags += ["--recompute-granularity", a.recompute_granularity]
    if torch.cuda.is_available():
        flags += ["--bf16"]
    flags += shlex.split(a.train_args)
    args = parse_args(flags)
    info = setup_platform()
    init_distributed(args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size,
                     seed=args.training.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
    model, optimizer, scheduler = pretrain.build_model_and_optimizer(args)
    configure_model_config(model, optimizer, args)
    train_iter, _ = pretrain.build_data(args, 0)
    cfg = args.model_config
    meter = Throughput()  # the trainer's own accounting: data wait, tokens, images, useful FLOPs
    it = TimedIterator(train_iter, meter, pretrain.batch_counter(args))
    forward_step = make_forward_step(device)
    for _ in range(a.warmup):
        train_step(forward_step, it, model, optimizer, scheduler, args, device)
    _sync()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    meter.reset()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        train_step(forward_step, it, model, optimizer, scheduler, args, device)
    _sync()
    elapsed = time.perf_counter() - t0
    backend = getattr(getattr(model, "module", model), "attention_backend", a.attention_backend)
    res = _result("engine", _config(a, cfg) | {"train_args": a.train_args}, a.steps, elapsed, meter,
                  {"attention_backend": backend, "transformer_engine": bool(info.has_te),
                   "gradient_accumulation_fusion": args.training.gradient_accumulation_fusion})
    if a.profile:  # after the figures are read: the profiled step's batches must not count
        profile_step(a.profile, lambda: train_step(forward_step, it, model, optimizer, scheduler, args, device))
    del model, optimizer, scheduler
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def profile_step(out_dir: str, step) -> None:
    """One step under torch.profiler: GPU busy time vs wall time, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync()
    wall = time.perf_counter() - t0
    trace = Path(out_dir) / "engine_step_trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = trace_kernels(trace)
    span, busy, idle = kernel_timeline(kernels)
    print(f"# profile: wall {wall * 1e3:.1f} ms (profiler overhead included); kernels span {span:.1f} ms, "
          f"busy {busy:.1f} ms, GPU idle between kernels {idle:.1f} ms ({idle / span:.0%})", flush=True)
    print("# kernel time by kind (ms): " + json.dumps(kernel_breakdown(kernels)), flush=True)
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    (Path(out_dir) / "engine_step_kernels.txt").write_text(table)
    print(table, flush=True)


def trace_kernels(trace: Path | str) -> list[dict]:
    """The kernel events (name, ts, dur in µs) of a chrome trace, `.json` or `.json.gz`."""
    opener = gzip.open if str(trace).endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def kernel_timeline(kernel_events: list[dict]) -> tuple[float, float, float]:
    """(span from first kernel start to last kernel end, time with a kernel running, idle gaps)
    in ms, from `trace_kernels`: where the GPU waited for the host."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernel_events)
    if not kernels:
        return 0.0, 0.0, 0.0
    busy, idle, end = 0.0, 0.0, kernels[0][0]
    for start, stop in kernels:
        if start > end:
            idle += start - end
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return (end - kernels[0][0]) / 1e3, busy / 1e3, idle / 1e3


KERNEL_KINDS = (  # first match wins: flash kernels carry "cutlass" in their names too
    ("attention", ("flash", "sdpa", "fmha")),
    ("matmul", ("nvjet", "gemm", "cutlass")),
    ("optimizer", ("FusedOptimizer", "multi_tensor_apply")),
    ("concatenation", ("CatArray",)),
    ("swiglu (compiled)", ("silu",)),
    ("rope (compiled)", ("triton_poi_fused__to_copy_add_cat_mul_neg",)),
    ("norm", ("layer_norm", "rms_norm", "GammaBeta")),
    ("elementwise", ("elementwise", "copy")),
)


def kernel_breakdown(kernel_events: list[dict]) -> dict[str, float]:
    """Kernel time in ms by kind (KERNEL_KINDS, else "other") from `trace_kernels`, largest first."""
    totals: dict[str, float] = {}
    for e in kernel_events:
        kind = next((k for k, keys in KERNEL_KINDS if any(key in e["name"] for key in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + e["dur"] / 1e3
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _config(a, cfg) -> dict:
    return {"preset": a.preset, "num_layers": cfg.language.num_layers, "seq_length": a.seq_length,
            "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
            "recompute": a.recompute_granularity, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


# --------------------------------------------------------------------------- Hugging Face baseline


class SeedStyleDocuments(torch.utils.data.Dataset):
    """One document per sample, as the seed builds them: the token stream with each <image>
    expanded to its 576 positions, cut to `seq_length` positions at an image boundary, labels
    ignored before the first image, on image positions (and, after collation, on padding)."""

    def __init__(self, prefix: str, seq_length: int, tokens_per_image: int, docs: list[int]):
        from engine.data.format import IndexedDataset

        self.ds, self.seq, self.tpi, self.docs = IndexedDataset(prefix), seq_length, tokens_per_image, docs

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, k):
        from engine.data.images import normalize

        doc = self.docs[k]
        toks = self.ds.tokens(doc).astype("int64")
        img_tok = self.ds.image_token_id
        ids, labels, images, seen_image = [], [], [], False
        first = self.ds.doc_image_offsets[doc]
        n_img = 0
        for t in toks.tolist():
            if t == img_tok:
                if len(ids) + self.tpi > self.seq:
                    break
                ids += [t] * self.tpi
                labels += [IGNORE_INDEX] * self.tpi
                images.append(self.ds.image(first + n_img))
                n_img += 1
                seen_image = True
            else:
                if len(ids) + 1 > self.seq:
                    break
                ids.append(t)
                labels.append(t if seen_image else IGNORE_INDEX)
        pix = normalize(torch.from_numpy(np.stack(images))) if images else torch.zeros(0, 3, 336, 336)
        return torch.tensor(ids), torch.tensor(labels), pix


def _pad_collate(samples):
    n = max(len(s[0]) for s in samples)
    ids = torch.zeros(len(samples), n, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), n, dtype=torch.long)
    for i, (x, y, _) in enumerate(samples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.cat([s[2] for s in samples])}


def run_hf(a: argparse.Namespace) -> dict:
    from transformers import LlavaForConditionalGeneration

    from engine.config import get_preset
    from engine.convert.llava_hf import hf_config
    from engine.data.format import IndexedDataset
    from engine.training.metrics import Throughput, TimedIterator, TrainableParts, step_flops

    cfg = get_preset(a.preset, **({"num_layers": a.num_layers} if a.num_layers else {}))
    dev = torch.device("cuda")
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(hf_cfg).to(dev)
    model.model.vision_tower.requires_grad_(False)  # the seed's frozen tower
    if a.hf_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0,
                            fused=True)

    reader = IndexedDataset(a.data_prefix)
    docs = [d for d in range(reader.num_documents) if reader.doc_image_counts[d] > 0]
    # As many documents per optimizer step as the engine's packed global batch holds on average,
    # so both pipelines train on the same amount of text per update (and amortise the optimizer
    # step over it alike).
    lengths = [min(int(reader.doc_lengths[d]) + (cfg.vision.tokens_per_image - 1) * int(reader.doc_image_counts[d]),
                   a.seq_length) for d in docs]
    docs_per_step = max(1, round(a.global_batch_size * a.seq_length / (sum(lengths) / len(lengths))))
    accum = -(-docs_per_step // a.hf_micro_batch_size)
    per_step = a.hf_micro_batch_size * accum
    needed = per_step * (a.steps + a.warmup)
    order = [docs[i % len(docs)] for i in range(needed)]
    ds = SeedStyleDocuments(a.data_prefix, a.seq_length, cfg.vision.tokens_per_image, order)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.hf_micro_batch_size, collate_fn=_pad_collate,
                                         num_workers=a.num_workers, pin_memory=True, shuffle=False)
    trainable = TrainableParts(vision=False, projector=True, llm=True)

    def count(batch):  # padding excluded: one document per row, its length from the mask
        lengths, n_img = batch["attention_mask"].sum(1).tolist(), batch["pixel_values"].shape[0]
        return sum(lengths), n_img, step_flops(cfg, lengths, n_img, trainable)

    meter = Throughput()
    it = TimedIterator(iter(loader), meter, count)

    def step():
        for _ in range(accum):
            batch = next(it)
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch)
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    _sync()
    torch.cuda.reset_peak_memory_stats()
    meter.reset()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    _sync()
    elapsed = time.perf_counter() - t0
    conf = _config(a, cfg) | {"micro_batch_size": a.hf_micro_batch_size, "documents_per_step": per_step,
                              "gradient_checkpointing": a.hf_gradient_checkpointing}
    return _result("hf", conf, a.steps, elapsed, meter, {"attention_backend": "sdpa"})


def main() -> None:
    a = parse()
    if a.global_batch_size % a.micro_batch_size:
        sys.exit("--global-batch-size must be a multiple of --micro-batch-size")
    if a.memory_limit_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_limit_gib * 2 ** 30 / total))
    rows = []
    if not a.skip_engine:
        rows.append(run_engine(a))
        print(json.dumps(rows[-1]), flush=True)
    if a.baseline == "hf":
        oom = False
        try:
            rows.append(run_hf(a))
        except torch.OutOfMemoryError:
            if a.hf_gradient_checkpointing:
                raise
            oom = True  # retried below, once the failed attempt's frames (and tensors) are gone
        if oom:
            # its best setting that fits: the seed's own gradient checkpointing
            print("# hf baseline: out of memory without recompute; retrying with gradient checkpointing",
                  flush=True)
            torch.cuda.empty_cache()
            a.hf_gradient_checkpointing = True
            rows.append(run_hf(a))
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
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json_out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
