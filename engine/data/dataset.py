"""Packed samples (the dict of docs/internals.md) from a binary dataset, and weighted blends.

A sample is built from its segments ``(doc, start, end)`` (see ``packing.py``) by expanding each
``<image>`` token into ``tokens_per_image`` positions. In those LLM positions:

- ``labels[t]`` is the token at position t+1 of the same document. The last position of a
  segment that stops inside its document (a split) reads one token past the segment, so no
  target is lost at a cut; at the document's end there is no target.
- ``loss_mask[t]`` is 1 only when that target is a text token of the document that the dataset's
  loss policy (``PackingConfig.loss_policy``) trains: under ``after-first-image`` (the seed's
  rule, the default) text after the document's first image (the document's, not the segment's:
  a continuation segment keeps training on text), under ``all`` every text token after the BOS.
  It is 0 for image targets, for the document's last position, on padding, and under
  ``after-first-image`` for text up to the first image (so for every position of a document
  without images).
- ``position_ids`` restart at 0 at every segment and for the padding tail; ``cu_seqlens`` holds
  the segment boundaries, the padding tail (pad id, no loss) being the last segment.

Images are served as stored, uint8 [N, H, W, 3]: they cross the worker processes, pinning and the
host-to-device copy at a quarter of the float bytes, and `engine.data.loader.to_device` normalises
them, the one place that does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import LLAMA_SPECIAL_TOKENS
from engine.data.blend import DataBlend, parse_data_path  # noqa: F401  (re-exported)
from engine.data.format import FormatError, IndexedDataset
from engine.data.sources import BlendOrigin
from engine.data.packing import (PackingConfig, PackingIndex, build_blending_index, build_packing_index,
                                 dataset_identity, default_cache_dir, index_dir, load_index,
                                 load_or_build)
from engine.errors import SampleError

SPLITS = ("train", "valid", "test")


def _documents(segments: np.ndarray) -> str:
    return ", ".join(f"doc {d} tokens [{a}, {b})" for d, a, b in segments.tolist())


def parse_split(split: str | Sequence[float]) -> list[float]:
    """Megatron's ``--split 969,30,1`` (also ``"98/2/0"``, or a list) -> three fractions."""
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--split {split!r}: expected up to three numbers like 969,30,1") from None
    else:
        weights = [float(w) for w in split]
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: expected one to three non-negative numbers, not all zero")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class DataSplit:
    """``--split`` parsed once: the flag as given (it names the split in cache keys and
    messages) and its train, valid and test fractions (`parse_split`)."""

    spec: str
    fractions: tuple[float, float, float]

    @classmethod
    def parse(cls, split: str) -> "DataSplit":
        return cls(str(split), tuple(parse_split(split)))

    def __str__(self) -> str:
        return self.spec


