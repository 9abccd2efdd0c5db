"""Faults on the documented launch paths, with real processes on a tiny corpus (2 CPU ranks).

* Signals to ``deepspeed --num_gpus 2 --module megatron_glm.pretrain``: SIGTERM to the
  ``deepspeed`` command's pid only (``kill``, ``timeout``, a scheduler), then Ctrl-C (SIGINT to
  the whole process group) on the rerun. Every rank saves after the current step and exits,
  nothing of the job is left running, and the rerun resumes at the saved step. SIGINT to the pid
  only reaches the ranks exactly as SIGTERM does (the runner dies, the ranks see their launcher
  gone), so it is not launched a third time. That the resumed losses equal an uninterrupted
  run's bitwise is checked by ``tests/distributed/test_training.py``
  (``test_sigterm_saves_exits_zero_and_resumes``): the stop, save and resume code is the same;
  what is new here is only how the stop request reaches the ranks.
* A config error under the ``deepspeed`` launcher is printed once, not once per rank.
* A frozen rank (SIGSTOP) ends the job within ``train.distributed_timeout_minutes`` plus a
  margin, and the survivor names it; every process group honours that timeout; the watchdog's
  diagnosis and its own exit, on a fake clock.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
from test_pretrain_cli import _run_yaml as cli_run_yaml

from megatron_glm import pretrain
from megatron_glm.config import load_config
from megatron_glm.training.distributed import free_port
from megatron_glm.training.signals import (
    AbortRequested,
    LauncherWatch,
    StopConditions,
    _is_deepspeed_runner,
    _runs_module,
)
from megatron_glm.training.watchdog import Store, Watchdog

REPO = Path(__file__).resolve().parents[2]
DS_LAUNCH = "deepspeed.launcher.launch"


def _run_yaml(tmp: Path, prefix: str, tok: str, **train: object) -> Path:
    """The CLI tests' tiny run, logging every step without a progress bar."""
    return cli_run_yaml(
        tmp, prefix, tok, logging={"log_interval": 1, "progress_bar": False}, **train
    )


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _deepspeed(run: Path, *overrides: str) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert deepspeed is not None, "the deepspeed launcher is not installed next to python"
    return [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "megatron_glm.pretrain",
        "--config",
        str(run),
        *overrides,
    ]


def _job_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``marker`` (the run's unique config path)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(marker in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def reaper(tmp_path: Path) -> Iterator[str]:
    """The marker of this test's processes; whatever still runs at teardown is SIGKILLed (a
    stopped process included) so that a failing test leaves nothing behind."""
    marker = str(tmp_path)
    yield marker
    for proc in _job_processes(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _wait_gone(marker: str, timeout: float) -> list[str]:
    """Command lines of the job's processes still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := _job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [" ".join(p.info["cmdline"])[:200] for p in left]


STEP_LINE = re.compile(r"^step (\d+)/\d+ \|", re.MULTILINE)


def _step_lines(log: str) -> list[int]:
    """The steps of the log lines ``step N/TOTAL | ...`` (rank 0 logs every step)."""
    return [int(m.group(1)) for m in STEP_LINE.finditer(log)]


def _signal_after_two_steps(cmd: list[str], how: str) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own session; after its second logged step send the signal ``how``
    describes; return (the deepspeed command's status, the whole output, seconds from the signal
    until every process holding the output pipe (ranks, launchers, loader workers) exited)."""
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines, steps = [], 0
    for line in proc.stdout:
        lines.append(line)
        steps += bool(STEP_LINE.match(line))
        if steps == 2:
            break
    t0 = time.monotonic()
    if how == "SIGTERM to pid":
        proc.send_signal(signal.SIGTERM)
    elif how == "SIGINT to pid":
        proc.send_signal(signal.SIGINT)
    else:  # Ctrl-C in a terminal: SIGINT to every process of the foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=120)  # EOF once the last writer of the pipe exited
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, "".join(lines) + rest, time.monotonic() - t0


def test_sigint_stops_like_sigterm_and_a_second_one_aborts() -> None:
    with StopConditions(0.0) as stop:
        assert stop.should_stop(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(torch.device("cpu")) == "SIGINT"
        with pytest.raises(AbortRequested):  # a KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler runs between bytecodes; never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize(
    ("error", "rank", "line"),
    [
        (AbortRequested, "0", "second Ctrl-C: aborted without saving the current step"),
        (KeyboardInterrupt, None, "interrupted (Ctrl-C) outside the training steps"),
        (KeyboardInterrupt, "1", None),  # the other ranks stay quiet: one line per job
    ],
)
def test_ctrl_c_outside_the_loop_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: type[KeyboardInterrupt],
    rank: str | None,
    line: str | None,
) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)

    def body(args: object) -> int:
        raise error

    assert pretrain.exit_quietly_on_ctrl_c(body, argparse.Namespace()) == 130
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.startswith(line) and err.count("\n") == 1, err
        assert err.endswith("; a rerun resumes from the last saved checkpoint\n")


