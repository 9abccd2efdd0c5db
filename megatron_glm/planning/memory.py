"""Per-rank memory of a training run, from its config alone: what DeepSpeed and the model allocate.

:func:`estimate_memory` answers "does this layout fit?" before anything is launched. Every term
follows an allocation this code base actually makes (``training.engine`` builds the DeepSpeed
config: torch AdamW, ZeRO ``train.zero_stage``, ``train.precision``, ``train.cpu_offload``,
DeepSpeed's default bucket sizes; the model saves what its torch or Triton kernels save for
backward); each helper's docstring names its source. All figures are bytes on one rank, for the
rank that needs the most (with a pipeline: the stage with the largest total).

The figures are checked against measured peaks of live tensor bytes in real training steps
(``tools/bench/bench_memory.py``, ``tests/unit/test_memory_estimate.py``): within 10%.

Components (:class:`MemoryEstimate`):

* ``params`` -- the model's weights in the model dtype (fp32, or bf16/fp16 under DeepSpeed's
  16-bit modes), ZeRO-3: this rank's partition plus the parameters it gathers for compute.
* ``grads`` -- gradient storage: ``param.grad`` (ZeRO-0/1) or the partitioned gradient buffers
  (ZeRO-2/3), plus fp32 copies DeepSpeed's mixed-precision optimizers keep.
* ``optimizer`` -- AdamW's ``exp_avg`` and ``exp_avg_sq`` (fp32, partitioned by ZeRO >= 1).
* ``master`` -- fp32 master weights (16-bit precision; ZeRO >= 1 keeps an fp32 partition even
  in fp32 training, it is the optimizer's parameter).
* ``activations`` -- what the forward saves for backward, for the micro-batches in flight
  (1 without a pipeline; under 1F1B the first stage holds ``min(pp, micro-batches)``), plus the
  step's input batches, the loss and the backward's working set.
* ``comm_buffers`` -- DeepSpeed's gradient reduction / gather buckets and pipeline buffers.

With ``train.cpu_offload`` the optimizer states and master weights live in host memory: they are
reported in :attr:`MemoryEstimate.host` and left out of :attr:`MemoryEstimate.total` (device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_glm.config import ConfigError, ModelConfig, RunConfig
from megatron_glm.model.glm import resolve_vocab_size

GiB = 2**30

DS_REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's ZeRO ``reduce_bucket_size`` default (``deepspeed.runtime.zero.config``), in
elements: ZeRO-1/2/3 allocate one gradient bucket of this many elements (``setup_buckets`` in
``stage_1_and_2.py``, the ipg buckets in ``stage3.py``) whatever the model size; our DeepSpeed
config leaves it at the default."""
DS_ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
"""``MEMORY_OPT_ALLREDUCE_SIZE`` of ``deepspeed.runtime.engine``: ZeRO-0's data-parallel
all-reduce flattens gradients into buckets of at most this many elements."""
DS_STAGE3_PERSISTENCE_THRESHOLD = 100_000
"""ZeRO-3 ``param_persistence_threshold`` default: smaller parameters stay whole on every rank."""
DS_STAGE3_PREFETCH_ELEMENTS = 50_000_000
"""ZeRO-3 ``prefetch_bucket_size`` default (elements gathered ahead of use)."""
LOSS_CHUNK_BYTES = 128 * 2**20
"""``megatron_glm.kernels.cross_entropy.CHUNK_BYTES``: one chunk of loss logits at most."""
INPUT_BYTES_PER_TOKEN = 8 + 8 + 4 + 16
"""A micro-batch row's tensors per token: int64 tokens and targets, float32 loss_mask, int64
``position_ids`` [2, s] (``training.batches``); a step holds all its micro-batches up front
(``StepRunner._global_token_count`` counts their loss tokens before the first forward)."""

