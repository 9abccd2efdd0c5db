"""Rank discovery from scheduler variables (plain srun, mpirun, mpiexec), on fake environments.

The variable sets are the ones the launchers export (Open MPI 4.1's were copied from a real
``mpirun -np 2``); the real launches are in tests/cluster/.
"""

from __future__ import annotations

import sys
import types
import zlib
from dataclasses import astuple
from pathlib import Path

import pytest

from megatron_glm import pretrain
from megatron_glm.finetune import __main__ as finetune_main
from megatron_glm.training import rank_discovery
from megatron_glm.training.distributed import DistEnv, read_dist_env
from megatron_glm.training.rank_discovery import derived_port, launcher_local_rank
from megatron_glm.training.rank_discovery import parse_first_host as first

REPO = Path(__file__).resolve().parents[2]


def head(env: DistEnv, n: int) -> tuple[object, ...]:
    """(rank, world_size, local_rank, master_addr, master_port)[:n]."""
    return astuple(env)[:n]


@pytest.fixture(autouse=True)
def _no_scontrol_no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host-list parser and the no-mpi4py paths, whatever this machine has installed."""
    monkeypatch.setattr(rank_discovery.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails like an absent package


def ompi(rank: int, size: int, local_size: int, **extra: str) -> dict[str, str]:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        "OMPI_MCA_ess_base_jobid": "660602881",
        **extra,
    }


def slurm_step(rank: int, tasks: int, **extra: str) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        **extra,
    }


def test_no_scheduler_is_a_world_of_one() -> None:
    assert read_dist_env({}) == DistEnv(0, 1, 0, None, None, "a single process")


@pytest.mark.parametrize(
    "inherited", [slurm_step(0, 4), ompi(0, 4, 1), {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "8"}]
)
def test_launcher_variables_win_over_inherited_scheduler_ones(inherited: dict[str, str]) -> None:
    """deepspeed/torchrun children (WORLD_SIZE set) inside an allocation keep their own world."""
    env = {**inherited, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    env |= {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert head(read_dist_env(env), 5) == (1, 2, 1, "10.0.0.1", 29500)


def test_srun_step_of_two_forms_the_world_on_the_first_node() -> None:
    got = read_dist_env(slurm_step(1, 2, SLURM_LOCALID="0"))
    port = 20000 + zlib.crc32(b"1234.0") % 20000
    assert got == DistEnv(
        1, 2, 0, "gpu07", port, "SLURM step 1234.0 (SLURM_PROCID, SLURM_STEP_NUM_TASKS)"
    )


def test_srun_respects_the_users_master() -> None:
    env = slurm_step(0, 2, MASTER_ADDR="10.1.2.3", MASTER_PORT="6000")
    assert head(read_dist_env(env), 5) == (0, 2, 0, "10.1.2.3", 6000)


def test_srun_n1_and_single_task_shells_are_a_world_of_one() -> None:
    """``srun -n 1`` inside a 4-task allocation, and the shell of a 1-task job, still train."""
    assert read_dist_env(slurm_step(0, 1, SLURM_NTASKS="4")).world_size == 1
    assert read_dist_env({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}).world_size == 1
    assert read_dist_env({"SLURM_JOB_ID": "5"}).world_size == 1


def test_batch_shell_of_a_multi_task_job_refuses() -> None:
    with pytest.raises(ValueError, match=r"SLURM job 5 has 2 tasks but this process is not one"):
        read_dist_env({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def test_mpirun_on_one_node_needs_nothing() -> None:
    """Every rank on this host: loopback, a port derived from the Open MPI job id."""
    got = [read_dist_env(ompi(r, 2, 2)) for r in range(2)]
    port = 20000 + 660602881 % 20000
    assert [head(g, 5) for g in got] == [(0, 2, 0, "127.0.0.1", port), (1, 2, 1, "127.0.0.1", port)]
    assert got[0].source == "Open MPI (OMPI_COMM_WORLD_*)"


def test_mpirun_on_two_nodes_without_master_refuses_with_what_to_set() -> None:
    with pytest.raises(ValueError) as err:
        read_dist_env(ompi(1, 2, 1))
    text = str(err.value)
    assert text.startswith("Open MPI (OMPI_COMM_WORLD_*) started 2 ranks, but this rank cannot")
    assert "(MASTER_ADDR unknown and mpi4py is not installed); it will not train alone" in text
    assert "mpirun -x MASTER_ADDR -x MASTER_PORT" in text and "megatron_glm[mpi]" in text
    env = ompi(1, 2, 1, MASTER_ADDR="node0", MASTER_PORT="29501")
    assert head(read_dist_env(env), 5) == (1, 2, 0, "node0", 29501)


def test_mpirun_inside_slurm_allocation_uses_the_mpi_world() -> None:
    """Open MPI starts its daemons with srun: the ranks inherit a step of one task per node."""
    env = {**slurm_step(1, 2), **ompi(3, 4, 2)}
    with pytest.raises(ValueError, match=r"Open MPI .* started 4 ranks"):
        read_dist_env(env)  # not the daemons' step of 2 with its node list
    env |= {"MASTER_ADDR": "gpu07", "MASTER_PORT": "6000"}
    assert head(read_dist_env(env), 5) == (3, 4, 1, "gpu07", 6000)


def test_srun_with_pmi_plugin_takes_the_master_from_slurm() -> None:
    env = {**slurm_step(1, 2, SLURM_LOCALID="0"), "PMI_RANK": "1", "PMI_SIZE": "2"}
    got = read_dist_env(env)
    assert head(got, 4) == (1, 2, 0, "gpu07") and got.source == "MPI/PMI (PMI_RANK, PMI_SIZE)"


def test_hydra_without_job_id_names_the_port() -> None:
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    with pytest.raises(ValueError, match=r"\(MASTER_PORT unknown and mpi4py is not installed\)"):
        read_dist_env(env)
    assert head(read_dist_env({**env, "MASTER_PORT": "7000"}), 5) == (0, 2, 0, "127.0.0.1", 7000)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OMPI_COMM_WORLD_SIZE": "2"},
            "OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not",
        ),
        (ompi(0, 2, 2, OMPI_COMM_WORLD_RANK="x"), "OMPI_COMM_WORLD_RANK='x' is not an integer"),
        (slurm_step(2, 2), r"SLURM step 1234.0 .*: rank 2 is not in \[0, 2\)"),
        ({"PMIX_RANK": "0"}, "PMIX_RANK=0 is set but no world size is: set WORLD_SIZE"),
    ],
)
def test_broken_scheduler_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_dist_env(env)


class FakeComm:
    """mpi4py's COMM_WORLD as rank 1 of 2 sees it: bcast returns what rank 0 sent."""

    def __init__(self, sent: object) -> None:
        self.sent, self.received = sent, []

    def bcast(self, obj: object, root: int) -> object:
        self.received.append((obj, root))
        return self.sent

    def Split_type(self, kind: int) -> FakeComm:  # mpi4py's names
        assert kind == 99
        return self

    def Get_rank(self) -> int:
        return 0


