"""Process-group start-up from the launcher's environment (deepspeed, torchrun, plain python).

All supported launchers describe the job with the same variables: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (the ``deepspeed`` launcher and ``torchrun`` set
them). Without ``WORLD_SIZE``, a process started by plain ``srun`` or ``mpirun`` learns its place
from the scheduler's own variables (:mod:`megatron_glm.training.rank_discovery`). A process with
none of them is a world of one: it gets a loopback rendezvous on a free port, so ``python -m
megatron_glm.pretrain`` runs DeepSpeed exactly like a multi-process job.

:func:`read_dist_env` only reads; it is what configuration validation uses to learn the world
size *before* any process group exists. :func:`init_distributed` then starts the group through
``deepspeed.init_distributed`` (gloo on CPU via ``DS_ACCELERATOR=cpu``, NCCL on CUDA).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_glm.compat.torch import set_subgroup_timeout
from megatron_glm.training.rank_discovery import find_task, free_port_on, resolve_rendezvous

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str = "launcher variables (RANK, WORLD_SIZE)"
    """Where the rank came from, for the start-up log line."""


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Parse the launcher variables (``os.environ`` by default) without starting anything.

    ``WORLD_SIZE`` set (deepspeed, torchrun, or by hand): those variables, whatever scheduler
    variables the process also inherited. Otherwise the scheduler's (:func:`discover_world`);
    none: a single process. A multi-process world must name its rank and its rendezvous
    (``MASTER_ADDR``/``MASTER_PORT``); a missing one is reported by name, as is a scheduler job
    of several tasks this process cannot join (ValueError: the entry points exit 2).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return discover_world(env)
    world = _int_env(env, "WORLD_SIZE")
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env and world > 1]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with deepspeed, torchrun "
            "or a launch/ script, which set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    rank = _int_env(env, "RANK") if "RANK" in env else 0
    local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world})")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        master_addr=env.get("MASTER_ADDR"),
        master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
    )


def discover_world(env: Mapping[str, str]) -> DistEnv:
    """The world of a process started by ``srun``/``mpirun`` (or of one, with no scheduler)."""
    task = find_task(env)
    if task is None or task.size == 1:
        return DistEnv(
            rank=0,
            world_size=1,
            local_rank=0,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            source="a single process" if task is None else task.source,
        )
    if not 0 <= task.rank < task.size:
        raise ValueError(f"{task.source}: rank {task.rank} is not in [0, {task.size})")
    meet = resolve_rendezvous(task, env)
    return DistEnv(
        rank=task.rank,
        world_size=task.size,
        local_rank=meet.local_rank,
        master_addr=meet.addr,
        master_port=meet.port,
        source=task.source,
    )


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for a world of one)."""
    return free_port_on("127.0.0.1")


def init_distributed(env: DistEnv, *, timeout_minutes: float = 30.0) -> torch.device:
    """Start the default process group for ``env`` and return this rank's device.

    A world of one without a rendezvous gets ``127.0.0.1`` and a free port. The variables are
    written to ``os.environ`` because DeepSpeed reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` from
    there itself (engine and launcher utilities), so both must agree. ``timeout_minutes``
    bounds every collective of the world group *and* of every group created later (see
    :func:`megatron_glm.compat.torch.set_subgroup_timeout`), and the rendezvous store's
    operations.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron_glm.compat.deepspeed import skip_shm_comm_build

    if dist.is_initialized():
        raise RuntimeError("init_distributed: a default process group already exists")
    values = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr or "127.0.0.1",
        "MASTER_PORT": str(env.master_port if env.master_port is not None else free_port()),
    }
    os.environ.update(values)
    logger.info(
        "process group: rank %d of %d from %s, rendezvous %s:%s",
        env.rank,
        env.world_size,
        env.source,
        values["MASTER_ADDR"],
        values["MASTER_PORT"],
    )
    skip_shm_comm_build()  # no C++ build of an op training never uses (see the seam)
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(env.local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    set_subgroup_timeout(timeout)
    deepspeed.init_distributed(
        dist_backend=accel.communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=timeout,
        verbose=False,
    )
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(env.local_rank))


def destroy_distributed() -> None:
    """Tear the default process group down (idempotent) and restore torch's group timeout."""
    if dist.is_initialized():
        dist.destroy_process_group()
    set_subgroup_timeout(None)


def all_reduce(
    tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """In-place all-reduce over ``group`` (default: the world); a no-op without a group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor
