"""torchrun helpers: one process per device, gloo on CPU, NCCL on CUDA; a no-op when run alone."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import UserError


class DistInfo(NamedTuple):
    rank: int
    """This process's index among all processes (0 when not under torchrun)."""
    world_size: int
    """Number of processes (1 when not under torchrun)."""
    local_rank: int
    """Index on this node, used to pick the CUDA device."""

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints progress."""
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if there is one; pick gloo or NCCL from the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(0, 1, 0)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:  # else torch's "invalid device ordinal" traceback, from every rank but the first
                raise UserError(f"torchrun started more processes on this machine than its {gpus} GPU"
                                f"{'' if gpus == 1 else 's'} (local rank {local_rank}), and each process needs a GPU of "
                                f"its own; pass --nproc-per-node {gpus}, or --device cpu.")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank)


def local_device(device: str, info: DistInfo) -> str:
    """`cuda` becomes `cuda:LOCAL_RANK` under torchrun; other devices are left as given. `cuda:N` under torchrun
    is refused unless N is the local rank: it put every process on GPU N, which NCCL does not run (not run here)."""
    device = str(device)
    if info.world_size == 1 or not device.startswith("cuda"):
        return device
    own = f"cuda:{info.local_rank}"
    if device not in ("cuda", own):
        raise UserError(f"--device {device} names one GPU for every torchrun process, but each process needs a GPU "
                        f"of its own (this one, local rank {info.local_rank}, is given {own}); pass --device cuda.")
    return own


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def finish_distributed(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
