"""torch seam: process-group timeouts for groups created without one (torch 2.13).

Why this exists. ``torch.distributed.new_group(ranks)`` does not inherit the world group's
timeout: it takes ``distributed_c10d.default_pg_timeout`` (gloo; 30 min) or
``default_pg_nccl_timeout`` (NCCL), module globals it reads at each call
(``_get_default_timeout``). DeepSpeed creates groups of its own through
``deepspeed.comm.new_group(ranks)``, which has no timeout argument (pipeline grid, p2p and
tied-weight groups, ZeRO helpers), and so do we (``ParallelDims.build``). Setting the two globals
is the one place that makes all of them honour ``train.distributed_timeout_minutes``; they are
not public API, so they are touched here alone. ``tests/integration/test_faults.py`` reads back
the timeout of our groups and DeepSpeed's after ``init_distributed`` (and fails if torch stops
reading these globals).

Upstream change that removes this module: ``new_group`` inheriting the default group's timeout
(or ``deepspeed.comm.new_group`` forwarding a ``timeout``).
"""

from __future__ import annotations

from datetime import timedelta


def set_subgroup_timeout(timeout: timedelta | None) -> None:
    """Make every later ``new_group()`` without ``timeout=`` use ``timeout`` (None: torch's own)."""
    import torch.distributed.constants as constants
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = constants.default_pg_timeout if timeout is None else timeout
    if constants.default_pg_nccl_timeout is not None:  # None when torch has no NCCL
        c10d.default_pg_nccl_timeout = (
            constants.default_pg_nccl_timeout if timeout is None else timeout
        )
