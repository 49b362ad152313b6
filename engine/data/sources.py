"""What a run has consumed from each dataset of its blend, and where each one continues when the
blend changes between a checkpoint and its resume.

Per-source accounting is a function of the data position alone. The training sampler reads the
train dataset in order from ``consumed_samples``; blended sample k is sample ``j`` of source
``i`` (`BlendedDataset`), and a source's samples are read in its own training order
(``PackingIndex.shuffle``), each one once. So after N samples source i has consumed its first
``c_i`` samples, ``c_i`` = its offset plus its share of the blending index's first N - start
entries (`consumed_per_source`), and its images, LLM positions ("tokens") and loss-carrying
targets are sums over those samples, computed from the packing index (segments, image positions,
document lengths, the loss policy) without reading a token (`SourceCounter`). The checkpoint
carries the result (`data_state`) because a changed blend cannot recompute the old one.

Changing the blend on resume (`plan_origin`): an unchanged blend (the same datasets, weights and
loss policies) rebuilds exactly the index it was saved with. A changed one keeps every source's
position: source i continues at its consumed count ``c_i`` (0 for a dataset new to the blend),
and a new blending index over the new weights starts at the resumed ``consumed_samples``, so no
sample of any source is read twice. A dataset whose loss policy changed is packed anew, so it
starts from 0 again (its old positions name other samples).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.data.blend import DataBlend


@dataclass(frozen=True)
class BlendOrigin:
    """Where a run's blending index starts: train sample `start` is the first it places, and
    source i's first placed sample is its sample `offsets[i]`. (0, zeros) for a run that never
    changed its blend."""

    start: int
    offsets: tuple[int, ...]

    @property
    def is_zero(self) -> bool:
        return self.start == 0 and not any(self.offsets)


def _key(prefix: str) -> str:
    return os.path.realpath(prefix)


def source_names(blend: DataBlend) -> list[str]:
    """Short names for log lines: the prefixes' base names (whole prefixes when two share one),
    with ``:all`` for datasets under that loss policy."""
    bases = [os.path.basename(p) for p in blend.prefixes]
    names = bases if len(set(bases)) == len(bases) else list(blend.prefixes)
    return [n + (":all" if loss == "all" else "") for n, loss in zip(names, blend.loss_policies)]


def plan_origin(blend: DataBlend, saved: dict | None, consumed_samples: int) -> tuple[BlendOrigin, str | None]:
    """(origin of the train blend, one line to print or None) for a run resuming at
    `consumed_samples` from a checkpoint whose data state is `saved` (None: a fresh run, or a
    checkpoint without one)."""
    zero = BlendOrigin(0, (0,) * len(blend))
    if not saved or consumed_samples == 0:
        return zero, None
    entries = saved["blend"]
    old = [(_key(e["prefix"]), round(e["weight"], 12), e["loss"]) for e in entries]
    new = [(_key(p), round(w, 12), loss) for p, w, loss in zip(blend.prefixes, blend.weights, blend.loss_policies)]
    if old == new:
        origin = saved["origin"]
        return BlendOrigin(int(origin["start"]), tuple(int(o) for o in origin["offsets"])), None
    by_key = {_key(e["prefix"]): (e, int(s["samples"])) for e, s in zip(entries, saved["sources"])}
    offsets, notes = [], []
    for name, prefix, loss in zip(source_names(blend), blend.prefixes, blend.loss_policies):
        entry, samples = by_key.get(_key(prefix), (None, 0))
        if entry is None:
            offsets.append(0)
            notes.append(f"{name} from 0 (new)")
        elif entry["loss"] != loss:
            offsets.append(0)
            notes.append(f"{name} from 0 (loss policy {entry['loss']} -> {loss}: packed anew)")
        else:
            offsets.append(samples)
            notes.append(f"{name} from {samples}")
    dropped = [os.path.basename(e["prefix"]) for e in entries if _key(e["prefix"]) not in {_key(p) for p in blend.prefixes}]
    line = (f"the blend changed since the checkpoint ({blend.describe()}): each source continues after the samples "
            f"it has consumed: {', '.join(notes)}" + (f"; dropped {', '.join(dropped)}" if dropped else "")
            + f"; a new blending index from sample {consumed_samples}")
    return BlendOrigin(int(consumed_samples), tuple(offsets)), line


# --------------------------------------------------------------------------- accounting


def sources_of(train_ds) -> tuple[list, np.ndarray | None, BlendOrigin]:
    """(packed datasets, blending dataset index or None, origin) of a train dataset."""
    if hasattr(train_ds, "dataset_index"):
        return train_ds.datasets, np.asarray(train_ds.dataset_index), train_ds.origin
    return [train_ds], None, BlendOrigin(0, (0,))


def consumed_per_source(train_ds, consumed_samples: int) -> list[int]:
    """Samples each source has given after `consumed_samples` train samples."""
    datasets, which, origin = sources_of(train_ds)
    if which is None:
        return [int(consumed_samples)]
    placed = np.bincount(which[: max(consumed_samples - origin.start, 0)], minlength=len(datasets))
    return [int(o + n) for o, n in zip(origin.offsets, placed.tolist())]


def sample_stats(ds, lo: int, hi: int) -> np.ndarray:
    """int64 [3]: images, LLM positions and loss-carrying targets of samples [lo, hi) (training
    order) of a PackedDataset, from its index alone (equal to its samples' `loss_mask` sums)."""
    if hi <= lo:
        return np.zeros(3, np.int64)
    index, r, tpi = ds.index, ds.reader, ds.config.tokens_per_image
    rows = np.asarray(index.shuffle[lo:hi])
    starts, ends = np.asarray(index.sample_offsets)[rows], np.asarray(index.sample_offsets)[rows + 1]
    seg_ids = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist())])
    segs = np.asarray(index.segments)[seg_ids]
    d, a, b = segs[:, 0], segs[:, 1], segs[:, 2]
    lengths = np.asarray(r.doc_lengths)[d]
    base = np.asarray(r.doc_token_offsets)[d]
    keys = _image_keys(ds)

    def images_in(x, y):  # images at document positions [x, y)
        return np.searchsorted(keys, base + y) - np.searchsorted(keys, base + x)

    images = images_in(a, b)
    if ds.config.loss_policy == "all":
        starts_loss = np.ones_like(d)
    else:  # the first image's position + 1; the length for a document without images
        offsets, positions = np.asarray(r.doc_image_offsets), np.asarray(r.image_positions)
        first = positions[np.minimum(offsets[d], max(len(positions) - 1, 0))] if len(positions) else lengths
        starts_loss = np.where(offsets[d + 1] > offsets[d], first + 1, lengths)
    t0, t1 = np.maximum(a + 1, starts_loss), np.minimum(b, lengths - 1) + 1  # targets [t0, t1)
    span = np.maximum(t1 - t0, 0)
    loss = span - np.where(span > 0, images_in(t0, np.maximum(t1, t0)), 0)
    positions = (b - a) + (tpi - 1) * images
    return np.array([images.sum(), positions.sum(), loss.sum()], np.int64)


