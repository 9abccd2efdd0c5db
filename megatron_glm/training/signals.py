"""Graceful stop: SIGTERM / SIGINT / SIGUSR1, a lost launcher and a deadline, agreed by all ranks.

A handler only records the signal; the loop polls :meth:`StopConditions.should_stop` after each
optimizer step, which all-reduces (max) a local flag over the world so that every rank stops after
the *same* step even when only some ranks received the signal or their clocks disagree. The loop
then saves a checkpoint and the process exits 0, or with the entry point's
``--stopped-exit-status`` (``launch/slurm.sbatch`` requeues the job on it; the restart
auto-resumes from ``latest``).

SIGINT counts as a stop request like SIGTERM: Ctrl-C reaches every process of the terminal's
process group (each rank, and under ``deepspeed`` both of its launchers, which then SIGTERM the
ranks), and a KeyboardInterrupt in the middle of a step would lose everything since the last
checkpoint. A *second* SIGINT raises :class:`AbortRequested` (a KeyboardInterrupt) at once
(abort without saving), the usual meaning of pressing Ctrl-C twice. The entry points turn it,
and a Ctrl-C before the loop started or after it ended, into one line from rank 0 and exit
status 130 (``pretrain.exit_quietly_on_ctrl_c``), not a traceback per rank.

The ``deepspeed`` command does not forward signals on one node: it is DeepSpeed's *runner*
(``deepspeed/launcher/runner.py``), which starts an *inner launcher*
(``python -m deepspeed.launcher.launch``) and only waits for it. SIGTERM to the runner's pid (what
``kill``, ``timeout`` or a scheduler sends) kills the runner alone, and SIGINT to it alone ends it
with a KeyboardInterrupt; the inner launcher and the ranks would train on as orphans. So a rank
whose parent is that inner launcher watches the chain (:class:`LauncherWatch`) at each stop poll
and treats a vanished runner or inner launcher as a stop request ("launcher gone"): the ranks
finish the current step, save and exit 0, and the inner launcher, seeing every rank exit 0, exits 0
too. The ``deepspeed`` command itself has already returned by then (killed by the signal: status
143 for SIGTERM, 130 for SIGINT), so whoever reruns the job must wait for the ranks (they hold
the rendezvous port until they exit). We chose watching over a forwarding wrapper command because
it keeps the documented ``deepspeed ... --module megatron_glm.pretrain`` command working as is,
and it also covers an inner launcher killed with SIGKILL (OOM killer), where nothing could forward.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import psutil
import torch

from megatron_glm.training.distributed import all_reduce

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""SIGTERM (scheduler kill, ``kill``), SIGINT (Ctrl-C) and SIGUSR1 (SLURM ``--signal=USR1@secs``
warning). DataLoader workers ignore all three (``training.data_source``)."""

LAUNCHER_GONE = "launcher gone"
"""Stop reason of a rank whose DeepSpeed launcher (runner or inner launcher) disappeared."""

_CODES = {"exit_duration_mins": 1, LAUNCHER_GONE: 2}
"""All-reduced stop codes; any signal is 3. The largest wins, and a rank that did not see the
reason itself reports the agreed one (:data:`_REMOTE_REASONS`)."""
_REMOTE_REASONS = {1: "exit_duration_mins", 2: LAUNCHER_GONE, 3: "signal on another rank"}


class AbortRequested(KeyboardInterrupt):
    """A second SIGINT while a stop was already under way: abort without saving."""


def _runs_module(cmdline: Sequence[str], module: str) -> bool:
    """``cmdline`` runs ``python -m module`` or ``module``'s file."""
    path = module.replace(".", "/") + ".py"
    return any(arg == module or arg.endswith(path) for arg in cmdline[:4])


def _is_deepspeed_runner(cmdline: Sequence[str]) -> bool:
    """The ``deepspeed`` / ``ds`` / ``deepspeed.pt`` console scripts, or the runner module."""
    scripts = {"deepspeed", "ds", "deepspeed.pt"}
    head = cmdline[:3]
    return any(os.path.basename(arg) in scripts for arg in head) or _runs_module(
        cmdline, "deepspeed.launcher.runner"
    )


