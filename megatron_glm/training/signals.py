"""Graceful stop: SIGTERM / SIGUSR1 and a wall-clock deadline, agreed on by all ranks.

A handler only records the signal; the loop polls :meth:`StopConditions.should_stop` after each
optimizer step, which all-reduces (max) a local flag over the world so that every rank stops after
the *same* step even when only some ranks received the signal or their clocks disagree. The loop
then saves a checkpoint and the process exits 0 (SLURM requeues a preempted job; the restart
auto-resumes from ``latest``).
"""

from __future__ import annotations

import signal
import time
from types import FrameType, TracebackType
from typing import Any

import torch

from megatron_glm.training.distributed import all_reduce

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM (scheduler kill, ``kill``) and SIGUSR1 (SLURM ``--signal=USR1@secs`` warning)."""


class StopConditions:
    """Signal flag + deadline. Use as a context manager to install and restore the handlers."""

    def __init__(self, exit_duration_mins: float = 0.0, *, start_time: float | None = None):
        self.deadline = (
            None
            if exit_duration_mins <= 0
            else (time.monotonic() if start_time is None else start_time)
            + 60.0 * exit_duration_mins
        )
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

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
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "exit_duration_mins"
        return None

    def should_stop(self, device: torch.device) -> str | None:
        """Collective: the stop reason if *any* rank wants to stop, else None.

        Codes: 1 = deadline, 2 = signal (a signal wins when both happen). Every rank must call
        this at the same point of the loop.
        """
        reason = self.local_reason()
        code = 0 if reason is None else (1 if reason == "exit_duration_mins" else 2)
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        all_reduce(flag, op="max")
        agreed = int(flag.item())
        if agreed == 0:
            return None
        if reason is not None and (code == agreed):
            return reason
        return "exit_duration_mins" if agreed == 1 else "signal on another rank"
