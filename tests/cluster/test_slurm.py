"""``launch/slurm.sbatch`` and plain ``srun`` on the throwaway cluster of ``.ci/setup_services.sh``
(nodes n1 and n2, both this host, at 127.0.0.1).

Every run trains the same glm-tiny schedule (dropout off) on the integration tests' corpus, and
its per-step losses are read back from TensorBoard (float32): the batch script on 2 nodes x 1 task
equals one process (grad accumulation 2, within 1e-5, as in tests/distributed), a job stopped by
USR1, requeued and resumed equals the uninterrupted job bit for bit. The jobs inherit this
process's environment (sbatch's default ``--export=ALL``): ``PYTHON`` names the interpreter and
``PYTHONPATH`` this checkout, as the script's header documents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from megatron_glm.pretrain import EXIT_REQUEUE
from tests.cluster.conftest import require_tools
from tests.distributed.test_tp_launch import _losses
from tests.integration.conftest import tiny_corpus  # noqa: F401 (the fixture, shared)
from tests.integration.test_pretrain_cli import _one_process, _run_yaml

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm.sbatch"
STEPS = 60
"""Long enough (about 0.05 s a step here) to signal a job in the middle of its run."""
SIGNAL_AFTER = 5
JOB_TIMEOUT_S = 240.0
_T0: dict[str, float] = {}
"""When each job was first polled (for the printed state sequence)."""


@pytest.fixture(scope="module")
def cluster() -> None:
    """The test cluster is up: n1 and n2 idle (``make test-cluster`` starts it)."""
    require_tools("sbatch", "srun", "scontrol", "scancel", "sinfo")
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=False
    )
    if sorted(set(nodes.stdout.split("\n")) - {""}) != ["n1 idle", "n2 idle"]:
        message = f"the test cluster is not up (sinfo: {nodes.stdout!r} {nodes.stderr!r})"
        if os.environ.get("MEGATRON_GLM_REQUIRE_CLUSTER") == "1":
            pytest.fail(message)
        pytest.skip(message + "; run .ci/setup_services.sh as root")


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: tuple[str, str]) -> Path:  # noqa: F811
    """The schedule every run trains: glm-tiny, seq 64, global batch 4, STEPS steps."""
    tmp = tmp_path_factory.mktemp("slurm_run")
    return _run_yaml(
        tmp,
        *tiny_corpus,
        logging={"log_interval": 1, "progress_bar": False},
        train_iters=STEPS,
        eval_interval=0,
    )


def _env() -> dict[str, str]:
    """The submitting environment: this interpreter and checkout, CPU, no launcher variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _overrides(out: Path) -> list[str]:
    return [
        f"checkpoint.save={out / 'ckpt'}",
        f"logging.tensorboard_dir={out / 'tb'}",
        "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0",
    ]


