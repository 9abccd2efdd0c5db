"""Rank discovery: this process's place in a job started by a scheduler, not by a launcher.

``deepspeed`` and ``torchrun`` export ``RANK``/``WORLD_SIZE``/... for each rank; plain ``srun``,
``mpirun`` (Open MPI), ``mpiexec`` (MPICH/Hydra, Intel MPI, MVAPICH) start the same command N
times and describe each copy in their own variables instead. Without this module each copy would
see no ``WORLD_SIZE`` and train as a world of one, all writing the same checkpoint directory.

:func:`discover` reads those variables (``os.environ`` is never written here):

- MPI launchers first (``OMPI_COMM_WORLD_*``, ``MV2_COMM_WORLD_*``, ``PMI_RANK``/``PMI_SIZE``):
  an ``mpirun`` inside a SLURM allocation starts its daemons with ``srun``, so its ranks inherit
  a SLURM step of one task per *node*, which is not theirs. When a SLURM step with the same size
  and rank is also present (``srun --mpi=pmi2/pmix`` launched the ranks itself), SLURM's node
  list names the master.
- A SLURM step (``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``): master = first
  host of the step's node list (rank 0 runs there).
- The batch script or ``salloc`` shell of a job of several tasks (no step): refused, because a
  process there is none of the tasks; a job of one task is a world of one.

The rendezvous of an MPI world: ``MASTER_ADDR`` if set; 127.0.0.1 when every rank is on one node
(the launcher's local size equals the world size); else rank 0's host name broadcast with mpi4py
(the ``[mpi]`` extra). The port: ``MASTER_PORT``, the one mpi4py broadcast, or one derived from
the job id (same on every rank without any communication). A world that cannot be formed raises
ValueError naming what to set: the entry points turn that into exit status 2.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

PORT_BASE, PORT_SPAN = 20000, 20000
"""Derived rendezvous ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known and
registered-service ports most sites use, below Linux's ephemeral range (32768+ by default)."""

MPI_HINT = (
    "export MASTER_ADDR=<first node's address> (and MASTER_PORT) and pass them to every rank "
    "(mpirun -x MASTER_ADDR -x MASTER_PORT; see launch/mpirun.sh), or install mpi4py "
    "(pip install 'megatron_glm[mpi]') so that rank 0 can send its address"
)


@dataclass(frozen=True)
class SchedulerTask:
    """One process of a scheduler's job, as its variables describe it.

    ``local_rank`` is None when the launcher does not say; ``single_node`` is True when all
    ranks are known to share this host, None when unknown. ``job_key`` is unique per job (per
    SLURM step) and the same on every rank: it seeds the derived port. ``nodelist`` is the
    host list when the scheduler gives it (SLURM): its first host is rank 0's.
    """

    source: str
    rank: int
    size: int
    local_rank: int | None
    single_node: bool | None
    job_key: str | None
    nodelist: str | None = None


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0 listens, and which local rank this process is, once resolved."""

    addr: str
    port: int
    local_rank: int


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _opt_int(env: Mapping[str, str], key: str) -> int | None:
    return _int(env, key) if key in env else None


def _mpi_task(env: Mapping[str, str]) -> SchedulerTask | None:
    """The MPI launcher's description of this rank (Open MPI, MVAPICH, then PMI/Hydra)."""
    if "OMPI_COMM_WORLD_SIZE" in env:
        prefix, source = "OMPI_COMM_WORLD_", "Open MPI (OMPI_COMM_WORLD_*)"
        job = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE")
        local_size = _opt_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "MV2_COMM_WORLD_SIZE" in env:
        prefix, source = "MV2_COMM_WORLD_", "MVAPICH (MV2_COMM_WORLD_*)"
        job, local_size = env.get("MPIRUN_ID"), _opt_int(env, "MV2_COMM_WORLD_LOCAL_SIZE")
    elif "PMI_SIZE" in env:
        size, local_size = _int(env, "PMI_SIZE"), _opt_int(env, "MPI_LOCALNRANKS")
        return SchedulerTask(
            source="MPI/PMI (PMI_RANK, PMI_SIZE)",
            rank=_int(env, "PMI_RANK") if "PMI_RANK" in env else _missing("PMI_RANK", "PMI_SIZE"),
            size=size,
            local_rank=_opt_int(env, "MPI_LOCALRANKID"),
            single_node=None if local_size is None else local_size == size,
            job_key=env.get("PMI_JOBID") or env.get("PMIX_NAMESPACE"),
        )
    else:
        return None
    size = _int(env, prefix + "SIZE")
    rank_key = prefix + "RANK"
    return SchedulerTask(
        source=source,
        rank=_int(env, rank_key) if rank_key in env else _missing(rank_key, prefix + "SIZE"),
        size=size,
        local_rank=_opt_int(env, prefix + "LOCAL_RANK"),
        single_node=None if local_size is None else local_size == size,
        job_key=job,
    )


