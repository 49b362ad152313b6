"""The JSON row every pipeline of the training benchmark reports (engine/cli/benchmark.py), built
from the trainer's own `Throughput` meter so that the engine and the baseline are scored alike."""

from __future__ import annotations

import torch


def result_row(name, cfg_dict, steps, elapsed, meter, extra) -> dict:
    """One JSON row from a `Throughput` meter that counted the timed steps' micro-batches."""
    tflops = meter.flops / elapsed / 1e12
    out = {
        "pipeline": name,
        "tokens_per_s": round(meter.tokens / elapsed, 1),
        "images_per_s": round(meter.images / elapsed, 2),
        "tflops": round(tflops, 1),
        "mfu": round(meter.mfu(tflops * 1e12), 4) if meter.peak_flops else None,
        "mfu_peak_tflops": meter.peak_flops / 1e12 if meter.peak_flops else None,
        "step_time_s": round(elapsed / steps, 4),
        "data_wait_fraction": round(meter.data_wait / elapsed, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
        "steps": steps,
        "config": cfg_dict,
    }
    out.update(extra)
    return out


def run_config(a, cfg) -> dict:
    """The benchmark flags `a` and model config `cfg` that a row's figures depend on."""
    return {"preset": a.preset, "num_layers": cfg.language.num_layers, "seq_length": a.seq_length,
            "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
            "recompute": a.recompute_granularity, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
