"""Packing and blending indices (built in C++, ``csrc/helpers.cpp``) and their on-disk cache.

A packed sample is a list of segments ``(doc, token_start, token_end)`` whose LLM length —
text tokens plus ``tokens_per_image`` positions per image — is at most ``seq_length``. The
greedy fill rule, the per-epoch shuffles and the seeds are documented at the top of
``csrc/helpers.cpp``; in short:

- ``split``: documents are laid end to end; one that does not fit is cut at the last token
  boundary that fits (never inside an image: an image is one token) and continues at the start
  of the next sample. Every token of every document is used once per epoch.
- ``truncate``: a document that does not fit the current sample starts a new one; a document
  longer than a whole sample keeps its longest fitting prefix, the rest is dropped.

Only pieces that can train are packed: a piece whose positions hold no target that carries loss
under the dataset's loss policy (``LOSS_POLICIES``; a lone BOS left at a sample's end, a lone EOS
left by a cut, a text-only document under ``after-first-image``) is never emitted; the rule is
in ``csrc/helpers.cpp``. The loss policy is therefore part of the packing configuration.

``max_images_per_sample`` is a second budget next to ``seq_length``: a document with more images
than a sample may hold is split (or truncated) before the first image that would exceed it. A
sample must be able to hold one image, so ``seq_length < tokens_per_image`` is refused up front
rather than leaving images that fit nowhere.

Indices are cached as ``.npy`` files in one directory per parameter set, named by a hash of all
parameters and of the dataset's identity, and published with one atomic rename, so concurrent
builders (several ranks) and interrupted builds never leave a half-written index behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from engine import _helpers
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "engine._helpers (the C++ index builder) is not built: run `pip install -e .` or "
        "`python setup.py build_ext --inplace` in the repository root") from e

log = logging.getLogger(__name__)

# Bump whenever csrc/helpers.cpp would produce different arrays for the same parameters:
# it is part of every cache key, so stale indices are never reused.
INDEX_VERSION = 2

POLICIES = ("split", "truncate")
# Which targets of a document carry loss (engine/data/dataset.py builds the mask): the seed's
# rule, text after the document's first image, or every text token (text-only data).
LOSS_POLICIES = ("after-first-image", "all")


@dataclass(frozen=True)
class PackingConfig:
    seq_length: int
    tokens_per_image: int = 576
    max_images_per_sample: int | None = None  # None: only seq_length limits images
    policy: str = "split"
    seed: int = 1234
    loss_policy: str = "after-first-image"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"packing policy must be one of {POLICIES}, got {self.policy!r}")
        if self.loss_policy not in LOSS_POLICIES:
            raise ValueError(f"loss policy must be one of {LOSS_POLICIES}, got {self.loss_policy!r}")
        if self.seq_length < self.tokens_per_image:
            raise ValueError(f"seq_length {self.seq_length} cannot hold one image ({self.tokens_per_image} positions)")
        if self.max_images_per_sample is not None and self.max_images_per_sample < 1:
            raise ValueError(f"max_images_per_sample must be >= 1 or None, got {self.max_images_per_sample}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def image_limit(self) -> int:
        """The image budget handed to C++ (a number that never binds when there is no limit)."""
        if self.max_images_per_sample is None:
            return self.seq_length // self.tokens_per_image + 1
        return self.max_images_per_sample


@dataclass
class PackingIndex:
    """Samples of all epochs built so far; ``shuffle`` is the training order."""

    sample_offsets: np.ndarray  # int64 [N+1]: sample s = segments[sample_offsets[s]:sample_offsets[s+1]]
    segments: np.ndarray  # int64 [M, 3]: (doc, token_start, token_end)
    shuffle: np.ndarray  # int64 [N]: k-th sample to train on = shuffle[k]; epochs stay in order
    epoch_offsets: np.ndarray  # int64 [E+1]: samples of epoch e = shuffle[epoch_offsets[e]:epoch_offsets[e+1]]
    sample_lengths: np.ndarray  # int32 [N]: LLM positions used by sample s (the rest is padding)

    ARRAYS = ("sample_offsets", "segments", "shuffle", "epoch_offsets", "sample_lengths")

    def __len__(self) -> int:
        return len(self.shuffle)

    @property
    def num_epochs(self) -> int:
        return len(self.epoch_offsets) - 1

    def segments_of(self, k: int) -> np.ndarray:
        """Segments of the k-th sample in training order."""
        s = int(self.shuffle[k])
        return self.segments[self.sample_offsets[s] : self.sample_offsets[s + 1]]

    def efficiency(self, seq_length: int) -> float:
        """Fraction of sample positions holding document content rather than padding."""
        return float(self.sample_lengths.sum(dtype=np.int64)) / (len(self) * seq_length)


def loss_start(doc_lengths: np.ndarray, doc_image_offsets: np.ndarray, image_positions: np.ndarray,
               loss_policy: str) -> np.ndarray:
    """int64 [D]: the first token index of each document that may be a loss-carrying target.
    "all": 1 (every token after the BOS); "after-first-image": the first image's position + 1,
    or the document's length when it has no image (nothing trains)."""
    lengths = np.asarray(doc_lengths, np.int64)
    if loss_policy == "all":
        return np.ones(len(lengths), np.int64)
    if loss_policy != "after-first-image":
        raise ValueError(f"loss policy must be one of {LOSS_POLICIES}, got {loss_policy!r}")
    offsets = np.asarray(doc_image_offsets, np.int64)
    out = lengths.copy()
    has = offsets[1:] > offsets[:-1]
    out[has] = np.asarray(image_positions, np.int64)[offsets[:-1][has]] + 1
    return out


