"""Choosing the demonstrations of each question: random (seeded) or RICES.

A selection is a list of pool indices ordered from the first choice on; a k-shot prompt uses the
first k, placed so that the first choice comes last, next to the query (`demos_for`). Fewer
shots therefore always use a subset of the demonstrations of more shots.

Random: a generator seeded by (seed, benchmark, question id) draws without replacement, so a
question gets the same demonstrations whatever the number of GPUs, the order of questions, or
`--limit`.

RICES (retrieval-based in-context example selection): image features L2-normalised, cosine
similarity of the query's picture to every pool picture, the most similar first (ties: the lower
pool index first).

Either way the query is never its own demonstration: a pool entry with the query's id from the
same source, or with the very same picture, is never chosen.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from engine.evaluation.items import Item


def _excluded(query: Item, pool: Sequence[Item], same_source: bool) -> set[int]:
    return {j for j, d in enumerate(pool)
            if d.image_key == query.image_key or (same_source and d.id == query.id)}


def random_selection(query: Item, pool: Sequence[Item], k: int, *, seed: int, benchmark: str,
                     same_source: bool = False) -> list[int]:
    excluded = _excluded(query, pool, same_source)
    candidates = [j for j in range(len(pool)) if j not in excluded]
    rng = random.Random(f"{seed}/{benchmark}/{query.id}")
    return rng.sample(candidates, min(k, len(candidates)))


def rices_selection(query_features: torch.Tensor, pool_features: torch.Tensor, queries: Sequence[Item],
                    pool: Sequence[Item], k: int, *, same_source: bool = False) -> list[list[int]]:
    """For each query, the k most similar pool entries, most similar first."""
    q = torch.nn.functional.normalize(query_features.float(), dim=-1)
    p = torch.nn.functional.normalize(pool_features.float(), dim=-1)
    sim = q @ p.T
    out = []
    for i, query in enumerate(queries):
        row = sim[i].clone()
        for j in _excluded(query, pool, same_source):
            row[j] = float("-inf")
        allowed = int(torch.isfinite(row).sum())
        # stable descending sort: equal similarities keep pool order
        order = torch.sort(-row, stable=True).indices[: min(k, allowed)]
        out.append(order.tolist())
    return out


def demos_for(selection: Sequence[int], pool: Sequence[Item], shots: int) -> list[Item]:
    """The k-shot demonstrations in prompt order: the first choice last."""
    return [pool[j] for j in reversed(selection[:shots])]
