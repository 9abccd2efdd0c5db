"""The console channel (``megatron_glm.logs``): rank-aware levels, the stdout/stderr split the
tests and users read, byte-identical lines, the tqdm bar kept intact, and a clean undo."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from tqdm import tqdm

from megatron_glm.kernels.dispatch import resolve_backend
from megatron_glm.logs import (
    ALL_RANKS_ENV,
    ConsoleHandler,
    all_ranks_requested,
    setup_logging,
)

PROBE = logging.getLogger("megatron_glm.tests.probe")  # a library module's logger


def test_rank_zero_info_to_stdout_warnings_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with setup_logging(0):
        PROBE.info("step 3/6 | samples 12 | loss 5.5")
        PROBE.warning("warning: rank 0: something")
        PROBE.debug("not shown at INFO")
    out, err = capsys.readouterr()
    assert out == "step 3/6 | samples 12 | loss 5.5\n"  # the bare line, as print wrote it
    assert err == "warning: rank 0: something\n"


def test_other_ranks_hide_info_unless_all_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    with setup_logging(1):
        PROBE.info("rank 1 info")
        PROBE.warning("rank 1 warning")
    assert capsys.readouterr() == ("", "rank 1 warning\n")
    with setup_logging(1, all_ranks=True):
        PROBE.info("rank 1 info")
        PROBE.warning("rank 1 warning")
    assert capsys.readouterr() == ("[rank 1] rank 1 info\n", "[rank 1] rank 1 warning\n")


def test_info_stream_stderr_keeps_a_tools_stdout_clean(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with setup_logging(0, info_stream="stderr"):
        PROBE.info("progress")
    assert capsys.readouterr() == ("", "progress\n")


def test_library_info_reaches_the_console_only_after_setup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The kernel choice the dispatcher logs once: invisible without setup (no handler takes
    INFO), on stdout with it. A fresh op name, since each message is logged once per process."""
    resolve_backend("torch", torch.device("cpu"), "probe-before-setup")
    assert capsys.readouterr().out == ""
    with setup_logging(0):
        resolve_backend("torch", torch.device("cpu"), "probe-after-setup")
    assert capsys.readouterr().out == (
        "kernels: probe-after-setup uses torch on cpu (model.kernels=torch)\n"
    )


def test_third_party_info_stays_hidden_warnings_show(capsys: pytest.CaptureFixture[str]) -> None:
    other = logging.getLogger("some_dependency")
    with setup_logging(0):
        other.info("chatter")
        other.warning("a dependency's warning")
    assert capsys.readouterr() == ("", "a dependency's warning\n")


def test_setup_is_undone_and_never_doubles_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root, package = logging.getLogger(), logging.getLogger("megatron_glm")
    before = (root.level, package.level, list(root.handlers))
    with setup_logging(0):
        with setup_logging(0):  # a second setup replaces the first
            PROBE.info("once")
            assert sum(isinstance(h, ConsoleHandler) for h in root.handlers) == 1
        PROBE.info("still set up")
    PROBE.info("gone")
    assert capsys.readouterr().out == "once\nstill set up\n"
    assert (root.level, package.level, list(root.handlers)) == before


def test_a_line_clears_the_progress_bar_and_redraws_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with setup_logging(0):
        bar = tqdm(total=3, file=sys.stderr, bar_format="{n}/{total}")
        bar.update(1)
        PROBE.info("validation at step 1 | loss 5.0")
        bar.close()
    out, err = capsys.readouterr()
    assert out == "validation at step 1 | loss 5.0\n"
    cleared = err.index("\r   \r")  # the bar erased before the line was written...
    assert "1/3" in err[cleared:]  # ...and drawn again after it


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("TRUE", True), ("0", False), ("", False)]
)
def test_all_ranks_env(value: str, expected: bool) -> None:
    assert all_ranks_requested({ALL_RANKS_ENV: value}) is expected
    assert all_ranks_requested({}) is False


def test_all_ranks_env_typo_is_named() -> None:
    with pytest.raises(ValueError, match=f"environment variable {ALL_RANKS_ENV}='yse'"):
        all_ranks_requested({ALL_RANKS_ENV: "yse"})
