"""ZeRO-Offload's optimizer: DeepSpeed's vectorised CPU AdamW, skippable like ours, built once.

With ``train.cpu_offload`` the fp32 master weights, gradients and Adam moments of every ZeRO
partition live in CPU memory and the update runs there (ZeRO-Offload). DeepSpeed's
``DeepSpeedCPUAdam`` is a C++ AdamW (SIMD + OpenMP), 5-7x faster on CPU than torch's by
DeepSpeed's figures; it is what the ZeRO-Offload paper measures, so it is what ``cpu_offload``
means here. It is a C++ extension that DeepSpeed compiles at first use
(``torch.utils.cpp_extension.load``: a C++ compiler and ninja; measured here: 110 s of CPU time,
66 s wall on 2 cores). torch caches the build in ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); :func:`extensions_dir` points it inside the Python environment
instead (unless the user set it), so a CI job that builds a fresh virtual environment compiles
once per run, and the cache disappears with the environment it was built for (the extension
is tied to that torch). torch's file lock makes concurrent ranks wait for one build.

This module imports DeepSpeed at import time: import it only when offloading.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from megatron_glm.compat.deepspeed import restart_cpu_adam_powers
from megatron_glm.training.skip import SkippableStep

logger = logging.getLogger(__name__)

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    """Where torch builds and finds C++ extensions: ``$TORCH_EXTENSIONS_DIR`` when set, else
    ``<sys.prefix>/torch_extensions`` (set in the environment so DeepSpeed's builder sees it)."""
    if EXTENSIONS_ENV not in os.environ:
        os.environ[EXTENSIONS_ENV] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ[EXTENSIONS_ENV])


class SkippableCPUAdam(SkippableStep, DeepSpeedCPUAdam):
    """``DeepSpeedCPUAdam`` in AdamW mode whose next ``step()`` can be turned into a no-op
    (:class:`~megatron_glm.training.skip.SkippableStep`).

    Every step computes Adam's bias corrections from the saved step count, so a resumed run
    updates exactly as the uninterrupted one. Its per-parameter ``step`` count is a Python int
    (torch's Adam keeps a tensor): code that writes optimizer state reads :attr:`integer_step`.
    """

    integer_step = True

    def __init__(self, params: Any, **kwargs: Any) -> None:
        where = extensions_dir()
        logger.info("DeepSpeed CPU Adam: loading the C++ op (built once into %s)", where)
        DeepSpeedCPUAdam.__init__(self, params, adamw_mode=True, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update (or a skipped one) whose bias corrections come from the step count alone,
        as after a resume (:func:`megatron_glm.compat.deepspeed.restart_cpu_adam_powers`)."""
        if not self.skip_next_step:
            restart_cpu_adam_powers(self)
        return super().step(closure)