def split_ranges(num_documents: int, split: DataSplit | str | Sequence[float]) -> list[tuple[int, int]]:
    """Consecutive document ranges [lo, hi) for train, valid and test (together: every document)."""
    fractions = list(split.fractions) if isinstance(split, DataSplit) else parse_split(split)
    bounds = np.round(np.cumsum([0.0] + fractions) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


class PackedDataset(torch.utils.data.Dataset):
    """Packed samples of one split of one binary dataset.

    ``num_samples`` samples are served (whole epochs are packed until there are enough; None
    serves exactly one epoch). ``cache_dir`` holds the packing index (default: next to the data,
    see ``packing.default_cache_dir``); ``cache=False`` builds it in memory.
    """

    def __init__(self, prefix: str | os.PathLike, config: PackingConfig, *, split: str = "train",
                 split_weights: DataSplit | str | Sequence[float] = "969,30,1", num_samples: int | None = None,
                 pad_id: int = LLAMA_SPECIAL_TOKENS.pad, cache_dir: str | os.PathLike | None = None, cache: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.reader = IndexedDataset(prefix)
        self.prefix, self.config, self.split, self.pad_id = str(prefix), config, split, int(pad_id)
        lo, hi = split_ranges(self.reader.num_documents, split_weights)[SPLITS.index(split)]
        if lo == hi:
            raise ValueError(f"{prefix}: the {split} split of --split {split_weights} has no documents "
                             f"(of {self.reader.num_documents})")
        self.documents = (lo, hi)
        params = {"kind": "packing", "dataset": dataset_identity(self.reader.idx_path), "documents": [lo, hi],
                  "num_samples": int(num_samples or 0), **config.__dict__}

        def build():
            r = self.reader
            index = build_packing_index(np.arange(lo, hi, dtype=np.int64), r.doc_lengths, r.doc_image_offsets,
                                        r.image_positions, config, int(num_samples or 0))
            return {name: getattr(index, name) for name in PackingIndex.ARRAYS}

        if cache:
            cache_dir = cache_dir if cache_dir is not None else default_cache_dir(prefix)
        name = f"{os.path.basename(self.prefix)}.{split}.packing"
        self.index = PackingIndex(**load_or_build(cache_dir if cache else None, name, params, build))
        self._index_dir = index_dir(cache_dir, name, params) if cache else None
        epoch = int(self.index.epoch_offsets[1])
        self.num_samples = epoch if num_samples is None else int(num_samples)
        if self.num_samples > len(self.index):
            raise RuntimeError(f"packing index {name} has {len(self.index)} samples, {self.num_samples} requested")

    def __len__(self) -> int:
        return self.num_samples

    # A worker process started by spawn re-opens the memory-mapped index instead of receiving a
    # copy of it (the reader re-opens its files the same way).
    def __getstate__(self):
        state = dict(self.__dict__)
        if self._index_dir is not None:
            state["index"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.index is None:
            self.index = PackingIndex(**load_index(self._index_dir))

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        """Sample k, its images as stored (uint8 [N, H, W, 3]; `loader.to_device` normalises them)."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample {k} out of range [0, {self.num_samples})")
        segments = self.index.segments_of(k)
        try:
            return self.build_sample(segments)
        except Exception as e:
            raise SampleError(f"{self.prefix} ({self.split}): cannot build sample {k} ({_documents(segments)}): "
                              f"{type(e).__name__}: {e}") from e

    def describe(self, k: int) -> str:
        """Where sample k comes from: the dataset, the split and the documents (token ranges)."""
        return f"{self.prefix} ({self.split}) sample {k}: {_documents(self.index.segments_of(k))}"

    def build_sample(self, segments: np.ndarray) -> dict[str, torch.Tensor]:
        """The internals.md sample dict for a list of segments."""
        r, seq, tpi = self.reader, self.config.seq_length, self.config.tokens_per_image
        image_id = r.image_token_id
        tokens = np.full(seq, self.pad_id, np.int64)
        labels = np.full(seq, self.pad_id, np.int64)
        loss_mask = np.zeros(seq, np.float32)
        position_ids = np.empty(seq, np.int64)
        cu_seqlens, image_ids, image_offsets = [0], [], []
        t = 0
        for d, a, b in segments.tolist():
            doc_length = int(r.doc_token_offsets[d + 1] - r.doc_token_offsets[d])
            stream = np.asarray(r.tokens(d, a, min(b + 1, doc_length)), dtype=np.int64)  # + the next token
            seg = stream[: b - a]
            img_lo, img_hi = int(r.doc_image_offsets[d]), int(r.doc_image_offsets[d + 1])
            positions = np.asarray(r.image_positions[img_lo:img_hi])  # the document's images
            k0, k1 = np.searchsorted(positions, [a, b])
            local = positions[k0:k1] - a  # images of this segment, as indices into `seg`
            if np.count_nonzero(seg == image_id) != len(local) or np.any(seg[local] != image_id):
                raise FormatError(f"{r.idx_path}: document {d}: <image> tokens disagree with the image positions")

            counts = np.ones(b - a, np.int64)
            counts[local] = tpi
            n = int(counts.sum())
            if t + n > seq:
                raise ValueError(f"segments need more than seq_length={seq} positions: the packing index does "
                                 "not match this dataset or configuration")
            expanded = np.repeat(seg, counts)
            # Document index of the token each position's label comes from (the next position's).
            target = np.empty(n, np.int64)
            target[:-1] = np.repeat(np.arange(a, b), counts)[1:]
            target[-1] = b
            tokens[t : t + n] = expanded
            labels[t : t + n - 1] = expanded[1:]
            has_next = b < doc_length
            labels[t + n - 1] = stream[b - a] if has_next else self.pad_id
            mask = (labels[t : t + n] != image_id) & (target >= self._loss_start(positions, doc_length))
            mask[-1] &= has_next
            loss_mask[t : t + n] = mask
            position_ids[t : t + n] = np.arange(n)
            image_ids.extend(range(img_lo + k0, img_lo + k1))
            image_offsets.extend((t + local + (tpi - 1) * np.arange(len(local))).tolist())
            t += n
            cu_seqlens.append(t)
        if t < seq:  # padding is its own segment
            position_ids[t:] = np.arange(seq - t)
            cu_seqlens.append(seq)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
            "images": self._images(image_ids),
            "image_offsets": torch.tensor(image_offsets, dtype=torch.int64),
        }

    def _loss_start(self, positions: np.ndarray, doc_length: int) -> int:
        """The first token of a document that may be a loss-carrying target (`packing.loss_start`)."""
        if self.config.loss_policy == "all":
            return 1
        return int(positions[0]) + 1 if len(positions) else doc_length  # no image: no loss

    def _images(self, ids: list[int]) -> torch.Tensor:
        size = self.reader.image_size
        pixels = np.empty((len(ids), size, size, 3), np.uint8)
        for j, i in enumerate(ids):
            pixels[j] = self.reader.image(i)
        return torch.from_numpy(pixels)

    def __repr__(self) -> str:
        return (f"PackedDataset({self.prefix!r}, {self.split}: documents [{self.documents[0]}, {self.documents[1]}), "
                f"{self.num_samples} samples of {self.config.seq_length}, {self.index.num_epochs} epoch(s), "
                f"packing efficiency {self.index.efficiency(self.config.seq_length):.1%})")


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets in proportion to their weights: sample k is sample
    ``sample_index[k]`` of dataset ``dataset_index[k]`` (see ``packing.build_blending_index``).

    With an `origin` (a blend changed on resume, `engine.data.sources`), the index places samples
    from ``origin.start`` on: sample k >= start is sample ``offsets[i] + sample_index[k - start]``
    of dataset ``i = dataset_index[k - start]``; the samples before start were consumed under the
    earlier blend and are not served."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], dataset_index: np.ndarray,
                 sample_index: np.ndarray, origin: BlendOrigin | None = None):
        self.datasets, self.dataset_index, self.sample_index = list(datasets), dataset_index, sample_index
        self.origin = origin or BlendOrigin(0, (0,) * len(self.datasets))
        needed = np.bincount(np.asarray(dataset_index), minlength=len(self.datasets)) + np.array(self.origin.offsets)
        # Each dataset may have its own loss policy; everything else about packing must agree.
        kinds = {(ds.reader.image_token_id, ds.reader.image_size, dataclasses.replace(ds.config, loss_policy="all"))
                 for ds in self.datasets if isinstance(ds, PackedDataset)}
        if len(kinds) > 1:
            raise ValueError(f"blended datasets disagree on (image_token_id, image_size, packing): {sorted(map(str, kinds))}")
        for ds, n in zip(self.datasets, needed.tolist()):
            if len(ds) < n:
                raise ValueError(f"{ds!r} has {len(ds)} samples, the blend needs {n}")

    def __len__(self) -> int:
        return self.origin.start + len(self.dataset_index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        part, j = self._locate(k)
        return part[j]

    def describe(self, k: int) -> str:
        part, j = self._locate(k)
        where = part.describe(j) if hasattr(part, "describe") else f"sample {j} of {part!r}"
        return f"blend sample {k} = {where}"

    def _locate(self, k: int) -> tuple[torch.utils.data.Dataset, int]:
        if not self.origin.start <= k < len(self):
            raise IndexError(f"sample {k} out of range [{self.origin.start}, {len(self)})")
        i = int(self.dataset_index[k - self.origin.start])
        return self.datasets[i], self.origin.offsets[i] + int(self.sample_index[k - self.origin.start])

    def __repr__(self) -> str:
        shares = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets)) / max(len(self.dataset_index), 1)
        parts = ", ".join(f"{s:.3f} x {ds!r}" for s, ds in zip(shares, self.datasets))
        start = "" if self.origin.is_zero else f", placed from sample {self.origin.start}, sources from {list(self.origin.offsets)}"
        return f"BlendedDataset({len(self)} samples{start}: {parts})"


def build_datasets(blend: DataBlend, config: PackingConfig, *, split: DataSplit,
                   num_samples: Sequence[int | None] = (None, None, None), pad_id: int = LLAMA_SPECIAL_TOKENS.pad,
                   cache_dir: str | os.PathLike | None = None,
                   train_origin: BlendOrigin | None = None) -> list[torch.utils.data.Dataset | None]:
    """Train, valid and test datasets for Megatron-style ``--data-path`` and ``--split``, parsed
    (`DataBlend.parse`, `DataSplit.parse`).

    Each prefix is split by documents; a blend mixes the same split of every prefix; each prefix
    is packed under its own loss policy (``blend.loss_policies``; `config.loss_policy` is
    replaced by it). A split is
    None when its ``--split`` share is zero or it is asked for zero samples; ``None`` samples
    means one epoch (a blend needs a number). `train_origin` places the train blend from a later
    sample with each source from an offset (a blend changed on resume, `engine.data.sources`);
    a train split with an origin is a BlendedDataset even of one prefix. Under torch.distributed, rank 0 builds the indices
    first and the other ranks then read them from the cache.
    """
    prefixes, weights = list(blend.prefixes), list(blend.weights)
    configs = [dataclasses.replace(config, loss_policy=loss) for loss in blend.loss_policies]
    shares = split.fractions
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    out = []
    for which, name in enumerate(SPLITS):
        n = num_samples[which]
        origin = train_origin if name == "train" and train_origin is not None and not train_origin.is_zero else None
        if shares[which] == 0 or n == 0:
            out.append(None)
        elif len(prefixes) == 1 and origin is None:
            out.append(PackedDataset(prefixes[0], configs[0], split=name, split_weights=split, num_samples=n,
                                     pad_id=pad_id, cache_dir=cache_dir))
        else:
            if n is None:
                raise ValueError(f"blending {len(prefixes)} datasets needs a number of {name} samples")
            start, offsets = (origin.start, origin.offsets) if origin else (0, (0,) * len(prefixes))
            if n <= start:
                raise ValueError(f"the run has consumed {start} of its {n} {name} samples: nothing left to blend")
            params = {"kind": "blend", "datasets": [dataset_identity(p + ".idx") for p in prefixes],
                      "loss_policies": list(blend.loss_policies),
                      "weights": weights, "num_samples": int(n - start), "split": name, "split_weights": str(split)}
            where = cache_dir if cache_dir is not None else default_cache_dir(prefixes[0])

            def build():
                dataset_index, sample_index = build_blending_index(weights, n - start)
                return {"dataset_index": dataset_index, "sample_index": sample_index}

            index = load_or_build(where, f"{os.path.basename(prefixes[0])}.{name}.blend", params, build)
            counts = np.bincount(np.asarray(index["dataset_index"]), minlength=len(prefixes)) + np.array(offsets)
            parts = [PackedDataset(p, cfg, split=name, split_weights=split, num_samples=max(int(c), 1),
                                   pad_id=pad_id, cache_dir=cache_dir) for p, cfg, c in zip(prefixes, configs, counts)]
            out.append(BlendedDataset(parts, index["dataset_index"], index["sample_index"],
                                      origin or BlendOrigin(0, (0,) * len(prefixes))))
    if distributed and dist.get_rank() == 0:
        dist.barrier()
    return out
