"""Planning before launch: per-rank memory estimates (and, built on them, layout choices).

Depends only on :mod:`megatron_glm.config` and :mod:`megatron_glm.model` (analytic counts); it
never imports DeepSpeed or the training package, so a planner runs on a laptop without either.
"""

from megatron_glm.planning.memory import MemoryEstimate, estimate_memory

__all__ = ["MemoryEstimate", "estimate_memory"]
