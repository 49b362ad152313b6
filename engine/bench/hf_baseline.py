"""The baseline of the training benchmark: transformers' LlavaForConditionalGeneration fed the way
the seed feeds it, scored with the engine's own FLOP formula (engine.training.metrics.step_flops).

SDPA attention, fp32 weights under bf16 autocast as HF Trainer runs it, frozen vision tower, fused
AdamW; one document per sample (first `seq-length` LLM positions, whole images only), samples
padded to the longest in the micro-batch, images decoded from the dataset's JPEGs by DataLoader
workers. It runs the same number of optimizer steps as the engine, each over as many documents as
the engine's packed global batch holds on average.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.bench.rows import result_row, run_config
from engine.bench.timing import sync

IGNORE_INDEX = -100


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


def _build_model(cfg, a: argparse.Namespace, dev):
    from transformers import LlavaForConditionalGeneration

    from engine.convert.llava_hf import hf_config

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
    return model, opt


def _documents(a: argparse.Namespace, cfg) -> tuple[list[int], int, int]:
    """(document order for every step, micro-batches per step, documents per step)."""
    from engine.data.format import IndexedDataset

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
    return [docs[i % len(docs)] for i in range(needed)], accum, per_step


def run_hf(a: argparse.Namespace) -> dict:
    from engine.config import get_preset
    from engine.training.metrics import Throughput, TimedIterator, TrainableParts, mfu_peak, step_flops

    cfg = get_preset(a.preset, **({"num_layers": a.num_layers} if a.num_layers else {}))
    dev = torch.device("cuda")
    model, opt = _build_model(cfg, a, dev)
    order, accum, per_step = _documents(a, cfg)
    ds = SeedStyleDocuments(a.data_prefix, a.seq_length, cfg.vision.tokens_per_image, order)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.hf_micro_batch_size, collate_fn=_pad_collate,
                                         num_workers=a.num_workers, pin_memory=True, shuffle=False)
    trainable = TrainableParts(vision=False, projector=True, llm=True)

    def count(batch):  # padding excluded: one document per row, its length from the mask
        lengths, n_img = batch["attention_mask"].sum(1).tolist(), batch["pixel_values"].shape[0]
        return sum(lengths), n_img, step_flops(cfg, lengths, n_img, trainable)

    meter = Throughput(mfu_peak(a.peak_tflops).flops)
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
    sync()
    torch.cuda.reset_peak_memory_stats()
    meter.reset()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    conf = run_config(a, cfg) | {"micro_batch_size": a.hf_micro_batch_size, "documents_per_step": per_step,
                                 "gradient_checkpointing": a.hf_gradient_checkpointing}
    return result_row("hf", conf, a.steps, elapsed, meter, {"attention_backend": "sdpa"})