def _submit(config: Path, out: Path, *sbatch_args: str, extra: tuple[str, ...] = ()) -> str:
    """``sbatch [ARGS] launch/slurm.sbatch CONFIG overrides`` from ``out``; the job id."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", *sbatch_args, str(SBATCH), str(config), *_overrides(out)]
    cmd += extra
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    proc = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
    )
    return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)


def _wait(
    job_id: str, done: Callable[[dict[str, str]], bool], seen: list[str], timeout: float
) -> dict[str, str]:
    """Poll the job until ``done``; every new (state, reason, restarts) goes into ``seen``, with
    the seconds since the first poll of the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = _job(job_id)
        state = f"{job['JobState']} (Reason={job['Reason']}, Restarts={job['Restarts']})"
        if not seen or seen[-1].split(" @ ")[0] != state:
            _T0.setdefault(job_id, time.monotonic())
            seen.append(f"{state} @ {time.monotonic() - _T0[job_id]:.1f} s")
        if done(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {seen}")
        time.sleep(0.2)


def _finished(job: dict[str, str]) -> bool:
    return job["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def _output(out: Path, job_id: str) -> str:
    return (out / f"megatron_glm-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(
    cluster: None, run_yaml: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``sbatch -N 2 launch/slurm.sbatch`` run to its end: the reference of the other runs."""
    out = tmp_path_factory.mktemp("uninterrupted")
    t0 = time.monotonic()
    job_id = _submit(run_yaml, out, "-N", "2")
    seen: list[str] = []
    job = _wait(job_id, _finished, seen, JOB_TIMEOUT_S)
    print(f"\nsbatch -N 2 (2 nodes x 1 task): job {job_id} {seen}, {time.monotonic() - t0:.1f} s")
    return {"id": job_id, "job": job, "log": _output(out, job_id), "out": out}


def test_sbatch_two_nodes_one_task_each_equals_one_process(
    uninterrupted: dict[str, Any], run_yaml: Path, tmp_path: Path
) -> None:
    log, job = uninterrupted["log"], uninterrupted["job"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    assert job["Restarts"] == "0", "a finished run was requeued"
    assert "megatron_glm: rank 0 of 2 on n1 (local rank 0)" in log
    assert "megatron_glm: rank 1 of 2 on n2 (local rank 0)" in log
    assert "world 2, dp 2, grad accumulation 1" in log
    assert "rendezvous 127.0.0.1:" in log  # n1's NodeAddr, not its name
    assert "scontrol requeue" not in log
    t0 = time.monotonic()
    single = _one_process(["--config", str(run_yaml), *_overrides(tmp_path)], _env(), tmp_path)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    print(f"one process: {time.monotonic() - t0:.1f} s")
    got, want = _losses(uninterrupted["out"] / "tb"), _losses(tmp_path / "tb")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= 1e-5, (worst, got, want)
    print(f"2 nodes vs 1 process: loss {got[1]:.4f} -> {got[STEPS]:.4f}, max |diff| {worst:.1e}")


def _signal_when_training(job_id: str, out: Path, seen: list[str]) -> None:
    """Wait for step SIGNAL_AFTER in the job's output, then USR1 every task of the job, as
    SLURM's ``--signal=USR1@N`` does before the time limit."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    needle = f"step {SIGNAL_AFTER}/{STEPS} "
    while True:
        path = out / f"megatron_glm-{job_id}.out"
        if path.exists() and needle in path.read_text():
            break
        job = _wait(job_id, lambda _: True, seen, JOB_TIMEOUT_S)
        if _finished(job) or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} never reached step {SIGNAL_AFTER}: {seen}")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)


def test_usr1_saves_requeues_and_resumes_exactly(
    uninterrupted: dict[str, Any], run_yaml: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    job_id = _submit(run_yaml, tmp_path, "-N", "2")
    seen: list[str] = []
    _signal_when_training(job_id, tmp_path, seen)
    # SLURM holds a requeued job for cred_expire + 1 s (Reason=BeginTime; 11 s on this cluster).
    job = _wait(job_id, _finished, seen, JOB_TIMEOUT_S)
    log = _output(tmp_path, job_id)
    print(f"\nrequeue: job {job_id} {seen}, {time.monotonic() - t0:.1f} s")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    assert job["Restarts"] == "1", seen
    stopped = [line for line in log.splitlines() if line.startswith("stopping after step ")]
    assert len(stopped) == 1 and stopped[0].endswith(": SIGUSR1"), log[-4000:]
    step = int(stopped[0].split()[3].rstrip(":"))
    assert SIGNAL_AFTER <= step < STEPS
    save = tmp_path / "ckpt"
    starts = [
        f"saved checkpoint {save}/global_step{step}",
        f"megatron_glm: stopped before the end, checkpoint saved: scontrol requeue {job_id}",
        f"megatron_glm: job {job_id} start 2 on n[1-2]",
        f"resumed from {save} at step {step} ({4 * step} samples consumed)",
        f"step {STEPS}/{STEPS} ",
    ]
    positions = [log.find(s) for s in starts]
    assert -1 not in positions and positions == sorted(positions), (starts, positions)
    assert (save / "latest").read_text() == f"global_step{STEPS}"
    print(f"resumed at step {step} after USR1; {log.count('megatron_glm: job ')} starts")
    got, want = _losses(tmp_path / "tb"), _losses(uninterrupted["out"] / "tb")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bitwise: the stop, the requeue and the resume change nothing
    assert EXIT_REQUEUE == 75  # what launch/slurm.sbatch passes and requeues on


def _launch(cmd: list[str], cwd: Path) -> str:
    """Run a launcher command to its end (a 5-minute SLURM time limit bounds it); its output."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_plain_srun_forms_one_world_of_two(
    uninterrupted: dict[str, Any], run_yaml: Path, tmp_path: Path
) -> None:
    """No launch script: each task finds its rank, the world size and the master (the first
    node of the step, n1) from SLURM's variables."""
    t0 = time.monotonic()
    cli = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run_yaml)]
    log = _launch(["srun", "-t", "5", "-N", "2", "-n", "2", *cli, *_overrides(tmp_path)], tmp_path)
    print(f"\nsrun -N 2 -n 2 python -m megatron_glm.pretrain: {time.monotonic() - t0:.1f} s")
    assert "process group: rank 0 of 2 from SLURM step " in log
    assert ", rendezvous n1:" in log
    assert "world 2, dp 2, grad accumulation 1" in log
    got = _losses(tmp_path / "tb")
    assert got == _losses(uninterrupted["out"] / "tb")  # the batch script's job, bit for bit
    print(f"plain srun: loss {got[1]:.4f} -> {got[STEPS]:.4f}, equal to the sbatch job's")


def test_deepspeed_slurm_launcher_inside_an_allocation(
    uninterrupted: dict[str, Any], run_yaml: Path, tmp_path: Path
) -> None:
    """``deepspeed --launcher slurm`` with a hostfile, inside ``salloc -N 2``: DeepSpeed runs
    ``srun -n 2 python -u SCRIPT`` (it drops ``--module``, so the console script by path;
    ``--no_ssh_check`` and ``--master_addr``: srun needs no ssh, which the runner would try)."""
    script = shutil.which("glm-pretrain", path=str(Path(sys.executable).parent))
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert script is not None and deepspeed is not None, "the venv lacks glm-pretrain/deepspeed"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    t0 = time.monotonic()
    cmd = ["salloc", "-t", "5", "-N", "2", deepspeed, "--hostfile", str(hostfile)]
    cmd += ["--no_ssh_check", "--master_addr", "n1", "--launcher", "slurm", script]
    log = _launch([*cmd, "--config", str(run_yaml), *_overrides(tmp_path)], tmp_path)
    print(f"\nsalloc -N 2 deepspeed --launcher slurm: {time.monotonic() - t0:.1f} s")
    assert "cmd = srun -n 2 " in log
    assert "process group: rank 0 of 2 from SLURM step " in log
    got = _losses(tmp_path / "tb")
    assert got == _losses(uninterrupted["out"] / "tb")
    print(f"deepspeed --launcher slurm: loss {got[1]:.4f} -> {got[STEPS]:.4f}, equal")


def test_sbatch_one_task_per_gpu(
    uninterrupted: dict[str, Any], run_yaml: Path, tmp_path: Path
) -> None:
    """``--gpus-per-node=2`` and no task count: two tasks on each node, local ranks 0 and 1 (the
    test cluster's GPUs are counted, not real; the ranks train on CPU), losses of the 2-rank job."""
    t0 = time.monotonic()
    job_id = _submit(
        run_yaml, tmp_path, "-N", "2", "--gpus-per-node=2", extra=("train.micro_batch_size=1",)
    )
    seen: list[str] = []
    job = _wait(job_id, _finished, seen, JOB_TIMEOUT_S)
    log = _output(tmp_path, job_id)
    print(f"\nsbatch -N 2 --gpus-per-node=2: job {job_id} {seen}, {time.monotonic() - t0:.1f} s")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    for rank in range(4):
        assert f"megatron_glm: rank {rank} of 4 on n{rank // 2 + 1} (local rank {rank % 2})" in log
    # global batch 4 = micro batch 1 x dp 4: the same rows per step as the 2-rank job
    assert "world 4, dp 4, grad accumulation 1" in log
    got, want = _losses(tmp_path / "tb"), _losses(uninterrupted["out"] / "tb")
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= 1e-5, (worst, got, want)
    print(f"4 ranks on 2 nodes vs 2 ranks: max |diff| {worst:.1e}")