def _image_keys(ds) -> np.ndarray:
    """Every image's position in the dataset's whole token stream (sorted), built once."""
    keys = getattr(ds, "_image_keys", None)
    if keys is None:
        r = ds.reader
        counts = np.diff(np.asarray(r.doc_image_offsets))
        doc_of_image = np.repeat(np.arange(len(counts)), counts)
        keys = np.asarray(r.doc_token_offsets)[doc_of_image] + np.asarray(r.image_positions)
        ds._image_keys = keys
    return keys


class SourceCounter:
    """Per-source totals at a data position, advanced incrementally (each call sums only the
    samples consumed since the previous one)."""

    def __init__(self, train_ds, blend: DataBlend):
        self.train_ds, self.blend = train_ds, blend
        self.datasets = sources_of(train_ds)[0]
        self.names = source_names(blend)
        self.counted = [0] * len(self.datasets)
        self.totals = [np.zeros(3, np.int64) for _ in self.datasets]

    def at(self, consumed_samples: int) -> dict:
        """{name: {samples, images, tokens, loss_tokens}} after `consumed_samples` train samples."""
        counts = consumed_per_source(self.train_ds, consumed_samples)
        out = {}
        for i, (ds, c) in enumerate(zip(self.datasets, counts)):
            if c < self.counted[i]:  # never happens in training; recount from the start
                self.counted[i], self.totals[i] = 0, np.zeros(3, np.int64)
            self.totals[i] = self.totals[i] + sample_stats(ds, self.counted[i], c)
            self.counted[i] = c
            images, tokens, loss_tokens = self.totals[i].tolist()
            out[self.names[i]] = {"samples": c, "images": images, "tokens": tokens, "loss_tokens": loss_tokens}
        return out

    def data_state(self, consumed_samples: int) -> dict:
        """What a checkpoint carries: the blend, its origin and each source's totals."""
        origin = sources_of(self.train_ds)[2]
        per_source = self.at(consumed_samples)
        return {
            "consumed_samples": int(consumed_samples),
            "blend": [{"prefix": p, "weight": w, "loss": loss}
                      for p, w, loss in zip(self.blend.prefixes, self.blend.weights, self.blend.loss_policies)],
            "origin": {"start": origin.start, "offsets": list(origin.offsets)},
            "sources": [per_source[n] for n in self.names],
        }
