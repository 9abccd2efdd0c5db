"""ParallelDims: the (pp, dp, tp) layout of a job and its process groups, as one object.

Rank layout. Ranks are laid out exactly as DeepSpeed's pipeline lays them out, by building the
same :class:`deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology` (axes
``[pipe, data, model]``, ``model`` fastest)::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so a tensor-parallel group is ``tp`` consecutive ranks (one node's fast links), data-parallel
peers are ``tp`` apart and pipeline stages ``dp * tp`` apart. Using DeepSpeed's own topology class
means our groups and those of its PipelineEngine (issue 7) can never disagree.

The object is the ``mpu`` DeepSpeed expects (``deepspeed.initialize(mpu=dims)``). DeepSpeed's
words differ from Megatron's in one place, and the methods follow DeepSpeed because it is the
caller:

* ``get_model_parallel_*`` is *all* model parallelism, i.e. the ``pp * tp`` ranks that hold one
  replica of the model (same data index). DeepSpeed all-reduces the gradient norm and the
  overflow flag over it and names checkpoint files ``mp_rank_XX`` by its rank (= tp rank when
  ``pp == 1``).
* ``get_tensor_model_parallel_*`` is the TP group; DeepSpeed counts a replicated parameter
  (no ``tensor_model_parallel`` attribute) in the gradient norm only on TP rank 0.
* There is deliberately no ``get_sequence_parallel_*``: in DeepSpeed those mean *Ulysses*
  sequence parallelism and would make it divide the data-parallel world size. Megatron-style
  sequence parallelism (``sequence_parallel`` here) lives inside the TP group and is invisible to
  DeepSpeed.

Groups are created once, in :meth:`ParallelDims.build`, by every rank in the same order (a
``torch.distributed.new_group`` requirement); identical rank lists share one group (with
``pp == 1`` the model-parallel groups are the TP groups). Constructing ``ParallelDims(...)``
directly gives sizes, validation and rank arithmetic only, for config checks and tests without a
process group; asking it for a group raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_glm.config import ConfigError

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology


@dataclass(frozen=True)
class _Groups:
    """This rank's process groups (built collectively by :meth:`ParallelDims.build`)."""

    tp: ProcessGroup
    dp: ProcessGroup
    pp: ProcessGroup
    model: ProcessGroup


