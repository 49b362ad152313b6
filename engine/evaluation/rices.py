"""Image features for RICES: from a CLIP vision model directory or from the evaluated model's own
vision tower, computed once per image list and cached on disk.

The cache file is keyed by benchmark, split, encoder and the exact list of pictures (a sha256 of
all four), so a different split, encoder, `--limit` or data release never reuses stale features.
Under torchrun each rank encodes its shard of the pictures and the features are gathered; rank 0
writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from engine.evaluation.images import open_image
from engine.evaluation.items import Item
from engine.evaluation.sharding import World

Encoder = Callable[[Sequence], torch.Tensor]  # pictures -> [N, D] float32 features, on CPU


def cache_key(benchmark: str, split: str, encoder_id: str, image_keys: Sequence[str]) -> str:
    blob = json.dumps([benchmark, split, encoder_id, list(image_keys)], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: Path, benchmark: str, split: str, key: str) -> Path:
    return Path(cache_dir) / f"rices_{benchmark}_{split}_{key[:20]}.pt"


def features(items: Sequence[Item], encode: Encoder, *, benchmark: str, split: str, encoder_id: str,
             cache_dir: Path | None, world: World = World(), batch_size: int = 32) -> torch.Tensor:
    """[len(items), D] features of the items' pictures, from the cache when it holds them."""
    key = cache_key(benchmark, split, encoder_id, [it.image_key for it in items])
    path = cache_path(cache_dir, benchmark, split, key) if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key and saved["features"].shape[0] == len(items):
            return saved["features"]
    mine = world.shard(list(items))
    parts = [encode([it.image for it in mine[i:i + batch_size]]).float().cpu()
             for i in range(0, len(mine), batch_size)]
    local = torch.cat(parts) if parts else torch.zeros(0, 0)
    rows = world.merge(list(local.unbind(0)) if local.numel() else [])
    feats = torch.stack(rows) if rows else torch.zeros(0, 0)
    if path is not None and world.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "features": feats}, tmp)
        os.replace(tmp, path)
    return feats


class ClipEncoder:
    """Pooled CLS features of a transformers CLIPVisionModel directory (`--rices-encoder`); images
    are prepared as in training (pad to square with the CLIP mean, resize, crop, normalise)."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPVisionModel

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise FileNotFoundError(f"--rices-encoder: {self.directory} has no config.json "
                                    "(expected a CLIP vision model directory)")
        self.model = CLIPVisionModel.from_pretrained(self.directory).to(device).eval()
        self.device = device
        self.size = int(self.model.config.image_size)

    @property
    def encoder_id(self) -> str:
        cfg = (self.directory / "config.json").read_bytes()
        return f"clip:{self.directory.resolve()}:{hashlib.sha256(cfg).hexdigest()[:12]}"

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        from engine.data.images import normalize, preprocess

        import numpy as np

        pixels = np.stack([preprocess(open_image(im), self.size) for im in images])
        x = normalize(torch.from_numpy(pixels)).to(self.device, self.model.dtype)
        return self.model(pixel_values=x).pooler_output.float().cpu()
