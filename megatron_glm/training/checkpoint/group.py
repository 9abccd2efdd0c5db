"""The few collectives saving and loading need (no-ops in a process without a group)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def ranks_where(flag: bool, device: torch.device) -> list[int]:
    """Collective (world): the ranks on which ``flag`` holds, the same list on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[rank()] = int(flag)
    if dist.is_initialized():
        dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]
