"""Streaming access to Hugging Face weight files, one tensor at a time.

A 7B checkpoint is ~13.5 GB in bf16; the converters run on a 24 GiB machine while an engine
model of the same size is alive, so nothing here ever materialises a whole checkpoint:

* `WeightReader` opens a directory in any of the layouts `save_pretrained` has produced
  (sharded or single, safetensors or PyTorch `.bin`) and hands out tensors by name. Safetensors
  are read through `safe_open` (memory-mapped, one tensor copied per `get`); `.bin` shards are
  loaded with `torch.load(mmap=True)`, so only the touched pages come into memory, and only one
  `.bin` shard is kept open at a time.
* `ShardedSafetensorsWriter` buffers tensors up to a shard size, writes each shard as soon as it
  is full and finishes with the `model.safetensors.index.json` that `from_pretrained` reads.

Errors name the directory, the file and the tensor (`CheckpointError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


class WeightReader:
    """Read-only, lazy view of the weights in a Hugging Face model directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such directory")
        self._safe_handles: dict[str, object] = {}
        self._bin_name: str | None = None
        self._bin_tensors: dict[str, torch.Tensor] | None = None
        self._kind, self._weight_map = self._discover()

    # -- discovery ------------------------------------------------------------------------

    def _discover(self) -> tuple[str, dict[str, str]]:
        d = self.directory
        for index_name, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if (d / index_name).is_file():
                index = read_json(d / index_name)
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{d / index_name}: no 'weight_map' entries")
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise CheckpointError(
                        f"{d / index_name} lists {len(set(weight_map.values()))} shard(s) but "
                        f"{len(missing)} are missing from {d}: {', '.join(missing)} (incomplete download?)")
                return kind, dict(weight_map)
        if (d / SAFE_SINGLE).is_file():
            return "safetensors", self._map_single(SAFE_SINGLE, "safetensors")
        if (d / BIN_SINGLE).is_file():
            return "bin", self._map_single(BIN_SINGLE, "bin")
        loose = sorted(p.name for p in d.glob("*.safetensors"))
        if len(loose) == 1:
            return "safetensors", self._map_single(loose[0], "safetensors")
        raise CheckpointError(
            f"{d}: no weights found (expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}"
            + (f"; found several unindexed shards {loose}" if loose else "") + ")")

    def _map_single(self, name: str, kind: str) -> dict[str, str]:
        if kind == "safetensors":
            keys = self._safe(name).keys()
        else:
            keys = self._bin(name).keys()
        return {k: name for k in keys}

    # -- file handles ---------------------------------------------------------------------

    def _safe(self, name: str):
        from safetensors import safe_open

        handle = self._safe_handles.get(name)
        if handle is None:
            try:
                handle = safe_open(str(self.directory / name), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.directory / name}: cannot open as safetensors ({e})") from None
            self._safe_handles[name] = handle
        return handle

    def _bin(self, name: str) -> dict[str, torch.Tensor]:
        if self._bin_name != name:
            self._bin_tensors = None  # drop the previous shard's mapping before opening the next
            path = self.directory / name
            try:
                self._bin_tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot load as a PyTorch state dict ({e})") from None
            if not isinstance(self._bin_tensors, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, got {type(self._bin_tensors).__name__}")
            self._bin_name = name
        return self._bin_tensors

    # -- public API -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def file_of(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.file_of(name)
        if self._kind == "safetensors":
            handle = self._safe(file)
            try:
                return tuple(handle.get_slice(name).get_shape())
            except Exception:
                raise self._not_in_shard(name, file) from None
        return tuple(self._bin_tensor(name, file).shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, as an independent CPU tensor (not a view of a mapped file)."""
        file = self.file_of(name)
        if self._kind == "safetensors":
            handle = self._safe(file)
            try:
                return handle.get_tensor(name)
            except Exception:
                raise self._not_in_shard(name, file) from None
        return self._bin_tensor(name, file).clone()

    def _bin_tensor(self, name: str, file: str) -> torch.Tensor:
        tensors = self._bin(file)
        if name not in tensors:
            raise self._not_in_shard(name, file)
        return tensors[name]

    def _not_in_shard(self, name: str, file: str) -> CheckpointError:
        return CheckpointError(
            f"{self.directory / file}: the index places tensor {name!r} in this shard but it is not there "
            f"(corrupt or mismatched shard)")

    def close(self) -> None:
        self._safe_handles.clear()
        self._bin_tensors = None
        self._bin_name = None

    def __enter__(self) -> "WeightReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Write tensors into `model-0000i-of-0000N.safetensors` shards plus an index.

    Shards are written as they fill (at most `max_shard_bytes` buffered), under temporary
    names, and renamed once the shard count is known. A single shard is written as
    `model.safetensors` without an index, as `save_pretrained` does.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 2**30):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise CheckpointError(f"tensor {name!r} written twice to {self.directory}")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors needs contiguous tensors that own their memory.
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.directory / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._buffer, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = [SAFE_SINGLE]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self._shards, names):
            os.replace(tmp, self.directory / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(self.directory / SAFE_INDEX, "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        return names
