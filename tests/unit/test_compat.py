"""Version seams (megatron_glm.compat): fail loudly when a pinned library changes what we rely on.

Each test states one behaviour of the pinned DeepSpeed / Triton / torch that a compat function
depends on. When a test fails after an upgrade, the compat function's docstring says what to do
(usually: the upstream change landed, delete the workaround).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from megatron_glm.compat.deepspeed import (
    KNOWN_WARNINGS,
    SHM_COMM_OP,
    known_warnings_silenced,
    skip_shm_comm_build,
)
from megatron_glm.compat.torch import set_subgroup_timeout
from megatron_glm.compat.triton import STDLIB_MODULES, interpreted_stdlib, kernel_object
from megatron_glm.kernels.dispatch import triton_kernel

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


# ----------------------------------------------------------------------------- DeepSpeed


def test_shm_comm_op_is_skipped_through_compatible_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """``__compatible_ops__`` exists, names the CPU shared-memory comm op under our key, and
    DeepSpeed's ``build_shm_op`` consults it: marked incompatible, nothing is built."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    assert get_accelerator().device_name() == "cpu"
    ops = deepspeed.ops.__compatible_ops__
    assert isinstance(ops, dict) and SHM_COMM_OP in ops
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == SHM_COMM_OP
    monkeypatch.setitem(ops, SHM_COMM_OP, ops[SHM_COMM_OP])  # restored after the test
    skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    assert build_shm_op() is None


def _emit_known_warnings(init_file: str) -> list[tuple[str, str]]:
    """Trigger the warnings the way DeepSpeed does; returns (category, message) recorded."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        ds_comm.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return _emit_recorded(caught)


def _emit_recorded(caught: list[warnings.WarningMessage]) -> list[tuple[str, str]]:
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    out, inp = torch.empty(4), torch.ones(4)
    ds_comm.all_gather_into_tensor(out, inp)  # what ZeRO calls
    ds_comm.reduce_scatter_tensor(torch.empty(4), torch.ones(4))  # ZeRO-3's gradient reduction
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    dist.broadcast(y, 0)  # what the pipeline's p2p send does to an activation
    y.sum().backward()
    return [(w.category.__name__, str(w.message)) for w in caught]


def _warnings_worker(tmp: str) -> None:
    """In a fresh (forked) process: the warnings as emitted, then under our filter."""
    torch.set_num_threads(1)
    skip_shm_comm_build()
    emitted = _emit_known_warnings(f"{tmp}/init")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_warnings_silenced():
            silenced = _emit_recorded(caught)
        after = _emit_recorded(caught)[len(silenced) :]  # the filter is gone after the block
    torch.save({"emitted": emitted, "silenced": silenced, "after": after}, f"{tmp}/out.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_known_warnings_are_emitted_and_only_they_are_silenced(tmp_path: Path) -> None:
    """The pinned DeepSpeed + torch still emit each warning (else drop its filter), our
    message+category+module filters match them, and only inside the block."""
    ctx = mp.get_context("fork")  # one child: a process group of its own, this one stays clean
    child = ctx.Process(target=_warnings_worker, args=(str(tmp_path),))
    child.start()
    child.join(120)
    assert child.exitcode == 0, child.exitcode
    res = torch.load(tmp_path / "out.pt")
    for message, category, _module in KNOWN_WARNINGS:
        needle = message.replace("\\", "")
        for key, count in (("emitted", 1), ("silenced", 0), ("after", 1)):
            hits = [m for c, m in res[key] if c == category.__name__ and needle in m]
            assert len(hits) == count, (key, needle, res[key])


# ----------------------------------------------------------------------------- torch


def test_new_group_default_timeout_follows_the_globals_we_set() -> None:
    """torch's ``new_group`` default timeout is read from the module globals we set, at each
    call (``_get_default_timeout``); None restores torch's own. The end-to-end check (our
    groups' and DeepSpeed's timeouts read back) is tests/integration/test_faults.py."""
    import torch.distributed.distributed_c10d as c10d

    own = c10d._get_default_timeout("gloo")
    assert own == timedelta(minutes=30)
    try:
        set_subgroup_timeout(timedelta(seconds=15))
        assert c10d._get_default_timeout("gloo") == timedelta(seconds=15)
    finally:
        set_subgroup_timeout(None)
    assert c10d._get_default_timeout("gloo") == own


# ----------------------------------------------------------------------------- Triton


def test_interpreted_function_and_jit_helpers_are_where_we_swap_them() -> None:
    """``InterpretedFunction`` is importable from where we build it, the ``triton.language``
    helpers are ``JITFunction`` attributes of the modules we swap (when Triton was imported
    without the interpreter), and the swap is undone on exit."""
    pytest.importorskip("triton")
    import importlib

    import triton
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernel_object(_copy_kernel.fn, True), InterpretedFunction)
    assert isinstance(kernel_object(_copy_kernel.fn, False), triton.JITFunction)
    modules = [importlib.import_module(name) for name in STDLIB_MODULES]
    before = {(m.__name__, k): v for m in modules for k, v in vars(m).items()}
    helpers = [
        (m, k) for m in modules for k, v in vars(m).items() if isinstance(v, triton.JITFunction)
    ]
    if os.environ.get("TRITON_INTERPRET", "0") in ("0", ""):
        names = {k for _, k in helpers}
        assert {"sum", "max", "zeros_like", "rand", "sigmoid"} <= names, sorted(names)
    with interpreted_stdlib():
        for m, k in helpers:
            assert isinstance(getattr(m, k), InterpretedFunction), (m.__name__, k)
    after = {(m.__name__, k): v for m in modules for k, v in vars(m).items()}
    assert after.keys() == before.keys()
    assert all(after[key] is value for key, value in before.items())


@triton_kernel
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton_kernel
def _row_stats_kernel(X, OUT, n_cols, seed, BLOCK: tl.constexpr):
    """Per row: max, sum of sigmoid, and a uniform draw: three ``triton.language`` helpers."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=ok, other=float("-inf"))
    tl.store(OUT + row * 3, tl.max(x, 0))
    tl.store(OUT + row * 3 + 1, tl.sum(tl.where(ok, tl.sigmoid(x), 0.0), 0))
    tl.store(OUT + row * 3 + 2, tl.rand(seed, row))


def test_interpreted_launch_with_library_helpers_equals_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A launch under ``TRITON_INTERPRET=1`` that calls ``tl.max``/``tl.sum``/``tl.sigmoid``/
    ``tl.rand`` runs (whatever mode Triton was imported in) and matches torch."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(5, 3)
    _row_stats_kernel[(5,)](x, out, 37, 1234, BLOCK=64)
    torch.testing.assert_close(out[:, 0], x.max(dim=1).values, atol=0, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.sigmoid(x).sum(dim=1), atol=1e-5, rtol=1e-6)
    assert ((out[:, 2] >= 0) & (out[:, 2] < 1)).all() and out[:, 2].unique().numel() == 5
