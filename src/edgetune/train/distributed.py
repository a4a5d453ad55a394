"""DDP under ``torchrun``: process-group set-up, rank sharding, and a weights-in-sync check."""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "is_distributed", "params_checksum", "ranks_in_sync", "barrier", "shutdown"]

log = logging.getLogger(__name__)


class DistInfo:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank, world, local_rank)


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def params_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer's bytes, in state-dict order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ranks_in_sync(model: nn.Module) -> tuple[bool, list[str]]:
    """Gather every rank's checksum; True when all are equal."""
    mine = params_checksum(model)
    if not is_distributed():
        return True, [mine]
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return len(set(gathered)) == 1, gathered
