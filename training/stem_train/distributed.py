"""Process-group set-up for ``fit``: one process, or one per device under ``torchrun``.

torchrun (any number of nodes) exports RANK, WORLD_SIZE and LOCAL_RANK; with them present and a
world larger than one, this joins the group (NCCL on CUDA, gloo on CPU) and each process takes
``cuda:LOCAL_RANK`` — no device list is hard-coded. Without them, it is a plain single process on
the requested device and every collective below is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napari_stem.devices import resolve_device_name


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only this process writes checkpoints, logs and progress bars."""
        return self.rank == 0


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU if there is one, else the CPU; ``cuda`` → ``cuda:LOCAL_RANK``."""
    requested = resolve_device_name(str(requested), torch.cuda.is_available)
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{requested}' was asked for but PyTorch sees no CUDA device; use --device cpu or auto"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto") -> Distributed:
    """Join torchrun's process group when launched by it; otherwise run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Distributed) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_over_ranks(values: list[float], ctx: Distributed) -> list[float]:
    """Each value averaged over the ranks (one all-reduce for the whole list)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / ctx.world_size).tolist()