@dataclass(frozen=True)
class ParallelDims:
    """Sizes ``tp x pp x dp = world_size`` and this rank's place in the layout.

    ``dp=None`` takes the rest of the world. ``sequence_parallel`` splits the LayerNorm/dropout
    regions of every transformer layer along the sequence across the TP group (needs ``tp > 1``).
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int | None = None
    sequence_parallel: bool = False
    rank: int = 0
    """This process's global rank (0 for a sizes-only object)."""
    _groups: _Groups | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel layout: {name} must be an integer >= 1, got {value!r}")
        model_parallel = self.tp * self.pp
        if self.dp is None:
            if self.world_size % model_parallel:
                raise ValueError(
                    f"parallel layout: tp ({self.tp}) x pp ({self.pp}) = {model_parallel} does "
                    f"not divide the world size {self.world_size}"
                )
            object.__setattr__(self, "dp", self.world_size // model_parallel)
        elif not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"parallel layout: dp must be an integer >= 1, got {self.dp!r}")
        if model_parallel * self.dp_size != self.world_size:
            raise ValueError(
                f"parallel layout: tp ({self.tp}) x pp ({self.pp}) x dp ({self.dp}) = "
                f"{model_parallel * self.dp_size} != world size {self.world_size}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel layout: sequence_parallel needs tp > 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"parallel layout: rank {self.rank} not in [0, {self.world_size})")

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls, *, tp: int = 1, pp: int = 1, dp: int | None = None, sequence_parallel: bool = False
    ) -> ParallelDims:
        """Collective: the layout over the default process group, with all groups created.

        Every rank of the world must call this with the same arguments.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs an initialised default process group")
        sizes = cls(
            world_size=dist.get_world_size(),
            tp=tp,
            pp=pp,
            dp=dp,
            sequence_parallel=sequence_parallel,
            rank=dist.get_rank(),
        )
        return cls(
            world_size=sizes.world_size,
            tp=tp,
            pp=pp,
            dp=sizes.dp,
            sequence_parallel=sequence_parallel,
            rank=sizes.rank,
            _groups=sizes._new_groups(),
        )

    def _new_groups(self) -> _Groups:
        """Create every group of every axis (all ranks, same order); keep this rank's ones."""
        cache: dict[tuple[int, ...], ProcessGroup] = {}

        def mine(rank_lists: Sequence[Sequence[int]]) -> ProcessGroup:
            chosen = None
            for ranks in rank_lists:
                key = tuple(sorted(ranks))
                if key not in cache:
                    group = dist.new_group(ranks=list(key))
                    assert group is not None  # every rank is a member of the group it keeps
                    cache[key] = group
                if self.rank in key:
                    chosen = cache[key]
            assert chosen is not None, "the topology covers every rank"
            return chosen

        topo = self.topology()
        return _Groups(
            tp=mine(topo.get_axis_comm_lists("model")),
            dp=mine(topo.get_axis_comm_lists("data")),
            pp=mine(topo.get_axis_comm_lists("pipe")),
            model=mine([topo.get_axis_list("data", d) for d in range(self.dp_size)]),
        )

    def topology(self) -> PipeModelDataParallelTopology:
        """DeepSpeed's topology object of this layout (what its PipelineModule takes)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp_size)

    # ------------------------------------------------------------------ rank arithmetic

    @property
    def dp_size(self) -> int:
        """``dp`` as an int (it is always set after construction)."""
        assert self.dp is not None
        return self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp_size)

    def global_rank(self, *, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """The global rank at these coordinates."""
        return (pp_rank * self.dp_size + dp_rank) * self.tp + tp_rank

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's TP group, in TP-rank order."""
        return [
            self.global_rank(tp_rank=t, dp_rank=self.dp_rank, pp_rank=self.pp_rank)
            for t in range(self.tp)
        ]

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group, in DP-rank order."""
        return [
            self.global_rank(tp_rank=self.tp_rank, dp_rank=d, pp_rank=self.pp_rank)
            for d in range(self.dp_size)
        ]

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage by stage."""
        return [
            self.global_rank(tp_rank=self.tp_rank, dp_rank=self.dp_rank, pp_rank=p)
            for p in range(self.pp)
        ]

    @property
    def model_parallel_ranks(self) -> list[int]:
        """The ``pp * tp`` ranks holding one model replica (DeepSpeed's model-parallel group)."""
        return sorted(r for p in range(self.pp) for r in self._stage_tp_ranks(p))

    def _stage_tp_ranks(self, pp_rank: int) -> list[int]:
        return [
            self.global_rank(tp_rank=t, dp_rank=self.dp_rank, pp_rank=pp_rank)
            for t in range(self.tp)
        ]

    def check_divisible(self, name: str, value: int) -> None:
        """Raise ConfigError unless config field ``name`` (= ``value``) splits evenly over TP.

        ``RunConfig`` enforces this for a run; this guards a model built from a ``ModelConfig``
        and a layout directly (library use, tests)."""
        if value % self.tp:
            raise ConfigError(name, f"{value} must be divisible by parallel.tp ({self.tp})")

    def describe(self) -> str:
        """One log line: the layout and this rank's coordinates."""
        sp = ", sequence parallel" if self.sequence_parallel else ""
        return (
            f"parallel layout: world {self.world_size} = tp {self.tp} x pp {self.pp} x dp "
            f"{self.dp_size}{sp} | rank {self.rank} -> tp {self.tp_rank}, pp {self.pp_rank}, "
            f"dp {self.dp_rank}"
        )

    # ------------------------------------------------------------------ groups

    def _require_groups(self) -> _Groups:
        if self._groups is None:
            raise RuntimeError(
                "this ParallelDims holds sizes only (no process groups); build it with "
                "ParallelDims.build(...) after the default process group is initialised"
            )
        return self._groups

    @property
    def tp_group(self) -> ProcessGroup:
        return self._require_groups().tp

    @property
    def dp_group(self) -> ProcessGroup:
        return self._require_groups().dp

    @property
    def pp_group(self) -> ProcessGroup:
        return self._require_groups().pp

    @property
    def model_parallel_group(self) -> ProcessGroup:
        return self._require_groups().model

    # ------------------------------------------------------------------ DeepSpeed's mpu API

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.model_parallel_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (a broadcast source)."""
        return self.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.pp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self) -> ProcessGroup:
        return self.pp_group