def test_mpi4py_sends_rank_zeros_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes, no MASTER_ADDR: rank 0's host and port come through bcast (mpi4py's API)."""
    comm = FakeComm(("node0", 41000))
    fake = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=99)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=fake))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake)
    env = ompi(1, 2, 1)
    del env["OMPI_COMM_WORLD_LOCAL_RANK"]
    assert head(read_dist_env(env), 5) == (1, 2, 0, "node0", 41000)
    assert comm.received == [(None, 0)]  # a non-zero rank sends nothing


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node[03-05,9],gpu1", "node03"),
        ("gpu1,node[1-2]", "gpu1"),
        ("rack[1-2]-n[01-03]", "rack1-n01"),
        ("n[007]", "n007"),
        ("single", "single"),
        ("10.0.0.5", "10.0.0.5"),
    ],
)
def test_first_host_of_slurm_node_lists(nodelist: str, host: str) -> None:
    assert first(nodelist) == host


@pytest.mark.parametrize("nodelist", ["node[1-2", "node]1[", ""])
def test_unreadable_node_list_is_named(nodelist: str) -> None:
    with pytest.raises(ValueError, match="cannot read the first host of SLURM node list"):
        first(nodelist)


def test_derived_ports_stay_in_their_range() -> None:
    assert derived_port("19999") == 39999 and derived_port("20000") == 20000
    assert 20000 <= derived_port("prterun-host-99@1") < 40000


def test_launcher_local_rank_reads_what_is_there() -> None:
    assert launcher_local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert launcher_local_rank({"SLURM_LOCALID": "1"}) == 1
    assert launcher_local_rank({"SLURM_LOCALID": "?"}) is None


@pytest.mark.parametrize(
    ("main", "config"),
    [(pretrain.main, "configs/demo.yaml"), (finetune_main.main, "configs/finetune/pkgcls.yaml")],
)
def test_entry_points_refuse_a_world_they_cannot_join(
    main: object, config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two-node mpirun without MASTER_ADDR or mpi4py: exit 2 and what to set, no training."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in ompi(0, 2, 1).items():
        monkeypatch.setenv(key, value)
    assert callable(main)
    assert main(["--config", str(REPO / config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Open MPI (OMPI_COMM_WORLD_*) started 2 ranks")
    assert "export MASTER_ADDR=<first node's address>" in err
