"""Where a process sits in a ``torchrun`` launch (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and the
device it computes on; shared by the command line's ``--batch`` and the trainer.

Reading the environment imports nothing; :func:`process_device` imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


class DistributedError(ValueError):
    """torchrun's variables, or the GPUs, do not fit this process (one line)."""


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a ``torchrun`` launch; ``world_size`` 1 is a plain single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env(environ: dict | None = None) -> Distributed:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``); absent or 1: one process."""
    env = os.environ if environ is None else environ
    raw = env.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE must be an integer, not {raw!r}") from None
    if world <= 1:
        return Distributed()
    try:
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise DistributedError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or not integers: "
                               "launch several processes with torchrun") from None
    if not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK={rank} / LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return Distributed(world, rank, local)


def process_device(name: str, dist_info: Distributed) -> torch.device:
    """``--device`` resolved (:func:`model.resolve_device`); under ``torchrun`` on CUDA each process
    takes cuda:LOCAL_RANK."""
    import torch

    from .model import resolve_device

    device = resolve_device(name)
    if not dist_info.enabled or device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if n < dist_info.local_rank + 1:
        raise DistributedError(f"torchrun process with local rank {dist_info.local_rank} needs cuda:{dist_info.local_rank} "
                               f"but only {n} CUDA GPU(s) are visible (use --nproc_per_node {n} or fewer, or --device cpu)")
    return torch.device("cuda", dist_info.local_rank)
