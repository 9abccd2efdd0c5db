"""Layout planner: which (tp, pp, dp, ZeRO, micro-batch, checkpointing, SP) to launch on N GPUs.

Every candidate is a set of dotted overrides applied to the run's own config mapping and validated
by :class:`~megatron_glm.config.RunConfig` itself, so a plan the planner prints is one the config
accepts (heads, FFN and vocabulary divisible by tp, layers by pp, no ZeRO-2/3 with a pipeline,
SP needing tp > 1 and the sequence divisible by tp). The one launch-time rule the config cannot
know, the global batch splitting into ``micro x accumulation x dp``, holds by construction: only
micro-batch sizes dividing ``global / dp`` are enumerated. TP stays inside a node (tp divides the
GPUs per node).

A candidate fits when :func:`megatron_glm.planning.memory.estimate_memory` per rank, plus the
margin, is within the GPU's memory. Fitting candidates are ranked by an estimated step time
(:func:`step_time`), a roofline sum with no overlap between its terms (the engine's DeepSpeed
config leaves ``overlap_comm`` at its default, off for ZeRO-0/1/2; ZeRO-3 overlaps by default,
which the estimate does not credit):

* compute: the step's model FLOPs (``flops_per_token x global_batch x seq``, ``model/flops.py``)
  over ``gpus x peak x MFU``; activation checkpointing recomputes the forward, +1/3;
* pipeline bubble: 1F1B idles ``(pp - 1)`` micro-batch slots per stage, so ``(pp - 1) / m`` of
  the per-stage work (compute and TP traffic), with ``m = global / (micro x dp)``;
* TP: ``tensor_parallel_bytes_per_layer`` (the wire bytes per rank of one layer's collectives)
  x layers per stage x ``m``, over the intra-node bandwidth;
* PP: each stage sends one activation ``[b, s, h]`` forward and receives its gradient back per
  micro-batch, each TP rank ``1/tp`` of it, over the inter-node bandwidth when a stage boundary
  crosses nodes (stages are ``dp x tp`` ranks apart), else intra-node; without SP the receiving
  TP group all-gathers the slices (``(tp-1)/tp`` of it, intra-node);
* DP: ring wire bytes per rank of the rank's parameter shard ``P = N / (tp x pp)``:
  ZeRO-0/1 all-reduce the gradients once per step (``2 (d-1)/d P``); ZeRO-2 reduce-scatters at
  every micro-batch and all-gathers the updated parameters once (``(m + 1) (d-1)/d P``); ZeRO-3
  gathers the parameters for forward and backward and reduce-scatters the gradients at every
  micro-batch (``3 m (d-1)/d P``); over the inter-node bandwidth when the DP group spans nodes.

Communication is in the training precision's bytes (2 for bf16/fp16, 4 for fp32). Equal
estimates are ordered by the larger micro-batch, then the smaller memory. These are
estimates for ranking layouts against each other, not predictions of the wall clock: the
assumptions (:class:`Assumptions`) are printed with every answer.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from megatron_glm.config import ConfigError, RunConfig, apply_overrides, from_dict
from megatron_glm.model.flops import (
    flops_per_token,
    num_parameters,
    tensor_parallel_bytes_per_layer,
)
from megatron_glm.planning.memory import MemoryEstimate, estimate_memory

logger = logging.getLogger(__name__)

GiB = 1024**3
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}

Estimator = Callable[[RunConfig, int, int], MemoryEstimate]
"""``(cfg, world_size, vocab_size) -> per-rank memory``: ``estimate_memory`` by default."""


@dataclass(frozen=True)
class Cluster:
    """``gpus`` GPUs of ``gpu_memory`` bytes each, spread evenly over ``nodes`` nodes."""

    gpus: int
    gpu_memory: int
    nodes: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1 or self.gpu_memory <= 0:
            raise ValueError(f"cluster: gpus, nodes and gpu memory must be > 0 ({self})")
        if self.gpus % self.nodes:
            raise ValueError(
                f"cluster: {self.gpus} GPUs do not split evenly over {self.nodes} nodes"
            )

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    def node_of(self, rank: int) -> int:
        """The node of a global rank (the launchers fill a node's slots with consecutive ranks)."""
        return rank // self.gpus_per_node


@dataclass(frozen=True)
class Assumptions:
    """The hardware figures the step-time estimate rests on (printed with every answer).

    Defaults: an H100 SXM's dense bf16 peak, an MFU that well-tuned Megatron runs of this size
    reach, NVLink bus bandwidth per GPU, and one 400 Gb/s InfiniBand NIC per GPU (both the
    achievable ring bandwidth, not the link's nominal rate).
    """

    peak_flops: float = 989e12
    """Peak dense FLOP/s per GPU in the training precision."""
    mfu: float = 0.4
    """Model FLOPs utilisation of the compute (without recomputation)."""
    intra_node_bandwidth: float = 200e9
    """Achieved bytes/s per GPU of a collective inside a node."""
    inter_node_bandwidth: float = 40e9
    """Achieved bytes/s per GPU of a collective or send across nodes."""
    memory_margin: float = 0.1
    """Fraction of GPU memory left free (fragmentation, allocator caches, CUDA context)."""

    def lines(self) -> list[str]:
        return [
            f"peak {self.peak_flops / 1e12:.0f} TFLOP/s per GPU at MFU {self.mfu:.0%}",
            f"bandwidth per GPU: {self.intra_node_bandwidth / 1e9:.0f} GB/s inside a node, "
            f"{self.inter_node_bandwidth / 1e9:.0f} GB/s across nodes; no compute/comm overlap",
            f"memory margin {self.memory_margin:.0%} of each GPU",
        ]


@dataclass(frozen=True, order=True)
class Layout:
    """One point of the search space; ``dp`` is what tp and pp leave of the GPUs."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    activation_checkpointing: bool
    sequence_parallel: bool

    def overrides(self) -> list[str]:
        """The dotted overrides that select this layout (dp follows from the world size)."""
        return [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"train.zero_stage={self.zero_stage}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"model.activation_checkpointing={str(self.activation_checkpointing).lower()}",
        ]

    def describe(self) -> str:
        return (
            f"tp {self.tp} pp {self.pp} dp {self.dp} zero {self.zero_stage} "
            f"micro {self.micro_batch_size} ckpt {'on' if self.activation_checkpointing else 'off'}"
            f" sp {'on' if self.sequence_parallel else 'off'}"
        )


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by term (see the module docstring)."""

    compute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm


@dataclass(frozen=True)
class Plan:
    """A fitting layout: its validated config, its memory estimate and its step time."""

    layout: Layout
    config: RunConfig = field(repr=False)
    memory: MemoryEstimate = field(repr=False)
    time: StepTime


@dataclass
class Search:
    """The ranked plans and what the rest of the search space was rejected for."""

    plans: list[Plan]
    candidates: int = 0
    rejected_by_config: int = 0
    too_large: int = 0
    smallest_too_large: int | None = None


_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": GiB, "tib": 1024**4}
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})