def build_packing_index(documents: np.ndarray, doc_lengths: np.ndarray, doc_image_offsets: np.ndarray,
                        image_positions: np.ndarray, config: PackingConfig, num_samples: int = 0) -> PackingIndex:
    """Pack `documents` (ids into the per-document arrays), epoch after epoch, until at least
    `num_samples` samples exist (one epoch at least), keeping only pieces that can train under
    ``config.loss_policy``."""
    lengths = np.asarray(doc_lengths, np.int64)
    offsets = np.asarray(doc_image_offsets, np.int64)
    positions = np.asarray(image_positions, np.int64)
    try:
        out = _helpers.build_packing_index(
            np.asarray(documents, np.int64), lengths, offsets, positions,
            loss_start(lengths, offsets, positions, config.loss_policy), config.seq_length,
            config.tokens_per_image, config.image_limit, config.policy, config.seed, int(num_samples))
    except ValueError as e:
        if "carries loss" in str(e) and config.loss_policy == "after-first-image":
            raise ValueError(f"{e}: under the loss policy after-first-image a document without images trains "
                             "nothing; give this dataset the loss policy 'all' (PREFIX:all)") from None
        raise
    return PackingIndex(**out)


def build_blending_index(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [N], dataset_sample_index int64 [N]) for a weighted blend: each
    sample goes to the dataset furthest below its share ``weight * samples so far``."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"blend weights must be positive finite numbers, got {weights}")
    return _helpers.build_blending_index(w / w.sum(), int(num_samples))


# ---------------------------------------------------------------------------------------- caching


def dataset_identity(idx_path: str | os.PathLike) -> dict:
    """What makes a dataset 'the same' for cached indices: its index file's path, size and mtime
    (rewriting a dataset in place changes the mtime and so invalidates its indices)."""
    st = os.stat(idx_path)
    return {"idx": os.path.realpath(idx_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_cache_dir(prefix: str | os.PathLike) -> Path:
    """``<data dir>/index-cache``, or a per-user cache when the data directory is read-only."""
    here = Path(os.path.realpath(prefix)).parent / "index-cache"
    if os.access(here if here.exists() else here.parent, os.W_OK):
        return here
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-engine" / "index-cache"
    log.warning("%s is not writable; caching indices in %s", here, user)
    return user


def cache_key(params: dict) -> str:
    """A short stable hash of JSON-serialisable parameters."""
    blob = json.dumps({"index_version": INDEX_VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def index_dir(cache_dir: str | os.PathLike, name: str, params: dict) -> Path:
    """Where the index named `name` with these parameters lives: ``<cache_dir>/<name>-<hash>``."""
    return Path(cache_dir) / f"{name}-{cache_key(params)}"


def load_or_build(cache_dir: str | os.PathLike | None, name: str, params: dict,
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from ``index_dir(cache_dir, name, params)`` (memory-mapped), built and published
    atomically on a miss. ``cache_dir=None`` builds in memory without caching."""
    if cache_dir is None:
        return build()
    final = index_dir(cache_dir, name, params)
    if final.exists() and not (final / "params.json").is_file():
        # Builders publish whole directories; this one was put together some other way.
        raise FileExistsError(f"{final} is not a complete index (no params.json): delete it to rebuild")
    if not final.exists():
        arrays = build()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            for key, arr in arrays.items():
                np.save(tmp / f"{key}.npy", arr)
            # Written last: a directory without params.json is never trusted.
            (tmp / "params.json").write_text(json.dumps({"index_version": INDEX_VERSION, **params},
                                                        indent=1, sort_keys=True, default=str))
            os.rename(tmp, final)  # atomic; fails if another process published first
        except OSError:
            if not (final / "params.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built index %s", final)
    return load_index(final)


def load_index(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a published index directory, memory-mapped."""
    return {p.stem: np.load(p, mmap_mode="r") for p in Path(path).glob("*.npy")}
