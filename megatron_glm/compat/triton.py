"""Triton seam: choosing compiled or interpreted execution at launch time (Triton 3.9).

Why this exists. ``triton.jit`` decides compiled-vs-interpreted when a kernel is *decorated*,
from ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``) at that moment, and Triton's own
library helpers (``tl.sum``, ``tl.zeros``, ``tl.rand``, ...) are ``@triton.jit`` functions bound
when ``triton.language`` is imported. Our kernel modules are imported long before anyone could set
the variable (a test process imports them while collecting other tests), yet the CPU tests run the
same kernels under the interpreter. So :mod:`megatron_glm.kernels.dispatch` decides at each launch,
through the two functions here, which rely on what Triton does not publish:

- :func:`kernel_object` builds ``triton.runtime.interpreter.InterpretedFunction`` directly (the
  class ``triton.jit`` returns under the interpreter; not exported by ``triton`` or
  ``triton.runtime``), or ``triton.JITFunction`` (exported) for compiled launches;
- :func:`interpreted_stdlib` temporarily replaces every ``JITFunction`` attribute of
  ``triton.language`` and its ``standard`` / ``random`` / ``core`` / ``math`` submodules with an
  interpreted twin, because an interpreted kernel may only call interpreted helpers. Without it
  an interpreted launch after a compiled-mode import fails inside ``tl.sum``.

``tests/unit/test_compat.py`` fails if ``InterpretedFunction`` moves, if the helpers stop being
``JITFunction`` attributes of those modules, or if an interpreted launch that calls them stops
matching torch.

Upstream change that removes this module: Triton choosing the interpreter per launch (a launch
option, or reading ``knobs.runtime.interpret`` at launch rather than at decoration), including for
its own ``triton.language`` helpers.

Nothing here imports Triton at module import: a Triton-less install imports this module fine.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

STDLIB_MODULES: tuple[str, ...] = (
    "triton.language",
    "triton.language.core",
    "triton.language.standard",
    "triton.language.math",
    "triton.language.random",
)
"""Modules whose ``@triton.jit`` helpers get interpreted twins during an interpreted launch."""


@functools.cache
def kernel_object(fn: Callable[..., None], interpret: bool) -> Any:
    """The launchable Triton kernel for the plain function ``fn``: ``InterpretedFunction(fn)``
    when ``interpret``, else ``JITFunction(fn)``; cached so compiled binaries are reused."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton import JITFunction

    return JITFunction(fn)


@contextlib.contextmanager
def interpreted_stdlib() -> Iterator[None]:
    """Within the block, ``triton.language``'s compiled ``@jit`` helpers are interpreted ones.

    Only needed when Triton was imported without ``TRITON_INTERPRET`` set (otherwise they already
    are interpreted and nothing is swapped). Restored on exit, also on errors. Not thread-safe,
    like the interpreter itself.
    """
    import importlib

    from triton import JITFunction

    modules = [importlib.import_module(name) for name in STDLIB_MODULES]
    saved = [
        (module, name, value)
        for module in modules
        for name, value in list(vars(module).items())
        if isinstance(value, JITFunction)
    ]
    for module, name, value in saved:
        setattr(module, name, kernel_object(value.fn, True))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