_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank (the worst rank) of a training step at its peak; see the module doc."""

    params: int
    grads: int
    optimizer: int
    master: int
    activations: int
    comm_buffers: int
    host: int = 0
    """Bytes in host memory instead of the device (``train.cpu_offload``): optimizer + master."""
    stage: int = 0
    """The pipeline stage these figures are for (the one with the largest total)."""
    notes: tuple[tuple[str, str], ...] = field(default=())
    """``(component, how it was counted)`` lines for the table."""

    @property
    def total(self) -> int:
        """Device bytes: every component (offloaded states are in :attr:`host`, not here)."""
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.master
            + self.activations
            + self.comm_buffers
        )

    def lines(self) -> list[str]:
        """A human table: one line per component (GiB and bytes), its note, the total."""
        notes = dict(self.notes)
        rows = [
            ("params", self.params),
            ("grads", self.grads),
            ("optimizer", self.optimizer),
            ("master", self.master),
            ("activations", self.activations),
            ("comm_buffers", self.comm_buffers),
        ]
        out = [f"memory per rank (worst rank: pipeline stage {self.stage})"]
        for name, value in rows:
            note = notes.get(name, "")
            out.append(f"  {name:<13}{value / GiB:>10.3f} GiB {value:>16,d} B  {note}".rstrip())
        out.append(f"  {'total':<13}{self.total / GiB:>10.3f} GiB {self.total:>16,d} B")
        if self.host:
            out.append(
                f"  {'host (offload)':<13}{self.host / GiB:>9.3f} GiB {self.host:>16,d} B  "
                "optimizer states + master weights in CPU memory"
            )
        return out


# ----------------------------------------------------------------------------- parameters


def block_parameters(cfg: ModelConfig, tp: int) -> int:
    """One ``GLMBlock``'s parameters on one TP rank (``model.transformer``).

    Column-parallel QKV ``[3h/tp, h]`` + bias, row-parallel dense ``[h, h/tp]`` + full bias,
    column ``h -> f/tp`` + bias, row ``f/tp -> h`` + full bias, two LayerNorms (replicated).
    """
    h = cfg.hidden_size
    assert cfg.ffn_hidden_size is not None
    f = cfg.ffn_hidden_size
    attention = (3 * h * h + 3 * h) // tp + h * h // tp + h
    mlp = (h * f + f) // tp + f * h // tp + h
    return attention + mlp + 4 * h


def layer_parameters(cfg: ModelConfig, vocab_size: int, tp: int, pp: int) -> list[int]:
    """Per-layer parameter counts on one TP rank, in ``GLMModel.layers`` order.

    ``[EmbeddingLayer, GLMBlock x L, FinalLayerNorm]``, and with a pipeline also the
    ``TiedHead`` (``training.pipeline``: the last stage holds its own copy of the word
    embedding shard ``[vocab/tp, h]``).
    """
    h, p = cfg.hidden_size, cfg.max_position_embeddings
    layers = [vocab_size // tp * h + 2 * p * h]
    layers += [block_parameters(cfg, tp)] * cfg.num_layers
    layers.append(2 * h)
    if pp > 1:
        layers.append(vocab_size // tp * h)
    return layers


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """``deepspeed.runtime.utils.partition_uniform``: stage boundaries over ``num_items``."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [i * chunk for i in range(num_parts + 1)]
    for i in range(residual):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """``deepspeed.runtime.utils.partition_balanced``: the same dynamic programme (linear
    partition minimising max - min stage weight, ties to the later split), so stage boundaries
    here equal the ones ``PipelineModule(partition_method="parameters")`` picks."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                span = prefix[i] - prefix[k]
                max_sum, min_sum = max(dp_max[k][j - 1], span), min(dp_min[k][j - 1], span)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j] = cost, max_sum, min_sum
                    position[i][j] = k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return list(reversed(parts))


def pipeline_layer_names(num_layers: int) -> list[str]:
    """Layer class names in pipeline order (``training.pipeline.pipeline_layer_names``)."""
    return ["EmbeddingLayer", *["GLMBlock"] * num_layers, "FinalLayerNorm", "TiedHead"]


def stage_boundaries(cfg: RunConfig, layers: list[int]) -> list[int]:
    """Stage s runs layers ``[parts[s], parts[s + 1])``, as ``parallel.partition_method`` says."""
    import re

    pp, method = cfg.parallel.pp, cfg.parallel.partition_method.lower()
    if pp == 1:
        return [0, len(layers)]
    if method == "uniform":
        return partition_uniform(len(layers), pp)
    if method == "parameters":
        return partition_balanced(layers, pp)
    pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
    names = pipeline_layer_names(cfg.model.num_layers)
    return partition_balanced([1 if pattern.search(n) else 0 for n in names], pp)


# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class _States:
    params: int
    grads: int
    optimizer: int
    master: int
    comm: int
    notes: tuple[tuple[str, str], ...]


def _model_states(cfg: RunConfig, stage_params: list[int], dp: int, pipelined: bool) -> _States:
    """Weights, gradients, AdamW moments and master weights of one rank, by ZeRO stage.

    ``stage_params`` are this stage's per-layer parameter counts on one TP rank. Sources:
    ZeRO-0 fp32 is DeepSpeed's plain engine around our torch AdamW (weights, ``param.grad``,
    ``exp_avg`` + ``exp_avg_sq``); ZeRO-1/2 is ``DeepSpeedZeroOptimizer`` (a flat buffer of the
    16-bit or fp32 weights, an fp32 partition of ``1/dp`` as the optimizer's parameter, its
    moments, full ``param.grad`` at ZeRO-1 or a ``1/dp`` gradient partition at ZeRO-2, one
    reduction bucket of :data:`DS_REDUCE_BUCKET_ELEMENTS`); ZeRO-3 is
    ``DeepSpeedZeroOptimizer_Stage3`` (weights partitioned ``1/dp``, parameters under
    :data:`DS_STAGE3_PERSISTENCE_THRESHOLD` kept whole, the rest gathered for compute);
    16-bit ZeRO-0 is DeepSpeed's ``BF16_Optimizer`` / fp16 optimizer (fp32 master and moments,
    fp32 gradient accumulation).
    """
    t = cfg.train
    psi = sum(stage_params)
    w = _ELEMENT_BYTES[t.precision]
    zero = t.zero_stage
    part = -(-psi // dp)  # ceil: DeepSpeed pads the flat buffer to a multiple of dp
    moments = 8 * (psi if zero == 0 else part)
    notes: list[tuple[str, str]] = []
    if zero == 0:
        params, master = w * psi, 0 if t.precision == "fp32" else 4 * psi
        grads = w * psi if t.precision == "fp32" else (w + 4) * psi
        comm = 4 * min(psi, DS_ALLREDUCE_BUCKET_ELEMENTS) if dp > 1 else 0
        notes.append(("grads", f"param.grad, {psi:,} x {w} B"))
    elif zero in (1, 2):
        params, master = w * psi, 4 * part
        grads = w * psi if zero == 1 else w * part
        if t.precision != "fp32":
            grads += 4 * part  # the fp32 gradient partition handed to the optimizer
        comm = _reduce_bucket_bytes(t.precision)
        notes.append(("grads", "full param.grad" if zero == 1 else f"1/{dp} partition"))
    else:
        persistent = sum(n for n in _stage3_param_sizes(cfg, stage_params) if n <= 100_000)
        params = w * (part + persistent + _stage3_gathered(cfg, stage_params))
        grads, master = w * part + (4 * part if t.precision != "fp32" else 0), 4 * part
        comm = _reduce_bucket_bytes(t.precision)
        notes.append(("params", f"1/{dp} partition + gathered + {persistent:,} persistent"))
    if pipelined:
        comm += 0  # pipeline send/recv buffers are counted with the activations
    notes.append(
        ("optimizer", f"AdamW exp_avg + exp_avg_sq, fp32{'' if zero == 0 else f' 1/{dp}'}")
    )
    notes.append(("comm_buffers", f"DeepSpeed ZeRO-{zero} bucket"))
    return _States(params, grads, moments, master, comm, tuple(notes))


def _reduce_bucket_bytes(precision: str) -> int:
    """One ``reduce_bucket_size`` bucket in the gradient-reduction dtype (``setup_buckets``)."""
    return DS_REDUCE_BUCKET_ELEMENTS * _ELEMENT_BYTES[precision]


def _stage3_param_sizes(cfg: RunConfig, stage_params: list[int]) -> list[int]:
    """Sizes of the individual parameter tensors of one stage (ZeRO-3 decides per tensor)."""
    del stage_params
    m, tp = cfg.model, cfg.parallel.tp
    h, p = m.hidden_size, m.max_position_embeddings
    assert m.ffn_hidden_size is not None
    f = m.ffn_hidden_size
    block = [h, h, 3 * h * h // tp, 3 * h // tp, h * h // tp, h, h, h]
    block += [h * f // tp, f // tp, f * h // tp, h]
    return [p * h, p * h, *block * m.num_layers, h, h]


def _stage3_gathered(cfg: RunConfig, stage_params: list[int]) -> int:
    """Elements ZeRO-3 holds gathered at the peak: the largest layer being computed."""
    return max(stage_params)


# ----------------------------------------------------------------------------- activations


def attention_kind(cfg: RunConfig, device: str) -> str:
    """Which attention implementation the block runs (``kernels.attention``).

    ``triton``: the fused kernel (CUDA, ``kernels`` auto/triton, no attention dropout) saves
    q, k, v, the output and the log-sum-exp. ``sdpa``: torch SDPA on CUDA with the boolean GLM
    mask (memory-efficient backend: also the float mask bias ``[b, 1, s, s]``). ``flash_cpu``:
    SDPA on CPU without dropout (saves like ``sdpa``). ``math``: SDPA on CPU with dropout, the
    unfused math path (saves the scaled q and k, v, softmax probabilities, the dropout mask and
    the dropped probabilities: three ``[b, heads/tp, s, s]`` tensors).
    """
    dropout = cfg.model.attention_dropout > 0
    if device == "cuda":
        if cfg.model.kernels != "torch" and not dropout:
            return "triton"
        return "sdpa"
    return "math" if dropout else "flash_cpu"


def block_activation_bytes(cfg: RunConfig, device: str) -> int:
    """Bytes one ``GLMBlock`` saves for backward, for one micro-batch (no checkpointing).

    Measured term by term with ``torch.autograd.graph.saved_tensors_hooks`` on the torch
    kernels (``T = b s`` tokens, ``r = T/tp`` under sequence parallelism else ``T``, ``e`` the
    activation element size): LayerNorm inputs ``2 r h e`` (+ fp32 mean/rstd), LayerNorm outputs
    as the column-parallel matmuls' inputs ``2 T h e`` (gathered to the full sequence under SP:
    the gathered copy is what ``F.linear`` saves), attention (:func:`attention_kind`), the
    attention context ``T h/tp e``, the MLP's ``h -> f`` output and GeLU output ``2 T f/tp e``,
    and with ``hidden_dropout`` > 0 on the torch kernels the two residual-dropout masks
    ``2 r h e`` (the Triton bias-dropout-add regenerates its mask).
    """
    m, tp = cfg.model, cfg.parallel.tp
    b, s, h = cfg.train.micro_batch_size, cfg.data.seq_length, m.hidden_size
    assert m.ffn_hidden_size is not None
    f, e = m.ffn_hidden_size, _ELEMENT_BYTES[cfg.train.precision]
    tokens = b * s
    r = tokens // tp if cfg.parallel.sequence_parallel else tokens
    heads = m.num_attention_heads // tp
    total = 2 * r * h * e + 4 * r * 4  # LayerNorm inputs + mean/rstd
    total += 2 * tokens * h * e  # LayerNorm outputs (matmul inputs)
    total += tokens * h // tp * e  # context, input of the attention dense
    total += 2 * tokens * f // tp * e  # h->f output, GeLU output
    kind = attention_kind(cfg, device)
    qkv = 3 * tokens * h // tp * e
    if kind == "math":
        total += qkv + 3 * b * heads * s * s * e
    else:
        total += qkv + tokens * h // tp * e + b * heads * s * 4  # q, k, v, output, lse
        if kind != "triton":
            total += b * s * s * e  # the boolean mask as a float bias [b, 1, s, s]
    if m.hidden_dropout > 0 and not (device == "cuda" and m.kernels != "torch"):
        total += 2 * r * h * e
    return total


def _checkpointed_block_bytes(cfg: RunConfig) -> int:
    """With ``model.activation_checkpointing`` a block keeps only its input ``[b, r, h]``."""
    m, tp = cfg.model, cfg.parallel.tp
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    r = tokens // tp if cfg.parallel.sequence_parallel else tokens
    return r * m.hidden_size * _ELEMENT_BYTES[cfg.train.precision]


def embedding_activation_bytes(cfg: RunConfig) -> int:
    """``EmbeddingLayer``: ``nn.Dropout``'s bool mask ``[b, r, h]`` (1 byte) when it drops."""
    if cfg.model.hidden_dropout == 0:
        return 0
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    r = tokens // cfg.parallel.tp if cfg.parallel.sequence_parallel else tokens
    return r * cfg.model.hidden_size


