"""Throughput accounting: the DESIGN.md FLOP formula on known shapes, and the per-batch counts
(documents, padding, images) on real packed batches."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import get_preset
from engine.data.dataset import PackedDataset
from engine.data.loader import collate
from engine.data.packing import PackingConfig
from engine.training.metrics import (H100_PEAK_FLOPS, MetricsLogger, Throughput, TimedIterator, TrainableParts,
                                     batch_documents, llm_matmul_params, step_flops, vision_matmul_params)


def test_parameter_counts_of_llava_7b():
    cfg = get_preset("llava-1.5-7b")
    # LLaMA-7B: 32 x (4 x 4096^2 attention + 3 x 4096 x 11008 SwiGLU) = 6.48 B non-embedding weights.
    assert llm_matmul_params(cfg) == 32 * (4 * 4096**2 + 3 * 4096 * 11008) == 6_476_005_376
    # CLIP ViT-L/14: hidden_states[-2] runs 23 of its 24 layers.
    assert vision_matmul_params(cfg) == 23 * (4 * 1024**2 + 2 * 1024 * 4096)


def test_step_flops_formula_on_the_tiny_preset():
    cfg = get_preset("tiny")  # LLM h=64, 4 layers, ffn 176, vocab 32001; CLIP h=32, 2 of 3 layers run
    docs, images = [1000, 400], 2
    h, layers, vocab, tokens = 64, 4, 32001, 1400
    llm = 6 * layers * (4 * h * h + 3 * h * 176) * tokens
    attention = 6 * (1000**2 + 400**2) * h * layers
    head = 6 * h * vocab * tokens
    projector = 6 * (32 * 64 + 64 * 64) * 576 * images
    vision = 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) * 577 + 3 * 14 * 14 * 32 * 576) * images
    vision_attention = 4 * 577**2 * 32 * 2 * images
    expected = llm + attention + head + projector + vision + vision_attention
    assert step_flops(cfg, docs, images, TrainableParts()) == pytest.approx(expected, rel=1e-12)

    # Attention counts within-document pairs only: one 1400-token document costs more than two.
    assert step_flops(cfg, [1400], images, TrainableParts()) > step_flops(cfg, docs, images, TrainableParts())
    # Projector-only stage: the LLM still runs backward (input gradients) but computes no weight
    # gradients, so its matmuls cost 4 instead of 6 FLOPs per weight per token.
    frozen_llm = step_flops(cfg, docs, images, TrainableParts(vision=False, projector=True, llm=False))
    assert expected - frozen_llm == pytest.approx(2 / 6 * (llm + head), rel=1e-12)


def test_batch_documents_excludes_padding_exactly(tiny_dataset):
    packing = PackingConfig(seq_length=1536, seed=3)
    ds = PackedDataset(tiny_dataset, packing, split="train", split_weights="1,0,0", cache=False)
    samples = [ds[k] for k in range(4)]
    batch = collate(samples)
    lengths, images = batch_documents(batch, pad_id=0)
    used = [int(ds.index.sample_lengths[ds.index.shuffle[k]]) for k in range(4)]
    assert sum(lengths) == sum(used)  # the packing index's own count of non-padding positions
    assert sum(used) < 4 * 1536  # there is padding to exclude
    assert images == sum(len(s["images"]) for s in samples) == batch["images"].shape[0]
    segments = sum(len(ds.index.segments_of(k)) for k in range(4))
    assert len(lengths) == segments


def test_throughput_and_data_wait():
    meter = Throughput()
    slow = iter([{"x": 1}, {"x": 2}])

    def delayed():
        for item in slow:
            t = torch.zeros(1)
            for _ in range(2000):
                t += 1  # a little real work standing in for a batch that is not ready
            yield item

    timed = TimedIterator(delayed(), meter, lambda b: (100.0, 2.0, 1e9))
    assert [b["x"] for b in timed] == [1, 2]
    meter.steps = 2
    out = meter.summary(dp_group=None, world_size=1, device=torch.device("cpu"))
    assert meter.tokens == 200 and meter.images == 4
    assert out["data_wait_s"] > 0 and 0 < out["data_wait_frac"] <= 1
    assert out["mfu"] == pytest.approx(out["tflops_per_gpu"] * 1e12 / H100_PEAK_FLOPS)
    assert out["tokens_per_s"] == pytest.approx(200 / (out["step_time_s"] * 2), rel=1e-6)


def test_metrics_logger_writes_json_lines(tmp_path):
    lines = []
    logger = MetricsLogger(jsonl=str(tmp_path / "m.jsonl"), printer=lines.append)
    logger.log({"iteration": 3, "consumed_samples": 6, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5,
                "mfu": 0.25, "skipped": 0}, "train")
    logger.log({"iteration": 3, "consumed_samples": 6, "loss": 2.25}, "valid")
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0] == {"kind": "train", "iteration": 3, "consumed_samples": 6, "loss": 2.5, "lr": 1e-4,
                       "grad_norm": 0.5, "mfu": 0.25, "skipped": 0}
    assert rows[1]["kind"] == "valid" and rows[1]["loss"] == 2.25
    assert lines[0] == ("train | iteration 3 | consumed samples 6 | loss 2.50000 | lr 1.000e-04 | "
                        "grad norm 0.5000 | MFU 25.00% | skipped 0")


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tensorboard_dir=str(tmp_path / "tb"), printer=lambda *_: None)
    for it, loss in [(1, 3.0), (2, 2.0)]:
        logger.log({"iteration": it, "loss": loss}, "train")
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]
