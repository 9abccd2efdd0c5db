"""Progress watchdog: bound how long a frozen or stuck rank can hang the job, and name it.

A rank that stops (SIGSTOP, a hung node, a dead NIC) or blocks (a stuck NFS read) leaves every
other rank waiting in its next collective. The collective fails after
``train.distributed_timeout_minutes`` (passed to every process group,
``training.distributed``), but the error says only that a collective timed out, not who is
missing; and a rank stuck outside any collective (the blocked read itself) never times out.

Each rank runs one daemon thread (:class:`Watchdog`). The training loop's progress (data
fetched, a micro-batch's forward, an optimizer step; :meth:`Watchdog.attach` hooks them in
without touching the loop) bumps a counter. Every ``interval`` the thread publishes a heartbeat,
``seq progress pid host phase``, under ``megatron_glm/watchdog/<rank>`` in the job's TCPStore
(the rendezvous store every launch path has, reached through its own client connection so
that it never waits behind the process group's traffic).

When this rank's own progress has stalled for half the timeout it reads everyone's heartbeat and
the lowest-ranked live rank logs a diagnosis, per rank:

* a heartbeat that has not changed for ``3 * interval`` (seen on this rank's own clock, so node
  clocks need not agree): the process is frozen or dead;
* a live heartbeat but a progress count below the furthest rank's (every rank runs the same
  schedule, so counts are comparable): stuck in a read, a computation or a collective the others
  are not in, with the phase it last reached;
* no heartbeat readable at all: the store's host (rank 0's process) is frozen or gone.

If this rank's progress stays stalled for the timeout plus a margin, the thread logs and ends the
process with :data:`EXIT_NO_PROGRESS`: the backend's own timeout error (which shows where the
rank waited) normally comes first, the watchdog is the bound for what it does not cover. Nothing
is armed before the first progress event, so start-up and checkpoint loading are not judged.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol

logger = logging.getLogger(__name__)

EXIT_NO_PROGRESS = 4
"""Exit status of a process the watchdog ended (config errors are 2, non-finite losses 3)."""

KEY_PREFIX = "megatron_glm/watchdog/"


class Store(Protocol):
    """The part of ``torch.distributed.Store`` the watchdog uses."""

    def set(self, key: str, value: str) -> None: ...

    def check(self, keys: list[str]) -> bool: ...

    def multi_get(self, keys: list[str]) -> list[bytes]: ...


@dataclass(frozen=True)
class Timing:
    """When the watchdog publishes, diagnoses and gives up, from the distributed timeout."""

    timeout_s: float
    interval_s: float
    warn_after_s: float
    exit_after_s: float

    @classmethod
    def from_timeout(cls, timeout_s: float) -> Timing:
        """Heartbeats 20 times per timeout (1 to 30 s apart); diagnosis at half the timeout;
        exit a margin after it, so that the backend's own timeout error is seen first."""
        interval = min(30.0, max(1.0, timeout_s / 20))
        return cls(
            timeout_s=timeout_s,
            interval_s=interval,
            warn_after_s=timeout_s / 2,
            exit_after_s=timeout_s + max(10.0, 3 * interval),
        )

    @property
    def silent_after_s(self) -> float:
        """A heartbeat unchanged for this long means its process is not running."""
        return 3 * self.interval_s


@dataclass(frozen=True)
class Heartbeat:
    """One rank's published state."""

    seq: int
    progress: int
    pid: int
    host: str
    phase: str

    def encode(self) -> str:
        return f"{self.seq} {self.progress} {self.pid} {self.host} {self.phase}"

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        seq, progress, pid, host, phase = raw.decode().split(" ", 4)
        return cls(int(seq), int(progress), int(pid), host, phase)


@dataclass
class _Seen:
    """A peer's heartbeat, when (this rank's clock) its ``seq`` last changed, and its progress
    when this rank began to watch it."""

    beat: Heartbeat
    since: float
    first_progress: int