def _start_two_ranks(
    cmd: list[str], tmp: Path, name: str, cwds: tuple[Path, Path] | None = None
) -> list[subprocess.Popen[str]]:
    """Two ranks of ``cmd`` as launchers start them (RANK, WORLD_SIZE, MASTER_*), in one new
    process group as a terminal's foreground job; stdout and stderr apart per rank; each in
    its own working directory if ``cwds`` (two nodes' view of a relative path)."""
    port, procs = free_port(), []
    for rank in range(2):
        cwd = None if cwds is None else cwds[rank]
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        group = {"process_group": 0} if rank == 0 else {"process_group": procs[0].pid}
        out = subprocess.PIPE if rank == 0 else (tmp / f"{name}.rank1.out").open("w")
        err = (tmp / f"{name}.rank{rank}.err").open("w")
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=cwd, **group)
        )
    return procs


def _finish(procs: list[subprocess.Popen[str]], tmp: Path, name: str) -> tuple[list[int], str, str]:
    """(exit statuses, rank 0's stdout, both ranks' stderr)."""
    out, _ = procs[0].communicate(timeout=180)
    codes = [procs[0].returncode, procs[1].wait(timeout=60)]
    errs = "".join((tmp / f"{name}.rank{r}.err").read_text() for r in range(2))
    return codes, out, errs


