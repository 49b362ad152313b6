"""Which datasets a run trains on, in which proportions, and which of their tokens carry loss.

Two ways to say it, parsed into one `DataBlend`:

- ``--data-path`` (Megatron's): ``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...``. A prefix may end in
  ``:all`` or ``:after-first-image`` to choose that dataset's loss policy
  (``--data-path 0.7 out/textbook 0.3 out/wiki:all``); without a suffix it gets ``--loss-policy``.
- ``--data-blend-file FILE.yaml``: a list of ``{path, weight, loss}`` entries (``weight`` defaults
  to 1, ``loss`` to ``--loss-policy``); relative paths are taken from the working directory, as
  ``--data-path``'s are.

The loss policies (`engine.data.packing.LOSS_POLICIES`): ``after-first-image`` (the seed's rule:
no loss on a document's text before its first image, so a document without images trains
nothing) and ``all`` (every text token after the BOS trains: text-only data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.data.packing import LOSS_POLICIES

DEFAULT_LOSS_POLICY = LOSS_POLICIES[0]


def split_loss_suffix(item: str, default: str) -> tuple[str, str]:
    """``PREFIX:all`` -> (PREFIX, "all"); a prefix without a known suffix keeps `default`."""
    head, sep, tail = item.rpartition(":")
    if sep and head and tail in LOSS_POLICIES:
        return head, tail
    return item, default


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path A`` or ``--data-path 0.7 A 0.3 B`` -> (prefixes, weights); the
    prefixes as written (with any loss suffix)."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if len(items) == 1:
        return items, [1.0]
    if not items or len(items) % 2:
        raise ValueError(f"--data-path {' '.join(items)!r}: give one prefix, or weight/prefix pairs")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"--data-path {' '.join(items)!r}: weights must be numbers (weight prefix weight prefix ...)") from None
    if any(not w > 0 for w in weights):
        raise ValueError(f"--data-path {' '.join(items)!r}: weights must be positive")
    return items[1::2], weights


@dataclass(frozen=True)
class DataBlend:
    """Dataset prefixes, their weights normalised to sum to 1, and each one's loss policy
    (default: every dataset under the seed's rule)."""

    prefixes: tuple[str, ...]
    weights: tuple[float, ...]
    loss_policies: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.loss_policies:
            object.__setattr__(self, "loss_policies", (DEFAULT_LOSS_POLICY,) * len(self.prefixes))
        if not len(self.prefixes) == len(self.weights) == len(self.loss_policies):
            raise ValueError("a blend needs one weight and one loss policy per dataset")
        bad = [p for p in self.loss_policies if p not in LOSS_POLICIES]
        if bad:
            raise ValueError(f"loss policy must be one of {LOSS_POLICIES}, got {bad[0]!r}")
        if len(set(self.prefixes)) != len(self.prefixes):
            raise ValueError(f"a dataset appears twice in the blend: {list(self.prefixes)}")

    @classmethod
    def parse(cls, data_path: Sequence[str] | str, loss_policy: str = DEFAULT_LOSS_POLICY) -> "DataBlend":
        """From ``--data-path`` words; `loss_policy` for the prefixes without a suffix."""
        items, weights = parse_data_path(data_path)
        prefixes, policies = zip(*(split_loss_suffix(p, loss_policy) for p in items))
        return cls._normalised(prefixes, weights, policies)

    @classmethod
    def from_file(cls, path: str | Path, loss_policy: str = DEFAULT_LOSS_POLICY) -> "DataBlend":
        """From a YAML list of ``{path, weight, loss}``; errors name the file and the entry."""
        try:
            entries = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"--data-blend-file {path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--data-blend-file {path}: not valid YAML: {e}") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"--data-blend-file {path}: expected a list of {{path, weight, loss}} entries")
        prefixes, weights, policies = [], [], []
        for i, entry in enumerate(entries):
            where = f"--data-blend-file {path}: entry {i + 1}"
            if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "weight", "loss"}:
                raise ValueError(f"{where}: expected keys path, weight (optional), loss (optional), got {entry!r}")
            weight, policy = entry.get("weight", 1.0), entry.get("loss", loss_policy)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
            if policy not in LOSS_POLICIES:
                raise ValueError(f"{where}: loss must be one of {list(LOSS_POLICIES)}, got {policy!r}")
            prefixes.append(str(entry["path"]))
            weights.append(float(weight))
            policies.append(policy)
        return cls._normalised(prefixes, weights, policies)

    @classmethod
    def _normalised(cls, prefixes, weights, policies) -> "DataBlend":
        total = sum(weights)
        return cls(tuple(prefixes), tuple(w / total for w in weights), tuple(policies))

    def __iter__(self):
        """(weight, prefix) pairs."""
        return iter(zip(self.weights, self.prefixes))

    def __len__(self) -> int:
        return len(self.prefixes)

    def describe(self) -> str:
        """One line: ``0.700 out/textbook (after-first-image), 0.300 out/wiki (all)``."""
        return ", ".join(f"{w:.3f} {p} ({loss})" for w, p, loss in zip(self.weights, self.prefixes, self.loss_policies))