class Watchdog:
    """Heartbeat publisher and no-progress detector of one rank (a context manager).

    ``connect`` opens the store client (called on the watchdog thread, so a store that does not
    answer never blocks training); None runs without heartbeats (diagnosis of this rank only).
    ``write`` and ``exit`` are swappable for tests.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        connect: Callable[[], Store] | None,
        *,
        write: Callable[[str], None] | None = None,
        exit: Callable[[int], Any] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.timing = Timing.from_timeout(timeout_s)
        self._connect = connect
        self._write = write or _warn
        self._exit, self._clock = exit, clock
        self._store: Store | None = None
        self._store_error: str | None = None
        self._progress, self._phase = 0, "start"
        self._last_progress: float | None = None  # None: not armed yet
        self._seq = 0
        self._seen: dict[int, _Seen] = {}
        self._reported = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.host, self.pid = socket.gethostname(), os.getpid()

    @classmethod
    def for_process_group(cls, rank: int, world_size: int, timeout_minutes: float) -> Watchdog:
        """The watchdog of a rank whose process group rendezvoused at MASTER_ADDR:MASTER_PORT
        (``init_distributed`` sets both on every launch path)."""
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        timeout_s = 60.0 * timeout_minutes
        store_timeout = timedelta(seconds=Timing.from_timeout(timeout_s).interval_s * 2)

        def connect() -> Store:
            import torch.distributed as dist

            return dist.TCPStore(
                addr, port, is_master=False, timeout=store_timeout, wait_for_workers=False
            )

        return cls(rank, world_size, timeout_s, connect)

    # ------------------------------------------------------------------ the training side

    def progress(self, phase: str) -> None:
        """Called by the training thread at each piece of work done (three attribute writes)."""
        self._progress += 1
        self._phase = phase
        self._last_progress = self._clock()

    def attach(self, module: Any, optimizer: Any) -> None:
        """Report each forward of ``module`` (a micro-batch, also in validation) and each step
        of the torch ``optimizer`` (DeepSpeed's ZeRO/fp16 wrappers call its ``step``)."""
        module.register_forward_hook(lambda *_: self.progress("forward"))
        optimizer.register_step_post_hook(lambda *_: self.progress("optimizer step"))

    def watch_batches(self, batches: Iterable[Any], phase: str) -> Iterator[Any]:
        """``batches``, reporting progress after each one arrived."""
        for batch in batches:
            self.progress(phase)
            yield batch

    def __enter__(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="megatron_glm-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ the watchdog thread

    def _run(self) -> None:
        self._open_store()
        self._publish()
        while not self._halt.wait(self.timing.interval_s):
            self.tick()

    def tick(self) -> None:
        """One round: give up if stalled past the bound, publish, diagnose when stalled."""
        stalled = self._stalled()
        if stalled is not None and stalled >= self.timing.exit_after_s:
            self._give_up(stalled)
            return
        self._publish()
        if stalled is None or stalled < self.timing.warn_after_s / 2:
            self._seen.clear()
            self._reported = False
            return
        lines = self._diagnose()  # watch the others for a while before judging them
        if stalled >= self.timing.warn_after_s and not self._reported:
            self._reported = True
            if lines is not None:
                self._write(self._stall_line(stalled))
                for line in lines:
                    self._write(line)

    def _stalled(self) -> float | None:
        last = self._last_progress
        return None if last is None else self._clock() - last

    def _stall_line(self, stalled: float) -> str:
        return (
            f"rank {self.rank} made no progress for {stalled:.1f} s (last: {self._phase}); "
            f"train.distributed_timeout_minutes={self.timing.timeout_s / 60:g}"
        )

    def _give_up(self, stalled: float) -> None:
        silent = [r for r, line in self._silent_ranks().items() if line]
        who = f"; no heartbeat from rank(s) {', '.join(map(str, silent))}" if silent else ""
        self._write(
            f"{self._stall_line(stalled)}{who}: ending rank {self.rank} (pid {self.pid} on "
            f"{self.host}) with exit status {EXIT_NO_PROGRESS}"
        )
        self._halt.set()
        self._exit(EXIT_NO_PROGRESS)

    # ------------------------------------------------------------------ store

    def _open_store(self) -> None:
        if self._connect is None:
            return
        try:
            self._store = self._connect()
        except Exception as exc:  # any failure only costs the diagnosis
            self._store_error = f"{type(exc).__name__}: {exc}"

    def _publish(self) -> None:
        if self._store is None:
            return
        self._seq += 1
        beat = Heartbeat(self._seq, self._progress, self.pid, self.host, self._phase)
        try:
            self._store.set(f"{KEY_PREFIX}{self.rank}", beat.encode())
        except Exception as exc:  # a store not answering is a finding
            self._store_error = f"{type(exc).__name__}: {exc}"

    def _read(self) -> dict[int, Heartbeat] | None:
        """Every published heartbeat, or None when the store does not answer."""
        if self._store is None:
            return None
        ranks = [r for r in range(self.world_size) if r != self.rank]
        keys = [f"{KEY_PREFIX}{r}" for r in ranks]
        try:
            if not self._store.check(keys):  # someone never published: ask one by one
                present = [
                    (r, k) for r, k in zip(ranks, keys, strict=True) if self._store.check([k])
                ]
                ranks, keys = [r for r, _ in present], [k for _, k in present]
            values = self._store.multi_get(keys) if keys else []
        except Exception as exc:
            self._store_error = f"{type(exc).__name__}: {exc}"
            return None
        self._store_error = None
        return {r: Heartbeat.decode(v) for r, v in zip(ranks, values, strict=True)}

    # ------------------------------------------------------------------ diagnosis

    def _diagnose(self) -> list[str] | None:
        """Lines naming the ranks that hold the job up, or None when another rank reports."""
        beats = self._read()
        now = self._clock()
        if beats is None:
            return [self._store_unreachable()]
        for r, beat in beats.items():
            seen = self._seen.setdefault(r, _Seen(beat, now, beat.progress))
            if seen.beat.seq != beat.seq:
                seen.since = now
            seen.beat = beat
        silent = self._silent_ranks()
        if any(
            r < self.rank
            and not line
            and self._seen[r].beat.progress == self._seen[r].first_progress
            for r, line in silent.items()
        ):
            return None  # a lower rank, alive and stalled like this one, reports for everyone
        lines = [line for line in silent.values() if line]
        lines += self._behind(silent)
        missing = [r for r in range(self.world_size) if r != self.rank and r not in beats]
        if missing:
            lines.append(f"rank(s) {_ranks(missing)}: never published a heartbeat (not started?)")
        return lines or [
            f"every rank is alive at progress {self._progress}: a collective is not completing "
            "(network or a backend problem)"
        ]

    def _silent_ranks(self) -> dict[int, str]:
        """Peer rank -> its "no heartbeat" line, or "" while its heartbeat is live."""
        now = self._clock()
        out = {}
        for r, seen in sorted(self._seen.items()):
            quiet = now - seen.since
            out[r] = (
                f"rank {r} (pid {seen.beat.pid} on {seen.beat.host}): no heartbeat in the "
                f"last {quiet:.1f} s: the process is frozen (stopped, hung node or network) or dead"
                if quiet >= self.timing.silent_after_s
                else ""
            )
        return out

    def _behind(self, silent: dict[int, str]) -> list[str]:
        live = {r: s.beat for r, s in self._seen.items() if not silent[r]}
        furthest = max([self._progress, *(b.progress for b in live.values())])
        return [
            f"rank {r} (pid {b.pid} on {b.host}): alive but behind, progress {b.progress} < "
            f"{furthest} (last: {b.phase}): stuck in a read, a computation or a collective"
            for r, b in sorted(live.items())
            if b.progress < furthest
        ] + (
            [f"rank {self.rank} (this one) is behind: progress {self._progress} < {furthest}"]
            if self._progress < furthest
            else []
        )

    def _store_unreachable(self) -> str:
        addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        why = self._store_error or "no store client"
        return (
            f"cannot read heartbeats from the rendezvous store at {addr} ({why}): the store "
            "lives in rank 0's process (or the launcher's), which is frozen or gone"
        )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _warn(msg: str) -> None:
    """A WARNING: shown on every rank (each watchdog judges from where it stands), on stderr."""
    logger.warning("[watchdog] %s", msg)
