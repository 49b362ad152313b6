"""Data parallelism for evaluation: which questions a rank answers, and putting the answers of
all ranks back together in the benchmark's order.

`shard_indices` and `merge_shards` are pure functions (tested without processes): rank r of w
answers questions r, r + w, r + 2w, ...; merging the ranks' lists restores the original order,
so results, predictions and errors files are the same for any number of GPUs. `World` is the
only place that talks to torch.distributed (all_gather_object), and only when it is initialised
with more than one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(range(rank, n, world_size))


def merge_shards(per_rank: Sequence[Sequence[Any]]) -> list[Any]:
    """Inverse of sharding: element i of rank r's list was item r + i * world_size."""
    world_size = len(per_rank)
    n = sum(len(s) for s in per_rank)
    out: list[Any] = [None] * n
    for rank, part in enumerate(per_rank):
        expected = len(shard_indices(n, rank, world_size))
        if len(part) != expected:
            raise ValueError(f"rank {rank} returned {len(part)} entries, expected {expected}")
        for i, value in enumerate(part):
            out[rank + i * world_size] = value
    return out


@dataclass(frozen=True)
class World:
    """This process's place among the evaluating ranks."""

    rank: int = 0          # data-parallel rank: which shard of the questions
    size: int = 1          # data-parallel ranks
    replicas: int = 1      # processes per data-parallel rank (tensor parallel), consecutive ranks

    @classmethod
    def current(cls, tensor_parallel: int = 1) -> "World":
        """From torch.distributed when initialised: consecutive groups of `tensor_parallel`
        processes share one model and answer the same shard."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        if tensor_parallel < 1 or world % tensor_parallel:
            raise ValueError(f"--tp {tensor_parallel} does not divide the {world} processes")
        return cls(rank // tensor_parallel, world // tensor_parallel, tensor_parallel)

    def shard(self, seq: Sequence[Any]) -> list[Any]:
        return [seq[i] for i in shard_indices(len(seq), self.rank, self.size)]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size * self.replicas == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * (self.size * self.replicas)
        dist.all_gather_object(out, obj)
        return out[:: self.replicas]

    def merge(self, part: Sequence[Any]) -> list[Any]:
        """The shards of all ranks back in the original order (on every rank)."""
        return merge_shards(self.gather(list(part)))
