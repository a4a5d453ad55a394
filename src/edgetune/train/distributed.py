"""DDP under ``torchrun``: process-group set-up, rank sharding, and a weights-in-sync check."""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "barrier", "exit_process", "init_distributed", "is_distributed", "params_checksum", "ranks_in_sync", "shutdown"]

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
    """Wait for every rank after the last collective.

    The group is left to process exit: destroying a gloo group right after a barrier can race with a peer
    still finishing that barrier and abort it ("terminate called without an active exception").
    """
    if is_distributed():
        dist.barrier()


def exit_process(code: int = 0) -> None:
    """End this process with ``code``. In a distributed run, skip interpreter teardown once outputs are flushed:
    tearing down gloo's threads at exit aborts a rank now and then ("terminate called without an active
    exception"), which torchrun reports as a failed run although every file was written. Call it last in a
    script run under torchrun; the ``edgetune`` command does."""
    import logging as _logging
    import os
    import sys

    if is_distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        _logging.shutdown()
        os._exit(code)
    sys.exit(code)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def tensor_checksums(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer's bytes, by state-dict name."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def params_checksum(model: nn.Module) -> str:
    """One SHA-256 over every parameter and buffer, in state-dict order."""
    h = hashlib.sha256()
    for k, v in tensor_checksums(model).items():
        h.update(k.encode())
        h.update(v.encode())
    return h.hexdigest()


def ranks_in_sync(model: nn.Module) -> tuple[bool, list[str], list[str]]:
    """Gather every rank's checksums: (all equal, one checksum per rank, names of tensors that differ)."""
    mine = tensor_checksums(model)
    total = params_checksum(model)
    if not is_distributed():
        return True, [total], []
    gathered: list[tuple[str, dict[str, str]]] = [("", {})] * dist.get_world_size()
    dist.all_gather_object(gathered, (total, mine))
    sums = [g[0] for g in gathered]
    differ = sorted(k for k in mine if len({g[1].get(k) for g in gathered}) > 1)
    return len(set(sums)) == 1, sums, differ