def _two_rank_run(
    cmd: list[str], tmp: Path, name: str, cwds: tuple[Path, Path] | None = None
) -> tuple[list[int], str, str]:
    return _finish(_start_two_ranks(cmd, tmp, name, cwds), tmp, name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("faults")
def test_a_checkpoint_directory_the_ranks_see_differently_is_named(
    tmp_path: Path, tiny_corpus: tuple[str, str], reaper: str
) -> None:
    """``checkpoint.save=ckpt``, a relative path, resolved in each rank's working directory
    as on two nodes without a shared filesystem. A checkpoint that only rank 0 sees is refused
    by every rank before anything is loaded (after one look again 3 s later), rank 0 naming
    both views once, exit 2; a first save into such a directory is named at once (a warning:
    a network filesystem may be late to show another node's files)."""
    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=2)
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run)]
    cmd += ["checkpoint.save=ckpt", "data.num_workers=0"]
    nodes = [tmp_path / f"node{i}" for i in range(4)]
    for node in nodes:
        node.mkdir()
    codes, log, errs = _two_rank_run(cmd, tmp_path, "shared", (nodes[0], nodes[0]))
    assert codes == [0, 0] and (nodes[0] / "ckpt" / "latest").read_text() == "global_step2", errs
    host = socket.gethostname()
    files = sorted(p for p in (nodes[0] / "ckpt" / "global_step2").iterdir())
    size = sum(p.stat().st_size for p in files)
    codes, log, errs = _two_rank_run(cmd, tmp_path, "split", (nodes[0], nodes[1]))
    assert codes == [2, 2], f"{log[-3000:]}\n{errs[-3000:]}"
    assert "Traceback" not in errs and "resumed from" not in log, errs[-4000:]
    assert errs == (
        f"error: the ranks see different checkpoints: rank 1 on {host} sees no 'latest' in "
        f"ckpt ({nodes[1]}/ckpt); but rank 0 on {host} sees ckpt ({nodes[0]}/ckpt): latest = "
        f"global_step2, {len(files)} files, {size:,} bytes. checkpoint.save must be a "
        "directory every rank sees alike: on several nodes, a shared filesystem (not a "
        "node-local or relative path)\n"
    )
    codes, log, errs = _two_rank_run(cmd, tmp_path, "fresh", (nodes[2], nodes[3]))
    assert codes == [0, 0], f"{log[-3000:]}\n{errs[-3000:]}"
    files = sorted(p for p in (nodes[2] / "ckpt" / "global_step2").iterdir())  # no rank 1 RNG
    size = sum(p.stat().st_size for p in files)
    warnings = [ln for ln in errs.splitlines() if "the ranks see different checkpoints" in ln]
    assert warnings == [
        f"warning: the ranks see different checkpoints: rank 1 on {host} sees no 'latest' in "
        f"ckpt ({nodes[3]}/ckpt); but rank 0 on {host} sees ckpt ({nodes[2]}/ckpt): latest = "
        f"global_step2, {len(files)} files, {size:,} bytes. checkpoint.save must be a "
        "directory every rank sees alike: on several nodes, a shared filesystem (not a "
        "node-local or relative path); a resume from it will be refused"
    ], errs[-4000:]
    assert not _wait_gone(reaper, 10.0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("faults")
def test_ctrl_c_saves_once_without_tracebacks_and_resumes_exactly(
    tmp_path: Path, tiny_corpus: tuple[str, str], reaper: str
) -> None:
    """Ctrl-C (SIGINT to the job's process group: both ranks) after step 2 of a 2-rank CLI
    run: one announcement, both ranks save after the same step and exit 0, no traceback on
    either rank's stderr; the rerun resumes and ends with the weights of an uninterrupted run,
    bitwise."""
    from megatron_glm.training.checkpoint import load_model_state

    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=24)
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run)]
    cmd += ["data.num_workers=1"]
    save = tmp_path / "ckpt"
    procs = _start_two_ranks([*cmd, f"checkpoint.save={save}"], tmp_path, "stopped")
    assert procs[0].stdout is not None
    seen = []
    for line in procs[0].stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            break
    os.killpg(procs[0].pid, signal.SIGINT)
    codes, rest, errs = _finish(procs, tmp_path, "stopped")
    log = "".join(seen) + rest
    assert codes == [0, 0], f"{log[-3000:]}\n{errs[-3000:]}"
    assert "Traceback" not in errs, errs[-4000:]
    assert errs.count("SIGINT: stopping after the current step, then saving") == 1, errs
    [stopped] = [ln for ln in log.splitlines() if ln.startswith("stopping after step ")]
    step_text, reason = stopped.removeprefix("stopping after step ").split(": ", 1)
    step = int(step_text)
    # rank 0's handler may run only after it entered the stop poll's all-reduce: rank 1's
    # flag stops it then, after the same step
    assert reason in ("SIGINT", "signal on another rank") and 2 <= step < 24, stopped
    assert (save / "latest").read_text() == f"global_step{step}"
    codes, log, errs = _two_rank_run([*cmd, f"checkpoint.save={save}"], tmp_path, "resumed")
    assert codes == [0, 0] and "Traceback" not in errs, errs[-4000:]
    assert f"resumed from {save} at step {step} ({4 * step} samples consumed)" in log
    assert _step_lines(log) == list(range(step + 1, 25))
    codes, _, errs = _two_rank_run(
        [*cmd, f"checkpoint.save={tmp_path / 'straight'}"], tmp_path, "s"
    )
    assert codes == [0, 0], errs[-4000:]
    resumed, straight = load_model_state(save), load_model_state(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "resume is not exact"
    assert not _wait_gone(reaper, 10.0)


def test_only_deepspeeds_own_launchers_are_watched() -> None:
    """Command lines as ``ps`` shows them under ``deepspeed --num_gpus 2 --module ...``."""
    py = "/venv/bin/python3.11"
    inner = [py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--module"]
    assert _runs_module(inner, "deepspeed.launcher.launch")
    assert _runs_module([py, "/x/deepspeed/launcher/launch.py", "--node_rank=0"], DS_LAUNCH)
    for runner in ([py, "/venv/bin/deepspeed", "--num_gpus", "2"], [py, "/venv/bin/ds", "x.py"]):
        assert _is_deepspeed_runner(runner)
    assert _is_deepspeed_runner([py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"])
    rank = [py, "-u", "-m", "megatron_glm.pretrain", "--local_rank=0", "--config", "deepspeed"]
    for other in (rank, ["/usr/bin/torchrun", "--nproc_per_node", "2"], ["-bash"]):
        assert not _runs_module(other, DS_LAUNCH)
        assert not _is_deepspeed_runner(other)
    assert LauncherWatch.detect() is None  # pytest was not started by DeepSpeed


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("faults")  # one job of this file at a time
def test_signals_to_the_deepspeed_command_save_exit_and_resume(
    tmp_path: Path, tiny_corpus: tuple[str, str], reaper: str
) -> None:
    """SIGTERM to the ``deepspeed`` pid, then Ctrl-C to the rerun's process group; the rerun
    resumes where the first launch stopped."""
    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=2000)
    save = tmp_path / "ckpt"
    overrides = [f"checkpoint.save={save}", "data.num_workers=1"]
    # (status of the deepspeed command, the rank-0 stop reasons that can be logged)
    expected = {
        "SIGTERM to pid": (-signal.SIGTERM, {"launcher gone"}),
        "Ctrl-C": (-signal.SIGINT, {"SIGINT", "SIGTERM", "signal on another rank"}),
    }
    previous = 0
    for how, (status, reasons) in expected.items():
        code, log, seconds = _signal_after_two_steps(_deepspeed(run, *overrides), how)
        assert code == status, f"{how}: status {code}\n{log[-4000:]}"
        assert not _wait_gone(reaper, 10.0), f"{how}: processes left behind"
        stopped = [ln for ln in log.splitlines() if ln.startswith("stopping after step ")]
        assert len(stopped) == 1, f"{how}:\n{log[-4000:]}"
        step_text, reason = stopped[0].removeprefix("stopping after step ").split(": ", 1)
        step = int(step_text)
        assert reason in reasons, f"{how}: {stopped[0]}"
        assert previous + 2 <= step < 2000
        assert f"saved checkpoint {save}/global_step{step}" in log, f"{how}:\n{log[-4000:]}"
        assert (save / "latest").read_text() == f"global_step{step}", how
        steps = _step_lines(log)
        assert steps == list(range(previous + 1, step + 1)), f"{how}: steps {steps[:3]}..."
        if previous:
            assert f"resumed from {save} at step {previous} ({4 * previous} samples" in log, how
        print(f"{how}: stopped after step {step}, job gone {seconds:.1f} s after the signal")
        previous = step


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("faults")
def test_config_error_under_the_launcher_is_printed_once(
    tmp_path: Path, tiny_corpus: tuple[str, str], reaper: str
) -> None:
    run = _run_yaml(tmp_path, *tiny_corpus)
    cmd = _deepspeed(run, "model.num_attention_heads=3")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    message = (
        "error: config field 'model.hidden_size': must be divisible by num_attention_heads (3)"
    )
    assert log.count(message) == 1, log[-4000:]
    assert proc.returncode == pretrain.EXIT_CONFIG_ERROR, log[-4000:]
    assert not _wait_gone(reaper, 10.0)


@pytest.mark.parametrize(
    ("environ", "prints_at_once"),
    [
        ({}, True),  # python -m megatron_glm.pretrain: a world of one
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, True),  # a second node's first
        ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"}, False),
        ({"WORLD_SIZE": "4", "RANK": "3"}, False),  # no LOCAL_RANK: the rank stands in
        ({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "x"}, True),  # unreadable: say it
    ],
)
def test_launch_errors_print_at_once_only_on_local_rank_zero(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    prints_at_once: bool,
) -> None:
    """The others print too, but only if still alive after the grace (no launcher killed
    them), so an error no local rank 0 reported is never lost."""
    monkeypatch.setattr(pretrain, "QUIET_RANK_GRACE_S", 0.3)
    t0 = time.monotonic()
    pretrain.report_launch_error(ValueError("config field 'x': bad"), environ)
    waited = time.monotonic() - t0
    assert capsys.readouterr().err == "error: config field 'x': bad\n"
    assert (waited < 0.3) == prints_at_once, waited


# ----------------------------------------------------------------------------- frozen ranks


def test_every_process_group_gets_the_configured_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's ``new_group()`` without ``timeout=`` takes torch's 30-minute default, not the
    world group's: ours (ParallelDims) and DeepSpeed's (pipeline grid, ``deepspeed.comm``)
    must all get ``train.distributed_timeout_minutes``, and torch's default comes back after."""
    import deepspeed.comm
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    from megatron_glm.parallel.dims import ParallelDims
    from megatron_glm.training.distributed import DistEnv, destroy_distributed, init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # init_distributed writes them; restored after

    def timeout(group: dist.ProcessGroup) -> timedelta:
        return group._get_backend(torch.device("cpu")).options._timeout  # type: ignore[no-any-return]

    init_distributed(DistEnv(0, 1, 0, None, None), timeout_minutes=0.25)
    try:
        dims = ParallelDims.build()
        grid = PipelineParallelGrid(topology=dims.topology())
        groups = {
            "world": dist.group.WORLD,
            "ours: tp": dims.tp_group,
            "ours: dp": dims.dp_group,
            "ours: pp": dims.pp_group,
            "deepspeed: pipe dp": grid.get_data_parallel_group(),
            "deepspeed: pipe stage": grid.get_pipe_parallel_group(),
            "deepspeed.comm.new_group": deepspeed.comm.new_group([0]),
        }
        got = {name: timeout(group) for name, group in groups.items() if group is not None}
    finally:
        destroy_distributed()
    assert got == dict.fromkeys(groups, timedelta(seconds=15))
    assert c10d.default_pg_timeout == timedelta(minutes=30)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watchdogs(world: int, timeout_s: float) -> tuple[list[Watchdog], _Clock, list[str], list[int]]:
    """``world`` watchdogs sharing one in-memory store and a fake clock, ticked by hand."""
    import torch.distributed as dist

    store, clock, lines, exits = dist.HashStore(), _Clock(), [], []
    dogs = [
        Watchdog(r, world, timeout_s, lambda: store, write=lines.append, exit=exits.append)
        for r in range(world)
    ]
    for dog in dogs:  # what the thread does before its first tick
        dog._clock = clock
        dog._open_store()
        dog._publish()
    return dogs, clock, lines, exits


def test_watchdog_names_the_frozen_and_the_stuck_rank_then_ends_the_process() -> None:
    """Rank 1 stops publishing (frozen), rank 2 publishes but stops progressing (stuck in a
    read), ranks 0 and 3 wait. Only rank 0, the lowest live stalled rank, reports; every rank
    stalled past the bound ends itself with exit status 4."""
    dogs, clock, lines, exits = _watchdogs(4, timeout_s=60.0)
    t = dogs[0].timing
    assert (t.interval_s, t.warn_after_s, t.exit_after_s) == (3.0, 30.0, 70.0)
    for dog in dogs:
        for _ in range(5):
            dog.progress("forward")
    dogs[2]._progress -= 2  # rank 2 is two events behind: it never got its data
    dogs[2]._phase = "data"
    frozen = dogs[1]
    while clock.now < 1000.0 + t.warn_after_s:
        clock.now += t.interval_s
        for dog in dogs:
            if dog is not frozen:
                dog.tick()
    host, pid = dogs[0].host, dogs[0].pid
    assert lines == [
        "rank 0 made no progress for 30.0 s (last: forward); train.distributed_timeout_minutes=1",
        f"rank 1 (pid {pid} on {host}): no heartbeat in the last 15.0 s: the process is frozen "
        "(stopped, hung node or network) or dead",
        f"rank 2 (pid {pid} on {host}): alive but behind, progress 3 < 5 (last: data): stuck in "
        "a read, a computation or a collective",
    ]
    assert exits == []
    while not exits:
        clock.now += t.interval_s
        for dog in dogs:
            if dog is not frozen:
                dog.tick()
    assert exits == [4, 4, 4] and clock.now - 1000.0 == 72.0  # first tick past 70 s
    host, pid = dogs[0].host, dogs[0].pid
    for rank, line in zip((0, 2, 3), lines[-3:], strict=True):
        assert line == (
            f"rank {rank} made no progress for 72.0 s (last: {'data' if rank == 2 else 'forward'}"
            "); train.distributed_timeout_minutes=1; no heartbeat from rank(s) 1: ending rank "
            f"{rank} (pid {pid} on {host}) with exit status 4"
        )


def test_watchdog_without_its_store_blames_the_store_host() -> None:
    def refuse() -> Store:
        raise RuntimeError("connection refused")

    lines: list[str] = []
    dog = Watchdog(1, 2, 60.0, refuse, write=lines.append, exit=lambda code: None)
    clock = _Clock()
    dog._clock = clock
    dog._open_store()
    dog.progress("optimizer step")
    clock.now += 31.0
    dog.tick()
    assert lines[0].startswith("rank 1 made no progress for 31.0 s (last: optimizer step)")
    assert "(RuntimeError: connection refused): the store lives in rank 0's process" in lines[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("faults")
def test_a_frozen_rank_ends_the_job_within_the_timeout(
    tmp_path: Path, tiny_corpus: tuple[str, str], reaper: str
) -> None:
    """Two ranks started the way launchers start them (RANK, WORLD_SIZE, MASTER_* set by hand;
    no launcher that would kill the others), ``train.distributed_timeout_minutes=0.25``; rank 1
    is SIGSTOPped after step 2. Rank 0 names it and exits non-zero within the timeout plus a
    margin; rank 1, thawed afterwards, finds its peer gone and exits too."""
    timeout_s = 15.0
    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=2000)
    port = free_port()
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run)]
    cmd += [f"train.distributed_timeout_minutes={timeout_s / 60}", "data.num_workers=0"]
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = subprocess.PIPE if rank == 0 else (tmp_path / "rank1.log").open("w")
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        )
    assert procs[0].stdout is not None
    seen = []
    for line in procs[0].stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            break
    procs[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    rest, _ = procs[0].communicate(timeout=timeout_s + 60.0)
    elapsed = time.monotonic() - t0
    log = "".join(seen) + rest
    print(f"job with a frozen rank ended {elapsed:.1f} s after SIGSTOP (timeout {timeout_s} s)")
    assert procs[0].returncode != 0, log[-4000:]
    assert elapsed < timeout_s + 60.0
    assert f"rank 1 (pid {procs[1].pid} on " in log and "): no heartbeat in the last" in log, log[
        -4000:
    ]
    procs[1].send_signal(signal.SIGCONT)
    assert procs[1].wait(timeout=60.0) != 0
    assert not _wait_gone(reaper, 10.0)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_distributed_timeout_must_be_positive(value: str) -> None:
    with pytest.raises(ValueError, match=r"^config field 'train\.distributed_timeout_minutes'"):
        load_config(None, [f"train.distributed_timeout_minutes={value}"])
    assert load_config(None, []).train.distributed_timeout_minutes == 30.0
