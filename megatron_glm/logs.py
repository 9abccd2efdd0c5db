"""The one console channel: every library message goes through :mod:`logging`, set up here once
by the entry point (``megatron_glm.pretrain``, ``tools/*``) and by nothing else.

Library modules only ever do ``logger = logging.getLogger(__name__)`` and log; they never print
and never configure handlers (an application embedding the library keeps its own logging).
:func:`setup_logging` then decides what reaches the console (docs/design.md, "Logging"):

- **Rank-aware.** Every rank of an N-process job runs the same code, so by default only rank 0
  shows INFO; WARNING and above show on every rank (a warning is usually about *that* rank: its
  missing RNG file, its stalled peer). ``all_ranks=True`` (``GLM_LOG_ALL_RANKS=1`` for the
  entry points) shows INFO everywhere, each line prefixed ``[rank N]`` so interleaved lines can
  be told apart.
- **The streams the tests and users read.** A record below WARNING goes to stdout (where the
  training log lines have always gone, and where tests grep them), WARNING and above to stderr.
  A tool whose stdout is its result (JSON lines, a table) passes ``info_stream="stderr"`` so
  library progress never mixes into it. The stream is looked up at every record, as ``print``
  does, so a test's captured ``sys.stdout`` sees the lines.
- **Byte-identical lines.** The format is the bare message: a line that used to be printed reads
  the same when logged (``[rank N]`` is added only in all-ranks mode).
- **The tqdm bar survives.** While a bar is on screen, a record is written through
  ``tqdm.write``, which clears the bar, writes the line and redraws the bar below it (what
  ``tqdm.contrib.logging.logging_redirect_tqdm`` does, without its context manager around every
  loop, and keeping our stream split, which that helper's replacement handler drops).
- **Only our INFO.** The handler sits on the root logger, so any library's WARNING reaches the
  console as Python's last-resort handler showed it before; the root stays at WARNING, and only
  the ``megatron_glm`` tree is opened to INFO, so third-party INFO chatter stays hidden.

:func:`setup_logging` returns a handle that undoes it (``with setup_logging(...):``), so an entry
point called in-process (tests call ``pretrain.main``) leaves the process as it found it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Literal, TextIO

PACKAGE_LOGGER = "megatron_glm"
"""The logger every library module's ``getLogger(__name__)`` descends from."""

ALL_RANKS_ENV = "GLM_LOG_ALL_RANKS"
"""Environment variable the entry points read to show INFO from every rank (``1``/``true``)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def all_ranks_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`ALL_RANKS_ENV` asks for every rank's INFO lines.

    Raises ValueError naming the variable for a value that is neither true nor false: a typo
    should not silently hide the lines someone asked for.
    """
    env = os.environ if environ is None else environ
    value = env.get(ALL_RANKS_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable {ALL_RANKS_ENV}={env[ALL_RANKS_ENV]!r}: use 1 or 0 (true/false)"
    )


def _write_line(stream: TextIO, text: str) -> None:
    """Write ``text`` and a newline, around any tqdm bar on screen, and flush (as print(flush=True)
    did: a line must be visible before the process can be killed)."""
    tqdm_std = sys.modules.get("tqdm.std")  # never imported: no bar can exist
    tqdm_cls = getattr(tqdm_std, "tqdm", None)
    if tqdm_cls is not None and getattr(tqdm_cls, "_instances", None):
        tqdm_cls.write(text, file=stream)
    else:
        stream.write(text + "\n")
    stream.flush()


class ConsoleHandler(logging.Handler):
    """Records below WARNING to stdout (or stderr, see ``info_stream``), the rest to stderr.

    One lock per stream instead of the handler's single lock: a write blocked on stdout (a full
    pipe nobody reads) must not hold up a warning to stderr, e.g. the watchdog's last words
    before it ends a stuck rank.
    """

    def __init__(self, info_stream: Literal["stdout", "stderr"] = "stdout") -> None:
        super().__init__()
        self.info_stream = info_stream
        self._stream_locks = {False: threading.RLock(), True: threading.RLock()}

    def _to_stderr(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.info_stream == "stderr"

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        with self._stream_locks[self._to_stderr(record)]:
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            _write_line(sys.stderr if self._to_stderr(record) else sys.stdout, text)
        except Exception:
            self.handleError(record)


class LoggingSetup:
    """What :func:`setup_logging` changed; :meth:`restore` (or leaving a ``with``) undoes it."""

    def __init__(self, handler: ConsoleHandler) -> None:
        self.handler = handler
        root, package = logging.getLogger(), logging.getLogger(PACKAGE_LOGGER)
        self._root_level, self._package_level = root.level, package.level
        self._replaced = [h for h in root.handlers if isinstance(h, ConsoleHandler)]

    def restore(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        for old in self._replaced:
            root.addHandler(old)
        root.setLevel(self._root_level)
        logging.getLogger(PACKAGE_LOGGER).setLevel(self._package_level)

    def __enter__(self) -> LoggingSetup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


def setup_logging(
    rank: int = 0,
    *,
    all_ranks: bool = False,
    level: int = logging.INFO,
    info_stream: Literal["stdout", "stderr"] = "stdout",
) -> LoggingSetup:
    """Route every ``megatron_glm`` logger to the console for this process (module docstring).

    ``rank`` is the process's global rank; ranks other than 0 show only WARNING and above unless
    ``all_ranks``. ``level`` is the lowest level shown where INFO is shown (``logging.DEBUG`` for
    more). Calling it again replaces the previous setup rather than doubling every line.
    """
    handler = ConsoleHandler(info_stream)
    prefix = f"[rank {rank}] " if all_ranks else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    setup = LoggingSetup(handler)
    root = logging.getLogger()
    for old in setup._replaced:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    shown = level if rank == 0 or all_ranks else max(level, logging.WARNING)
    logging.getLogger(PACKAGE_LOGGER).setLevel(shown)
    return setup