@dataclass(frozen=True)
class LauncherWatch:
    """This rank's DeepSpeed launchers, as pids, to notice when they disappear.

    A process that dies has its children re-parented at once (to init or a subreaper), so
    "my parent is still ``launcher_pid``" and "the launcher's parent is still ``runner_pid``"
    are exact liveness tests that survive pid reuse and zombies, and cost two cheap reads of
    ``/proc`` per poll. Only DeepSpeed's own processes are watched: a plain ``python`` or
    ``torchrun`` rank whose parent shell exits (``nohup``) must keep training.
    """

    launcher_pid: int
    """The inner launcher (``python -m deepspeed.launcher.launch``), this rank's parent."""
    runner_pid: int | None
    """The ``deepspeed`` command that started it; None when the inner launcher was started
    another way (e.g. by pdsh on another node, where DeepSpeed's runner forwards signals
    itself: it installs its handler only for multi-node launches)."""

    @classmethod
    def detect(cls) -> LauncherWatch | None:
        """The watch for this process, or None when it was not started by DeepSpeed's launcher."""
        try:
            launcher = psutil.Process(os.getppid())
            if not _runs_module(launcher.cmdline(), "deepspeed.launcher.launch"):
                return None
            runner_pid = launcher.ppid()
            runner = psutil.Process(runner_pid)
            watched = _is_deepspeed_runner(runner.cmdline())
        except psutil.Error:
            return None
        return cls(launcher.pid, runner_pid if watched else None)

    def gone(self) -> bool:
        """True once the inner launcher or the ``deepspeed`` runner above it has exited."""
        if os.getppid() != self.launcher_pid:
            return True
        if self.runner_pid is None:
            return False
        try:
            return bool(psutil.Process(self.launcher_pid).ppid() != self.runner_pid)
        except psutil.Error:
            return True


class StopConditions:
    """Signal flag + lost launcher + deadline. Use as a context manager to install and restore
    the signal handlers.

    ``launcher`` is :meth:`LauncherWatch.detect`'s result (None: nothing to watch). ``announce``
    (one rank per job) writes a line to stderr when a signal arrives, so a user who pressed
    Ctrl-C knows the run is finishing its step rather than ignoring them.
    """

    def __init__(
        self,
        exit_duration_mins: float = 0.0,
        *,
        start_time: float | None = None,
        launcher: LauncherWatch | None = None,
        announce: bool = False,
    ):
        self.deadline = (
            None
            if exit_duration_mins <= 0
            else (time.monotonic() if start_time is None else start_time)
            + 60.0 * exit_duration_mins
        )
        self.launcher = launcher
        self.announce = announce
        self.received: str | None = None
        self._interrupts = 0
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise AbortRequested
        if self.announce and self.received is None:
            again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            # os.write, not print: a handler may run in the middle of another write to stderr.
            os.write(2, f"{name}: stopping after the current step, then saving{again}\n".encode())
        self.received = name

    def __enter__(self) -> StopConditions:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, if it does."""
        if self.received is not None:
            return self.received
        if self.launcher is not None and self.launcher.gone():
            return LAUNCHER_GONE
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "exit_duration_mins"
        return None

    def should_stop(self, device: torch.device) -> str | None:
        """Collective: the stop reason if *any* rank wants to stop, else None.

        Codes: 1 = deadline, 2 = launcher gone, 3 = signal (the largest wins). Every rank must
        call this at the same point of the loop.
        """
        reason = self.local_reason()
        code = 0 if reason is None else _CODES.get(reason, 3)
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        all_reduce(flag, op="max")
        agreed = int(flag.item())
        if agreed == 0:
            return None
        if reason is not None and code == agreed:
            return reason
        return _REMOTE_REASONS[agreed]