def head_activation_bytes(cfg: RunConfig, vocab_size: int) -> int:
    """Final LayerNorm and the loss on the last stage, every position a loss position (bound).

    ``FinalLayerNorm`` saves its input (``[b, r, h]``); ``kernels.cross_entropy`` computes the
    gradients in forward and saves ``grad_hidden [n, h]`` and ``grad_weight [vocab/tp, h]``, with
    the selected rows ``[n, h]`` and a chunk of logits (at most :data:`LOSS_CHUNK_BYTES`, plus
    its softmax) alive meanwhile.
    """
    m, tp = cfg.model, cfg.parallel.tp
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    r = tokens // tp if cfg.parallel.sequence_parallel else tokens
    e, h = _ELEMENT_BYTES[cfg.train.precision], m.hidden_size
    v = vocab_size // tp
    chunk = min(tokens * v * e, max(LOSS_CHUNK_BYTES // (v * e), 16) * v * e)
    return r * h * e + 2 * r * 4 + 2 * tokens * h * e + v * h * e + 2 * chunk


def activation_bytes(
    cfg: RunConfig, *, stage: int, parts: list[int], vocab_size: int, dp: int, device: str
) -> int:
    """Activations of one stage at its peak: saved tensors of the micro-batches in flight.

    Without a pipeline one micro-batch is in flight (``DataParallelRunner`` runs forward and
    backward per micro-batch). DeepSpeed's 1F1B ``TrainSchedule`` keeps
    ``min(pp - stage, micro-batches)`` micro-batches in flight on ``stage`` (its
    ``num_pipe_buffers``), so the first stage holds the most. With activation checkpointing
    each block keeps its input and one block at a time is recomputed in backward. The step's
    input batches (all micro-batches, :data:`INPUT_BYTES_PER_TOKEN`) are held throughout.
    """
    pp, m = cfg.parallel.pp, cfg.model
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    accum = cfg.train.global_batch_size // (b * dp)
    in_flight = min(pp - stage, accum) if pp > 1 else 1
    first, last = parts[stage], parts[stage + 1]
    blocks = sum(1 for i in range(first, last) if 1 <= i <= m.num_layers)
    per_block = block_activation_bytes(cfg, device)
    if m.activation_checkpointing:
        per_micro = blocks * _checkpointed_block_bytes(cfg)
        working = per_block if blocks else 0
    else:
        per_micro, working = blocks * per_block, 0
    if first == 0:
        per_micro += embedding_activation_bytes(cfg)
    head = head_activation_bytes(cfg, vocab_size) if last > m.num_layers else 0
    inputs = accum * b * s * INPUT_BYTES_PER_TOKEN
    return in_flight * per_micro + working + head + inputs


# ----------------------------------------------------------------------------- the estimate


def _layout(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel size, or a :class:`ConfigError` when ``tp * pp`` does not divide."""
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size < 1 or world_size % model_parallel:
        raise ConfigError(
            "parallel.tp",
            f"tp x pp = {model_parallel} must divide the world size {world_size}",
        )
    return world_size // model_parallel


def estimate_memory(
    cfg: RunConfig, world_size: int, *, vocab_size: int | None = None, device: str = "cuda"
) -> MemoryEstimate:
    """Peak bytes per rank of ``cfg`` trained on ``world_size`` ranks (the worst rank).

    ``vocab_size`` is the tokenizer's padded vocabulary when ``model.vocab_size`` is 0.
    ``device`` (``cuda`` or ``cpu``) picks the kernels whose saved tensors are counted
    (:func:`attention_kind`); GPUs are what the estimate is for, CPU is where it is tested.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"estimate_memory: device must be 'cuda' or 'cpu', got {device!r}")
    dp = _layout(cfg, world_size)
    vocab = resolve_vocab_size(cfg.model, vocab_size)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    layers = layer_parameters(cfg.model, vocab, tp, pp)
    parts = stage_boundaries(cfg, layers)
    best: MemoryEstimate | None = None
    for stage in range(pp):
        states = _model_states(cfg, layers[parts[stage] : parts[stage + 1]], dp, pp > 1)
        acts = activation_bytes(
            cfg, stage=stage, parts=parts, vocab_size=vocab, dp=dp, device=device
        )
        offload = cfg.train.cpu_offload
        host = states.optimizer + states.master if offload else 0
        est = MemoryEstimate(
            params=states.params,
            grads=states.grads,
            optimizer=0 if offload else states.optimizer,
            master=0 if offload else states.master,
            activations=acts,
            comm_buffers=states.comm,
            host=host,
            stage=stage,
            notes=states.notes,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best
