"""torchrun support (imported only when WORLD_SIZE > 1): tiles split over ranks (docs/architecture.md §4).

Rank r computes the reference tiles i with i % world_size == r for every query; the
per-rank top-k lists (small) are all-gathered and merged. The merge orders by (value
descending, index ascending), a total order, so the result is the same however the
tiles were grouped: exactly what one process computes with the same plan. Backends:
gloo on CPU, nccl on CUDA; the data is read from shared storage by every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._neighbors import Neighbors, merge_topk

__all__ = ["Group", "from_env"]


@dataclass
class Group:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_tiles(self, n_tiles: int) -> set[int]:
        return {i for i in range(n_tiles) if i % self.world_size == self.rank}

    def combine(self, found: Neighbors) -> Neighbors:
        """Merge every rank's top-k for the same queries; every rank gets the result."""
        k = found.k
        parts = []
        for tensor in (found.indices.contiguous(), found.values.contiguous()):
            gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(gathered, tensor)
            parts.append(gathered)
        merged = Neighbors(parts[0][0], parts[1][0])
        for indices, values in zip(parts[0][1:], parts[1][1:]):
            merged = merge_topk(merged, Neighbors(indices, values), k)
        return merged

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (small picklable values only: plans, flags)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.destroy_process_group()


def from_env(device: str) -> Group | None:
    """The torchrun group described by the environment, or None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return Group(dist.get_rank(), dist.get_world_size())