def parse_size(text: str) -> int:
    """Bytes of ``80GiB``, ``80 GB``, ``512MiB`` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else "?"
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory size {text!r}: expected e.g. 80GiB, 80GB, 512MiB or bytes")
    value = float(match.group(1))
    return int(value * _UNITS[unit])


def padded_vocab_size(cfg: RunConfig, tp: int, tokenizer_vocab: int | None) -> int:
    """The embedding rows at ``tp``: ``model.vocab_size``, or the tokenizer's padded for tp.

    The padding rule is the tokenizer's (``data.tokenizer``): up to a multiple of
    ``make_vocab_size_divisible_by x tp`` (Megatron's: equal, aligned vocabulary shards).
    """
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size
    if tokenizer_vocab is None:
        raise ConfigError(
            "model.vocab_size",
            "0 (= from the tokenizer): give the tokenizer's vocabulary size (--vocab-size) to plan",
        )
    multiple = cfg.model.make_vocab_size_divisible_by * tp
    return -(-tokenizer_vocab // multiple) * multiple


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: RunConfig, cluster: Cluster) -> Iterator[Layout]:
    """Every layout of the cluster whose batch splits evenly; the config judges the rest.

    tp divides the GPUs per node (TP stays on a node's links); the micro-batch divides
    ``global / dp`` (so ``global = micro x accumulation x dp``). Combinations the config may
    refuse (ZeRO-2/3 with pp > 1, SP at tp 1, heads not divisible by tp...) are yielded too and
    left to :func:`layout_config`, so the rules live in one place.
    """
    batch = cfg.train.global_batch_size
    for tp in _divisors(cluster.gpus_per_node):
        for pp in _divisors(cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            if batch % dp:
                continue
            micros = _divisors(batch // dp)
            for zero, ckpt, sp, micro in itertools.product(
                range(4), (False, True), (False, True), micros
            ):
                yield Layout(tp, pp, dp, zero, micro, ckpt, sp)


def layout_config(raw: dict[str, Any], layout: Layout) -> RunConfig:
    """The run config with ``layout``'s overrides, validated by the config (ConfigError if not).

    The same path as ``pretrain --config X <overrides>`` (``apply_overrides`` then the
    dataclasses' validation) on the printed command line's overrides.
    """
    config = from_dict(RunConfig, apply_overrides(copy.deepcopy(raw), layout.overrides()))
    assert isinstance(config, RunConfig)
    return config


def _crosses_nodes(groups: Iterator[list[int]], cluster: Cluster) -> bool:
    return any(len({cluster.node_of(r) for r in group}) > 1 for group in groups)


def _dp_groups(layout: Layout) -> Iterator[list[int]]:
    """Ranks of each DP group: ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``."""
    t, d = layout.tp, layout.dp
    for stage, tp_rank in itertools.product(range(layout.pp), range(t)):
        yield [(stage * d + i) * t + tp_rank for i in range(d)]


def _stage_pairs(layout: Layout) -> Iterator[list[int]]:
    """Each rank and its peer in the next stage (``dp x tp`` ranks further)."""
    stride = layout.dp * layout.tp
    for rank in range((layout.pp - 1) * stride):
        yield [rank, rank + stride]


def dp_wire_bytes(
    layout: Layout, params_per_rank: float, bytes_per_element: int, micro_batches: int
) -> float:
    """Ring wire bytes per rank per step of the data-parallel traffic at the layout's ZeRO stage.

    One pass (an all-gather or a reduce-scatter of the rank's ``P`` parameters) sends
    ``(d-1)/d P`` elements; an all-reduce is two passes. ZeRO-0/1: one gradient all-reduce per
    step (2). ZeRO-2: a gradient reduce-scatter per micro-batch, one parameter all-gather after
    the update (m + 1). ZeRO-3: forward and backward parameter all-gathers and a gradient
    reduce-scatter per micro-batch (3 m).
    """
    d = layout.dp
    if d == 1:
        return 0.0
    passes = {0: 2, 1: 2, 2: micro_batches + 1, 3: 3 * micro_batches}[layout.zero_stage]
    return passes * (d - 1) / d * params_per_rank * bytes_per_element


def micro_batches(cfg: RunConfig, layout: Layout) -> int:
    """Micro-batches per step per DP rank, ``m = global / (micro x dp)``."""
    return cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp)


def compute_seconds(cfg: RunConfig, cluster: Cluster, a: Assumptions, vocab_size: int) -> float:
    """Model FLOPs of a step over ``gpus x peak x MFU``; +1/3 when the forward is recomputed."""
    seq = cfg.data.seq_length
    flops = flops_per_token(cfg.model, vocab_size, seq) * cfg.train.global_batch_size * seq
    recompute = 4 / 3 if cfg.model.activation_checkpointing else 1.0
    return flops * recompute / (cluster.gpus * a.peak_flops * a.mfu)


def tp_seconds(cfg: RunConfig, layout: Layout, a: Assumptions) -> float:
    """One stage's TP wire bytes per step (its layers x m micro-batches) over the NVLink rate."""
    per_layer = tensor_parallel_bytes_per_layer(
        cfg.model,
        micro_batch_size=layout.micro_batch_size,
        seq_length=cfg.data.seq_length,
        tp=layout.tp,
        sequence_parallel=layout.sequence_parallel,
        bytes_per_element=BYTES_PER_ELEMENT[cfg.train.precision],
    ).wire_bytes_per_rank
    layers = cfg.model.num_layers // layout.pp
    return per_layer * layers * micro_batches(cfg, layout) / a.intra_node_bandwidth


def pp_seconds(cfg: RunConfig, layout: Layout, cluster: Cluster, a: Assumptions) -> float:
    """An activation forward and its gradient back per micro-batch across a stage boundary.

    Each TP rank sends ``1/tp`` of the ``[b, s, h]`` tensor: its sequence slice under SP, else
    (DeepSpeed's ``pipe_partitioned``/``grad_partitioned``, ``training.engine``) a slice of the
    replica, which the receiving stage's TP group then all-gathers inside its node.
    """
    if layout.pp == 1:
        return 0.0
    act = layout.micro_batch_size * cfg.data.seq_length * cfg.model.hidden_size
    act *= BYTES_PER_ELEMENT[cfg.train.precision]
    inter = _crosses_nodes(_stage_pairs(layout), cluster)
    seconds = act / layout.tp / (a.inter_node_bandwidth if inter else a.intra_node_bandwidth)
    if not layout.sequence_parallel:
        seconds += (layout.tp - 1) / layout.tp * act / a.intra_node_bandwidth
    return 2 * micro_batches(cfg, layout) * seconds


def dp_seconds(
    cfg: RunConfig, layout: Layout, cluster: Cluster, a: Assumptions, vocab_size: int
) -> float:
    """The ZeRO stage's DP traffic of the rank's ``N / (tp x pp)`` parameters."""
    params = num_parameters(cfg.model, vocab_size) / (layout.tp * layout.pp)
    nbytes = BYTES_PER_ELEMENT[cfg.train.precision]
    wire = dp_wire_bytes(layout, params, nbytes, micro_batches(cfg, layout))
    inter = _crosses_nodes(_dp_groups(layout), cluster)
    return wire / (a.inter_node_bandwidth if inter else a.intra_node_bandwidth)


def step_time(
    cfg: RunConfig, layout: Layout, cluster: Cluster, a: Assumptions, vocab_size: int
) -> StepTime:
    """Estimated seconds per optimizer step of ``cfg`` at ``layout`` (module docstring)."""
    compute = compute_seconds(cfg, cluster, a, vocab_size)
    tp_comm = tp_seconds(cfg, layout, a)
    bubble = (layout.pp - 1) / micro_batches(cfg, layout) * (compute + tp_comm)
    return StepTime(
        compute=compute,
        bubble=bubble,
        tp_comm=tp_comm,
        pp_comm=pp_seconds(cfg, layout, cluster, a),
        dp_comm=dp_seconds(cfg, layout, cluster, a, vocab_size),
    )


def plan_layouts(
    raw: dict[str, Any],
    cluster: Cluster,
    assumptions: Assumptions | None = None,
    *,
    tokenizer_vocab: int | None = None,
    estimator: Estimator | None = None,
) -> Search:
    """Every layout of ``raw`` (a run mapping, overrides applied) that fits, fastest first.

    ``estimator(cfg, world_size, vocab_size)`` defaults to ``estimate_memory``; a plan fits when
    its total per rank is at most ``(1 - memory_margin) x gpu_memory``. Memory grows with the
    micro-batch (activations), so once a micro-batch is too large for a layout the larger ones
    are counted too large without estimating them (micro-batches are enumerated in order).
    """
    a = assumptions or Assumptions()
    estimate = estimator or _estimate
    budget = cluster.gpu_memory * (1 - a.memory_margin)
    base = from_dict(RunConfig, copy.deepcopy(raw))
    search = Search(plans=[])
    full: set[Layout] = set()  # shapes (micro-batch 1) whose smaller micro-batch did not fit
    for layout, cfg in _validated(raw, candidate_layouts(base, cluster)):
        search.candidates += 1
        shape = dataclasses.replace(layout, micro_batch_size=1)
        if cfg is None or shape in full:
            search.rejected_by_config += cfg is None
            search.too_large += cfg is not None
            continue
        vocab = padded_vocab_size(cfg, layout.tp, tokenizer_vocab)
        memory = estimate(cfg, cluster.gpus, vocab)
        if memory.total > budget:
            full.add(shape)  # micro-batches come in increasing order, and memory grows with them
            search.too_large += 1
            smallest = search.smallest_too_large
            search.smallest_too_large = min(memory.total, smallest or memory.total)
            continue
        search.plans.append(Plan(layout, cfg, memory, step_time(cfg, layout, cluster, a, vocab)))
    search.plans.sort(key=_rank_key)
    logger.debug("planned %d of %d layouts", len(search.plans), search.candidates)
    return search


def _rank_key(plan: Plan) -> tuple[float, int, int, Layout]:
    """Fastest first; among equal estimates the larger micro-batch (the estimate assumes one
    MFU, but bigger matmuls are never less efficient on a GPU), then the smaller memory."""
    return plan.time.total, -plan.layout.micro_batch_size, plan.memory.total, plan.layout


def _validated(
    raw: dict[str, Any], layouts: Iterator[Layout]
) -> Iterator[tuple[Layout, RunConfig | None]]:
    """Each layout with its validated config, or None where the config refuses it.

    The overrides are validated once per layout shape (all but the micro-batch, ``layout_config``)
    and the micro-batch is swapped in with ``dataclasses.replace``, which runs the train
    section's and the run's validation again: the same rules, a fraction of the parsing.
    """
    shapes: dict[Layout, RunConfig | None] = {}
    for layout in layouts:
        key = dataclasses.replace(layout, micro_batch_size=1)
        if key not in shapes:
            try:
                shapes[key] = layout_config(raw, key)
            except ConfigError:
                shapes[key] = None
        shape = shapes[key]
        if shape is None:
            yield layout, None
            continue
        train = dataclasses.replace(shape.train, micro_batch_size=layout.micro_batch_size)
        yield layout, dataclasses.replace(shape, train=train)


def _estimate(cfg: RunConfig, world_size: int, vocab_size: int) -> MemoryEstimate:
    return estimate_memory(cfg, world_size, vocab_size=vocab_size)
