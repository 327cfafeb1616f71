"""Data-parallel training across processes with torch.distributed, as `torchrun` starts them.

`torchrun --nproc-per-node N -m workbench pretrain ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in each process's environment; `init_distributed()` joins the group from them (gloo
on CPU, nccl on CUDA). A single process (no WORLD_SIZE, or 1) needs nothing and gets `Distributed()`
with rank 0 of 1. Only rank 0 writes checkpoints and talks to MLflow; the others follow.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64 on the CPU for gloo, the device for nccl)."""
        if not self.enabled:
            return list(values)
        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any JSON-like object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process torchrun did not start: the one that reports to people."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun described in the environment, or a single-process `Distributed()`."""
    world_size = world_size_from_env()
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
    assert dist.get_world_size() == world_size and dist.get_rank() == rank
    return Distributed(rank, world_size, local_rank)


def shutdown_distributed(context: Distributed) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