def _missing(key: str, present: str) -> int:
    raise ValueError(f"{present} is set but {key} is not: the launcher's variables are incomplete")


def _slurm_task(env: Mapping[str, str]) -> SchedulerTask | None:
    """This process as a task of a SLURM step (``srun``), or None outside a step."""
    if "SLURM_STEP_NUM_TASKS" not in env:
        return None
    size = _int(env, "SLURM_STEP_NUM_TASKS")
    if size > 1 and "SLURM_PROCID" not in env:
        _missing("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "0")
    return SchedulerTask(
        source=f"SLURM step {job}.{step} (SLURM_PROCID, SLURM_STEP_NUM_TASKS)",
        rank=_int(env, "SLURM_PROCID") if "SLURM_PROCID" in env else 0,
        size=size,
        local_rank=_opt_int(env, "SLURM_LOCALID"),
        single_node=env.get("SLURM_STEP_NUM_NODES") == "1" or None,
        job_key=f"{job}.{step}" if job else None,
        nodelist=nodelist or None,
    )


def _check_not_batch_shell(env: Mapping[str, str]) -> None:
    """Refuse the batch script or ``salloc`` shell of a job of several tasks (no srun step)."""
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_NUM_TASKS" in env:
        return
    tasks = _opt_int(env, "SLURM_NTASKS") or 1
    if tasks > 1:
        raise ValueError(
            f"SLURM job {env['SLURM_JOB_ID']} has {tasks} tasks but this process is not one of "
            "them (it runs in the batch script or salloc shell, outside any srun step): start "
            "one rank per task with `srun python -m megatron_glm.pretrain ...` (see "
            "launch/slurm.sbatch), or set WORLD_SIZE=1 to train in this single process"
        )


def find_task(env: Mapping[str, str]) -> SchedulerTask | None:
    """The scheduler task this process is, or None (no scheduler: a world of one)."""
    mpi, slurm = _mpi_task(env), _slurm_task(env)
    if mpi is not None:
        if slurm is not None and (slurm.size, slurm.rank) == (mpi.size, mpi.rank):
            # srun started the ranks itself (PMI/PMIx plugin): SLURM also names the master.
            local = _first(mpi, slurm)
            return replace(mpi, nodelist=slurm.nodelist, local_rank=local, job_key=slurm.job_key)
        return mpi
    if slurm is not None:
        return slurm
    if "PMIX_RANK" in env:
        return _pmix_only(env)
    _check_not_batch_shell(env)
    return None


def _first(a: SchedulerTask, b: SchedulerTask) -> int | None:
    return a.local_rank if a.local_rank is not None else b.local_rank


def _pmix_only(env: Mapping[str, str]) -> SchedulerTask:
    """A PMIx rank with no world size in the environment: only mpi4py can say how many."""
    comm = _mpi_comm()
    if comm is None:
        raise ValueError(
            f"PMIX_RANK={env['PMIX_RANK']} is set but no world size is: set WORLD_SIZE, RANK, "
            f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or {MPI_HINT.split(', or ')[1]}"
        )
    return SchedulerTask(
        source="PMIx (PMIX_RANK) + mpi4py",
        rank=int(comm.Get_rank()),
        size=int(comm.Get_size()),
        local_rank=None,
        single_node=None,
        job_key=env.get("PMIX_NAMESPACE"),
    )


def derived_port(job_key: str) -> int:
    """A rendezvous port every rank computes alike from the job's id, with no communication."""
    number = int(job_key) if job_key.isdigit() else zlib.crc32(job_key.encode())
    return PORT_BASE + number % PORT_SPAN


def resolve_rendezvous(task: SchedulerTask, env: Mapping[str, str]) -> Rendezvous:
    """Rank 0's address and port and this rank's local rank for a world of ``task.size`` > 1.

    The variables first; mpi4py only for what they lack (then its port too, a really free one,
    unless ``MASTER_PORT`` is set).
    """
    addr = env.get("MASTER_ADDR") or (master_address(task.nodelist) if task.nodelist else None)
    if addr is None and task.single_node:
        addr = "127.0.0.1"
    port = _opt_int(env, "MASTER_PORT")
    local = task.local_rank
    if local is None and task.single_node:
        local = task.rank
    if addr is not None and local is not None and (port is not None or task.job_key):
        return Rendezvous(
            addr, port if port is not None else derived_port(task.job_key or ""), local
        )
    return _rendezvous_by_mpi4py(task, addr, port, local)


def _rendezvous_by_mpi4py(
    task: SchedulerTask, addr: str | None, port: int | None, local: int | None
) -> Rendezvous:
    """Fill what the variables lack from rank 0 through mpi4py, or say what to set."""
    comm = _mpi_comm()
    if comm is None:
        lacking = [
            name
            for name, value in (
                ("MASTER_ADDR", addr),
                ("MASTER_PORT", port if port is not None else task.job_key),
                ("local rank", local),
            )
            if value is None
        ]
        raise ValueError(
            f"{task.source} started {task.size} ranks, but this rank cannot find the others "
            f"({', '.join(lacking)} unknown and mpi4py is not installed); it will not train "
            f"alone: {MPI_HINT}"
        )
    mine = (socket.gethostname(), free_port_on("")) if task.rank == 0 else None
    host, port0 = comm.bcast(mine, root=0)
    if local is None:
        local = int(comm.Split_type(_mpi_shared_type()).Get_rank())
    return Rendezvous(addr or host, port if port is not None else port0, local)


def _mpi_comm() -> Any:
    """mpi4py's world communicator, or None when mpi4py (optional, untyped) is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _mpi_shared_type() -> int:
    from mpi4py import MPI

    return int(MPI.COMM_TYPE_SHARED)


def free_port_on(host: str) -> int:
    """A TCP port free right now on ``host``'s interface (``""``: every interface, where rank 0
    listens for all nodes; ``127.0.0.1``: loopback, for a world of one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- SLURM host lists

_BRACKET = re.compile(r"\[([^\]]*)\]")


def master_address(nodelist: str) -> str:
    """Rank 0's node: the list's first host, or SLURM's ``NodeAddr`` for a name DNS cannot
    resolve (a node defined as ``NodeName=n1 NodeAddr=10.0.0.7``); asked of slurmctld only then.
    """
    host = first_host(nodelist)
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        addr = _slurm_node_addr(host)
        if addr is None:
            raise ValueError(
                f"the first node of SLURM node list {nodelist!r}, {host!r}, does not resolve and "
                "scontrol does not give its NodeAddr: set MASTER_ADDR to its address"
            ) from None
        return addr
    return host


def _slurm_node_addr(node: str) -> str | None:
    """``NodeAddr`` of ``scontrol show node NODE``, or None when scontrol cannot say."""
    out = _scontrol("show", "node", "--oneliner", node)
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else None


def _scontrol(*args: str) -> str:
    """scontrol's stdout, or "" when it is missing or fails (no config on this host, no daemon)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return ""
    try:
        return subprocess.run(
            [scontrol, *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``node[03-05,9],gpu1`` -> ``node03``).

    ``scontrol show hostnames`` is the authority when it runs (it needs the cluster's config);
    otherwise the common forms are parsed here: comma-separated entries, each with any number of
    bracket groups of numbers and zero-padded ranges.
    """
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if hosts:
        return hosts[0]
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """:func:`first_host` without scontrol: the first entry, each bracket at its first value."""
    entry = _first_entry(nodelist.strip())

    def first_value(match: re.Match[str]) -> str:
        return match.group(1).split(",")[0].split("-")[0].strip()

    host = _BRACKET.sub(first_value, entry)
    if not host or any(c in host for c in "[],") or " " in host:
        raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}")
    return host


def _first_entry(nodelist: str) -> str:
    """Text up to the first comma outside brackets."""
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            return nodelist[:i]
    return nodelist


LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
)


def launcher_local_rank(env: Mapping[str, str]) -> int | None:
    """This process's local rank as the scheduler's variables state it, without any check.

    For printing a pre-launch error once per node: it must work when :func:`find_task` itself
    is what failed. None when no variable says (or says something unreadable).
    """
    for key in LOCAL_RANK_VARIABLES:
        value = env.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return None
