"""Choosing between the torch reference and the Triton kernel of a fused op, and launching kernels.

Every fused op in :mod:`megatron_glm.kernels` has two implementations with the same contract: a
plain-torch reference (the CPU path and the test oracle) and a Triton kernel. The model config's
``model.kernels`` (``auto | triton | torch``) picks one per call, from the device of the tensors:

- ``torch``: always the reference.
- ``auto``: Triton on CUDA (when Triton is installed), the reference everywhere else.
- ``triton``: Triton, or a :class:`ValueError` if it cannot run. On CPU it runs only under
  Triton's interpreter (``TRITON_INTERPRET=1``), which is how the kernels are tested without a GPU;
  without that variable a CPU tensor is a user error, never a silent switch to the reference.

The two implementations differ in rounding, so the dispatcher never changes numerics silently: the
resolved choice of every op, and any fallback to the reference (e.g. attention dropout > 0, which
the fused attention does not implement), is logged once per distinct message.

Kernel launches go through :class:`TritonKernel` instead of ``@triton.jit`` because ``triton.jit``
fixes compiled-vs-interpreted at *import* time from ``TRITON_INTERPRET``, and Triton is often
imported before anyone could set it (this package's op modules import it; a test process imports
them while collecting other tests). :class:`TritonKernel` decides at launch time. Triton's own
library helpers (``tl.sum``, ``tl.zeros``, ``tl.rand``, ...) are themselves ``@triton.jit``
functions bound at import, so an interpreted launch temporarily swaps them for interpreted twins
and restores them afterwards. Both rely on Triton internals and live in the Triton seam,
:mod:`megatron_glm.compat.triton`.

Logging: the resolved choice goes to this module's logger (``logging.getLogger(__name__)``) at
INFO, a fallback at WARNING, each distinct line once per process; the entry point configures
where it appears.

A consequence for kernel authors: a kernel body cannot call our own helper functions (a compiled
kernel may only call ``@triton.jit`` functions, an interpreted one only interpreted ones), so
each kernel is written self-contained.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import torch

from megatron_glm.compat.triton import interpreted_stdlib, kernel_object
from megatron_glm.config import ConfigError
from megatron_glm.config import KernelChoice as KernelChoice  # re-exported: kernels.KernelChoice

KernelBackend = Literal["torch", "triton"]

logger = logging.getLogger(__name__)

_CHOICES: tuple[str, ...] = ("auto", "triton", "torch")


@functools.cache
def triton_installed() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it: import is slow)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET`` set to a true value).

    Read at every launch rather than once, see the module docstring.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _check_choice(choice: str) -> None:
    if choice not in _CHOICES:
        raise ConfigError("model.kernels", f"{choice!r} is not one of auto, triton, torch")


def _triton_unusable_reason(where: str, on_cuda: bool) -> str | None:
    """Why ``kernels='triton'`` cannot run (None when it can); ``where`` names the device."""
    if not triton_installed():
        return "Triton is not installed"
    if on_cuda or interpreting():
        return None
    return (
        f"{where} and TRITON_INTERPRET=1 is not set (Triton kernels run on CUDA, or on CPU under "
        "Triton's interpreter)"
    )


def resolve_backend(choice: str, device: torch.device, op: str) -> KernelBackend:
    """Resolve ``model.kernels`` for one op on one device, and log the outcome once.

    Raises ValueError for an unknown choice, and for ``triton`` where it cannot run (see module
    docstring); ``auto`` never raises for a known device.
    """
    _check_choice(choice)
    backend: KernelBackend
    if choice == "torch":
        backend = "torch"
    elif choice == "auto":
        backend = "triton" if device.type == "cuda" and triton_installed() else "torch"
    else:
        reason = _triton_unusable_reason(f"the tensors are on {device.type}", device.type == "cuda")
        if reason is not None:
            raise ConfigError(
                "model.kernels", f"'triton' requested but {reason}; use 'auto' or 'torch'"
            )
        backend = "triton"
    mode = " (interpreter)" if backend == "triton" and interpreting() else ""
    log_once(
        logging.INFO,
        f"kernels: {op} uses {backend}{mode} on {device.type} (model.kernels={choice})",
    )
    return backend


def check_kernel_choice(choice: str) -> None:
    """Raise ValueError now if ``model.kernels = choice`` cannot work where the model will run.

    Called at model construction (often on the ``meta`` device, before the real device is known),
    so ``triton`` is checked against "CUDA is available, or the interpreter is on"; each call still
    checks the real device of its tensors through :func:`resolve_backend`.
    """
    _check_choice(choice)
    if choice != "triton":
        return
    reason = _triton_unusable_reason("no CUDA device is available", torch.cuda.is_available())
    if reason is not None:
        raise ConfigError(
            "model.kernels", f"'triton' requested but {reason}; use 'auto' or 'torch'"
        )


@functools.cache
def log_once(level: int, message: str) -> None:
    """Log ``message`` the first time it is seen in this process.

    The memo (``functools.cache``) is the only process-wide state of the kernels package; it holds
    log lines already emitted and changes nothing else.
    """
    logger.log(level, message)


class TritonKernel:
    """A Triton kernel whose compiled-vs-interpreted mode is chosen at launch (module docstring).

    Use as a decorator on a plain function written in the Triton language, then launch it as
    usual: ``kernel[grid](*args, num_warps=4, **constexprs)``.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        if not interpreting():
            return kernel_object(self.fn, False)[grid]
        launch = kernel_object(self.fn, True)[grid]

        def interpreted_launch(*args: Any, **kwargs: Any) -> Any:
            with interpreted_stdlib():
                return launch(*args, **kwargs)

        return interpreted_launch


def triton_kernel(fn: Callable[..., None]) -> TritonKernel:
    """Decorator: see :class:`TritonKernel`."""
    return TritonKernel(fn)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n >= 1``); Triton block shapes must be powers of two."""
    return 1 << (max(n, 1) - 1).bit_length()
