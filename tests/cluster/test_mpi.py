"""Launches of the entry point on this host: plain ``mpirun`` (Open MPI), ``launch/mpirun.sh``,
and DeepSpeed's multi-node launchers over a hostfile through ``launch/deepspeed_hostfile.sh``
(``pdsh`` over ssh to two loopback "nodes", ``openmpi`` on loopback, ``slurm`` on the test
cluster's two nodes): each one world of 2 with one process's losses.

A tiny model without dropout trains 3 steps of 4 samples: 2 data-parallel ranks of 2 samples must
log the losses of one process accumulating 2 micro-batches of 2 (TensorBoard ``train/loss``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_ssh, require_tools

from megatron_glm.data.preprocess import preprocess_data
from megatron_glm.training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3
LAYOUT_2 = "parallel layout: world 2 = tp 1 x pp 1 x dp 2"
OMPI_LINE = "process group: rank {r} of 2 from Open MPI (OMPI_COMM_WORLD_*), rendezvous 127.0.0.1:"
MPIRUN_AS_ROOT = ["--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(scope="module")
def run_yaml(
    tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> Path:
    """A 3-step tiny run on the test corpus (no dropout: ranks and one process draw alike)."""
    tmp = tmp_path_factory.mktemp("mpi_run")
    out = preprocess_data([demo_corpus_path], tmp / "demo", tiny_tokenizer_model, progress=False)
    model = yaml.safe_load((REPO / "configs" / "model" / "glm-tiny.yaml").read_text())
    run = {
        "model": {**model, "max_position_embeddings": 64, "hidden_dropout": 0.0},
        "data": {
            "data_path": [out.outputs["text"]],
            "tokenizer_model": str(tiny_tokenizer_model),
            "seq_length": 64,
            "num_workers": 0,
        },
        "optimizer": {"lr": 0.003, "warmup_iters": 1},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": STEPS},
        "logging": {"log_interval": 1, "progress_bar": False},
    }
    run["model"]["attention_dropout"] = 0.0
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def launch_env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell with the venv active, no launcher variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "SLURM_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.pop("GLM_LOG_ALL_RANKS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)  # the ranks import this checkout
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def tb_losses(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def one_process(run_yaml: Path) -> dict[int, float]:
    """The reference: ``python -m megatron_glm.pretrain``, a world of one."""
    tb = run_yaml.parent / "tb1"
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run_yaml)]
    out = run([*cmd, f"logging.tensorboard_dir={tb}"], launch_env(), run_yaml.parent)
    assert "parallel layout: world 1 = tp 1 x pp 1 x dp 1" in out
    losses = tb_losses(tb)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def same_losses(tb: Path, want: dict[int, float], what: str) -> None:
    got = tb_losses(tb)
    assert sorted(got) == sorted(want), (got, want)
    worst = max(abs(got[s] - want[s]) / want[s] for s in want)
    assert worst < 1e-5, (worst, got, want)
    print(
        f"{what}: {LAYOUT_2} | loss step 1 {got[1]:.6f}, step {STEPS} {got[STEPS]:.6f} | "
        f"max relative difference to one process {worst:.1e}"
    )


def test_plain_mpirun_is_one_world_of_two(run_yaml: Path, one_process: dict[int, float]) -> None:
    """``mpirun -np 2 python -m megatron_glm.pretrain``, no wrapper: the ranks find each other."""
    require_tools("mpirun")
    tb = run_yaml.parent / "tb_mpirun"
    cmd = ["mpirun", *MPIRUN_AS_ROOT, "-np", "2", sys.executable, "-m", "megatron_glm.pretrain"]
    cmd += ["--config", str(run_yaml), f"logging.tensorboard_dir={tb}"]
    out = run(cmd, launch_env(), run_yaml.parent)
    assert LAYOUT_2 in out and OMPI_LINE.format(r=0) in out, out[-3000:]
    same_losses(tb, one_process, "mpirun -np 2")


def test_launch_mpirun_script(run_yaml: Path, one_process: dict[int, float]) -> None:
    """``NP=2 launch/mpirun.sh --allow-run-as-root --oversubscribe -- RUN.yaml`` as documented;
    a GLM_* variable reaches the ranks (every rank's lines then show)."""
    require_tools("mpirun")
    tb = run_yaml.parent / "tb_script"
    cmd = [str(REPO / "launch" / "mpirun.sh"), *MPIRUN_AS_ROOT, "--", str(run_yaml)]
    env = launch_env(NP="2", GLM_LOG_ALL_RANKS="1", MASTER_PORT=str(free_port()))
    out = run([*cmd, f"logging.tensorboard_dir={tb}"], env, run_yaml.parent)
    assert f"[rank 1] {OMPI_LINE.format(r=1)}{env['MASTER_PORT']}" in out, out[-3000:]
    same_losses(tb, one_process, "launch/mpirun.sh")


def test_deepspeed_pdsh_launcher_with_hostfile(
    run_yaml: Path, one_process: dict[int, float]
) -> None:
    """``launch/deepspeed_hostfile.sh`` with DeepSpeed's default launcher, pdsh, on two loopback
    nodes (``.ci/setup_services.sh``: ssh as root to ``glm-pdsh-node1``/``2``), as the README says.

    Over ssh the ranks get only DeepSpeed's exports (``PYTHONPATH``) and ``.deepspeed_env``,
    written with the README's command, plus ``GLM_LOG_ALL_RANKS=1``: rank 1's lines show, from
    node 2 (pdsh's ``%n``), so the file and the node rank reached it.
    """
    require_tools("pdsh")
    require_ssh("glm-pdsh-node1")
    cwd = run_yaml.parent / "ds_pdsh"
    cwd.mkdir()
    (cwd / "hostfile").write_text("glm-pdsh-node1 slots=1\nglm-pdsh-node2 slots=1\n")
    env = launch_env(
        HOSTFILE="hostfile", MASTER_ADDR="glm-pdsh-node1", MASTER_PORT=str(free_port())
    )
    recipe = re.search(
        r"^env \| grep .* > \.deepspeed_env$", (REPO / "README.md").read_text(), re.M
    )
    assert recipe is not None, "README: no `env | grep ... > .deepspeed_env` line"
    run(["bash", "-c", f"{recipe[0]} && echo GLM_LOG_ALL_RANKS=1 >> .deepspeed_env"], env, cwd)
    tb = cwd / "tb"
    cmd = [str(REPO / "launch" / "deepspeed_hostfile.sh"), str(run_yaml)]
    out = run([*cmd, f"logging.tensorboard_dir={tb}"], env, cwd)
    assert "cmd = pdsh -S -f 1024 -w glm-pdsh-node1,glm-pdsh-node2" in out, out[-3000:]
    line = "process group: rank 1 of 2 from launcher variables (RANK, WORLD_SIZE), rendezvous"
    line = f"glm-pdsh-node2: [rank 1] {line} glm-pdsh-node1:{env['MASTER_PORT']}"
    assert line in out, out[-3000:]
    same_losses(tb, one_process, "deepspeed --launcher pdsh")


def test_deepspeed_openmpi_launcher_with_hostfile(
    run_yaml: Path, one_process: dict[int, float]
) -> None:
    """``launch/deepspeed_hostfile.sh`` with ``LAUNCHER=openmpi`` on a loopback hostfile.

    DeepSpeed forwards the ``.deepspeed_env`` of the working directory with ``mpirun -x``:
    ``GLM_LOG_ALL_RANKS=1`` there, absent from the launching environment, shows rank 1's lines.
    """
    require_tools("mpirun", "ompi_info")
    cwd = run_yaml.parent / "ds"
    cwd.mkdir()
    (cwd / "hostfile").write_text("localhost slots=2\n")
    (cwd / ".deepspeed_env").write_text(
        f"PATH={BIN}:/usr/bin:/bin\nDS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLM_LOG_ALL_RANKS=1\n"
    )
    tb = cwd / "tb"
    env = launch_env(
        HOSTFILE="hostfile",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        LAUNCHER="openmpi",
        DS_ARGS="--force_multi --no_ssh_check",
        LAUNCHER_ARGS="--allow-run-as-root --oversubscribe",
    )
    cmd = [str(REPO / "launch" / "deepspeed_hostfile.sh"), str(run_yaml)]
    out = run([*cmd, f"logging.tensorboard_dir={tb}"], env, cwd)
    assert "cmd = mpirun -n 2 -hostfile hostfile" in out, out[-3000:]
    line = "process group: rank 1 of 2 from Open MPI (OMPI_COMM_WORLD_*), rendezvous 127.0.0.1:"
    assert f"[rank 1] {line}{env['MASTER_PORT']}" in out, out[-3000:]
    same_losses(tb, one_process, "deepspeed --launcher openmpi")


def test_deepspeed_slurm_launcher_with_hostfile(
    run_yaml: Path, one_process: dict[int, float]
) -> None:
    """``LAUNCHER=slurm`` on the test cluster's two nodes: DeepSpeed runs ``srun -n 2``, which
    drops ``--module`` (hence the script path); the ranks form the world from the SLURM step."""
    require_tools("srun", "sinfo")
    cwd = run_yaml.parent / "ds_slurm"
    cwd.mkdir()
    (cwd / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    tb = cwd / "tb"
    env = launch_env(
        HOSTFILE="hostfile",
        MASTER_ADDR="n1",
        MASTER_PORT=str(free_port()),
        LAUNCHER="slurm",
        LAUNCHER_ARGS="--nodes 2",
        GLM_LOG_ALL_RANKS="1",
    )
    cmd = [str(REPO / "launch" / "deepspeed_hostfile.sh"), str(run_yaml)]
    out = run([*cmd, f"logging.tensorboard_dir={tb}"], env, cwd)
    assert "cmd = srun -n 2 --nodes 2 --export=ALL" in out, out[-3000:]
    line = "process group: rank 1 of 2 from SLURM step "
    assert f"[rank 1] {line}" in out and f"rendezvous n1:{env['MASTER_PORT']}" in out, out[-3000:]
    same_losses(tb, one_process, "deepspeed --launcher slurm")


def test_salloc_shell_of_two_tasks_refuses(run_yaml: Path) -> None:
    """The entry point run directly in the shell of a 2-task allocation (no srun) is none of the
    tasks: exit 2 with what to do, before any training."""
    require_tools("salloc", "sinfo")
    cmd = ["salloc", "-n", "2", sys.executable, "-m", "megatron_glm.pretrain"]
    proc = subprocess.run(
        [*cmd, "--config", str(run_yaml)],
        env=launch_env(),
        cwd=run_yaml.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    job = re.search(r"Granted job allocation (\d+)", proc.stderr)
    assert job is not None, proc.stderr
    assert (
        f"error: SLURM job {job.group(1)} has 2 tasks but this process is not one of them (it "
        "runs in the batch script or salloc shell, outside any srun step): start one rank per "
        "task with `srun python -m megatron_glm.pretrain ...`"
    ) in proc.stderr
    assert "parallel layout" not in proc.stdout
