"""Per-rank memory of a training run, from its config alone: what DeepSpeed and the model allocate.

:func:`estimate_memory` answers "does this layout fit?" before anything is launched. Every term
follows an allocation this code base actually makes (``training.engine`` builds the DeepSpeed
config: torch AdamW, ZeRO ``train.zero_stage``, ``train.precision``, ``train.cpu_offload``,
DeepSpeed's default bucket sizes; the model saves what its torch or Triton kernels save for
backward); each helper's docstring names its source. All figures are bytes on one rank, for the
rank that needs the most (with a pipeline: the stage with the largest total).

The figures are checked against measured peaks of live tensor bytes in real training steps on
CPU (``tools/bench/bench_memory.py``, ``tests/distributed/test_memory_measured.py``): within 10%
for glm-tiny and a 2-layer glm-base shape at tp 1/2 (with SP), pp 1/2, ZeRO 0-3, checkpointing
on/off, fp32 and bf16 (ZeRO-1), ZeRO-2 offload. Not measured yet: the GPU kernels' terms
(Triton attention and bias-dropout-add; no GPU was lent), 16-bit ZeRO-0 and ZeRO-2/3. Known
gap: under tensor parallelism a block keeps one more ``[b, s, h]`` tensor than counted here
(measured: +T h e per block on glm-tiny at tp 2, about 5% of its peak; the op is not yet found).

Components (:class:`MemoryEstimate`):

* ``params`` -- the model's weights in the model dtype (fp32, or bf16/fp16 under DeepSpeed's
  16-bit modes), ZeRO-3: this rank's partition plus the parameters it gathers for compute.
* ``grads`` -- gradient storage: ``param.grad`` (ZeRO-0/1) or the partitioned gradient buffers
  (ZeRO-2/3), plus fp32 copies DeepSpeed's mixed-precision optimizers keep.
* ``optimizer`` -- AdamW's ``exp_avg`` and ``exp_avg_sq`` (fp32, partitioned by ZeRO >= 1).
* ``master`` -- fp32 master weights (16-bit precision; ZeRO >= 1 keeps an fp32 partition even
  in fp32 training, it is the optimizer's parameter).
* ``activations`` -- the rest of the peak: what the forward saves for backward for the
  micro-batches in flight (1 without a pipeline; under 1F1B the first stage holds
  ``min(pp, micro-batches)``), the loss's and the backward's working sets, the step's input
  batches, or at the optimizer step its temporaries (the note says which phase peaked).
* ``comm_buffers`` -- DeepSpeed's gradient reduction buckets (ZeRO) or flat all-reduce copy.

The peak is the largest of a step's phases (forward with the loss, backward, gradient
reduction, gradient norm and optimizer step), each counted with what is alive then: gradients
and ZeRO-1's bucket only from the step's first backward on, ZeRO-2's bucket only inside a
backward, and so on (:func:`_model_states`, :class:`_Phases`); :attr:`MemoryEstimate.total` is
that peak.

With ``train.cpu_offload`` the optimizer states and master weights live in host memory: they are
reported in :attr:`MemoryEstimate.host` and left out of :attr:`MemoryEstimate.total` (device).
"""

from __future__ import annotations

import functools
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
DS_STAGE3_MAX_LIVE_ELEMENTS = 1_000_000_000
"""ZeRO-3 ``max_live_parameters`` default: gathered parameter elements kept alive at most."""
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


def layer_tensors(
    cfg: ModelConfig, vocab_size: int, tp: int, pp: int
) -> list[list[tuple[int, int]]]:
    """``(elements, ndim)`` of every parameter tensor on one TP rank, per layer, in
    ``module.parameters()`` order (what DeepSpeed flattens and partitions).

    Layers as in ``GLMModel.layers``: ``EmbeddingLayer`` (word ``[vocab/tp, h]``, position and
    block-position tables ``[P, h]``), each ``GLMBlock`` (``model.transformer``: LayerNorm,
    column-parallel QKV ``[3h/tp, h]`` + bias, row-parallel dense ``[h, h/tp]`` + full bias,
    LayerNorm, column ``[f/tp, h]`` + bias, row ``[h, f/tp]`` + full bias), ``FinalLayerNorm``,
    and with a pipeline the ``TiedHead`` (``training.pipeline``: the last stage's own copy of
    the word embedding shard).
    """
    h, p = cfg.hidden_size, cfg.max_position_embeddings
    f = cfg.ffn_hidden_size or 4 * h
    word = (vocab_size // tp * h, 2)
    norm = [(h, 1), (h, 1)]
    block = [*norm, (3 * h * h // tp, 2), (3 * h // tp, 1), (h * h // tp, 2), (h, 1)]
    block += [*norm, (f * h // tp, 2), (f // tp, 1), (h * f // tp, 2), (h, 1)]
    layers = [[word, (p * h, 2), (p * h, 2)], *[list(block) for _ in range(cfg.num_layers)]]
    layers.append(list(norm))
    if pp > 1:
        layers.append([word])
    return layers


def layer_parameters(cfg: ModelConfig, vocab_size: int, tp: int, pp: int) -> list[int]:
    """Per-layer parameter counts on one TP rank (sums of :func:`layer_tensors`)."""
    return [sum(n for n, _ in layer) for layer in layer_tensors(cfg, vocab_size, tp, pp)]


def zero2_gradient_elements(tensors: list[tuple[int, int]], dp: int) -> int:
    """Elements of ZeRO-2's ``grads_in_partition`` on the rank that holds the most.

    ``DeepSpeedZeroOptimizer`` flattens each AdamW group (``training.engine.param_groups``:
    matrices, then 1-D tensors) and cuts it into ``dp`` equal partitions, but the gradient
    buffer it allocates is sized by the *whole* parameters that overlap the partition
    (``params_in_partition``), so a rank whose partition touches a large tensor (the word
    embedding) holds all of its gradient.
    """
    worst = [0] * dp
    for group in ([n for n, d in tensors if d >= 2], [n for n, d in tensors if d < 2]):
        part = -(-sum(group) // dp)
        start = 0
        for n in group:
            for rank in range(dp):
                lo, hi = rank * part, (rank + 1) * part
                if start < hi and start + n > lo:
                    worst[rank] += n
            start += n
    return max(worst)


def pipeline_layer_names(num_layers: int) -> list[str]:
    """Layer class names in pipeline order (``training.pipeline.pipeline_layer_names``)."""
    return ["EmbeddingLayer", *["GLMBlock"] * num_layers, "FinalLayerNorm", "TiedHead"]


def stage_boundaries(cfg: RunConfig, layers: list[int]) -> list[int]:
    """Stage s runs layers ``[parts[s], parts[s + 1])``, as ``parallel.partition_method`` says:
    DeepSpeed's own partitioners (:func:`megatron_glm.compat.deepspeed.pipeline_stage_bounds`,
    which the dry run uses too), so the estimate's stages are the pipeline's."""
    pp = cfg.parallel.pp
    if pp == 1:
        return [0, len(layers)]
    p = cfg.parallel
    return list(_stage_bounds(tuple(layers), cfg.model.num_layers, p.partition_method, pp))


@functools.lru_cache(maxsize=512)
def _stage_bounds(
    layers: tuple[int, ...], num_layers: int, method: str, pp: int
) -> tuple[int, ...]:
    """Cached: the layout planner asks for the same split once per ZeRO stage, micro-batch and
    checkpointing choice, and DeepSpeed's balanced partition is an O(n^2 pp) loop in Python."""
    from megatron_glm.compat.deepspeed import pipeline_stage_bounds

    names = pipeline_layer_names(num_layers)
    return tuple(pipeline_stage_bounds(layers, names, method, pp))


# ----------------------------------------------------------------------------- one stage


@dataclass(frozen=True)
class _Stage:
    """The layers one pipeline stage holds (the whole model without a pipeline)."""

    index: int
    first: int
    last: int
    """Layers ``[first, last)`` of ``layer_parameters``."""
    params: int
    blocks: int
    embedding: bool
    """Holds the word embedding (the first stage)."""
    loss: bool
    """Computes the loss (the last stage; it also holds the tied head copy under a pipeline)."""
    tensors: tuple[tuple[int, int], ...]
    """``(elements, ndim)`` of the stage's parameter tensors (:func:`layer_tensors`)."""
    vocab: int
    """The padded vocabulary size (the loss's and the tied weights' rows, over tp)."""

    @property
    def largest(self) -> int:
        """Elements of the largest parameter tensor."""
        return max(n for n, _ in self.tensors)


def _stage(cfg: RunConfig, parts: list[int], index: int, vocab: int) -> _Stage:
    m = cfg.model
    layers = layer_tensors(m, vocab, cfg.parallel.tp, cfg.parallel.pp)
    first, last = parts[index], parts[index + 1]
    tensors = tuple(t for layer in layers[first:last] for t in layer)
    return _Stage(
        index=index,
        first=first,
        last=last,
        params=sum(n for n, _ in tensors),
        blocks=sum(1 for i in range(first, last) if 1 <= i <= m.num_layers),
        embedding=first == 0,
        loss=last > m.num_layers,
        tensors=tensors,
        vocab=vocab,
    )


# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class _States:
    params: int
    grads: int
    optimizer: int
    master: int
    comm: int
    grads_persistent: bool
    """Gradient storage alive between steps (ZeRO-3's partition buffer); else it exists from
    the step's first backward (``param.grad`` is set to None after each update)."""
    comm_phases: tuple[int, int, int, int]
    """Bucket bytes alive in (forward, backward, the gradient reduction after the last
    backward, the optimizer step). The forward's figure holds from the step's second
    micro-batch on, unless ``comm_static``."""
    comm_static: bool
    """Buckets allocated at start-up (ZeRO-3), alive in every forward."""
    optimizer_step_elements: int
    """Elements of the largest tensor the torch AdamW steps (its temporaries are that big)."""
    notes: tuple[tuple[str, str], ...]
    host_extra: int = 0
    """Host bytes ZeRO-Offload adds besides the optimizer states and master weights."""


def _model_states(cfg: RunConfig, stage: _Stage, dp: int) -> _States:
    """Weights, gradients, AdamW moments, master weights and buckets of one rank, by ZeRO stage.

    Measured on CPU (``tools/bench/bench_memory.py``) and read from DeepSpeed 0.19:

    * ZeRO-0 fp32: DeepSpeed's plain engine around our torch AdamW: weights, ``param.grad``
      (set to None after each update), ``exp_avg`` + ``exp_avg_sq``. With ``dp > 1`` the
      gradients are all-reduced through a flat copy of at most
      :data:`DS_ALLREDUCE_BUCKET_ELEMENTS` (``buffered_allreduce_fallback``).
    * ZeRO-0 bf16/fp16: DeepSpeed's 16-bit optimizer wrappers: 16-bit weights and gradients,
      fp32 master weights and fp32 gradients for the update (not measured on CPU).
    * ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the weights in one flat buffer (padded to a multiple
      of ``dp``), an fp32 partition of ``1/dp`` that is the optimizer's parameter (even in fp32),
      its moments, full ``param.grad`` (ZeRO-1) or the gradient partition
      (:func:`zero2_gradient_elements`, ZeRO-2), one reduction bucket of
      :data:`DS_REDUCE_BUCKET_ELEMENTS` allocated at the first backward (``setup_buckets``;
      ZeRO-2 releases it at the end of every backward, and under a pipeline ZeRO-1's
      ``reduce_gradients`` appends a second one for the reduction).
    * ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): a ``1/dp`` weight partition, the gathered
      weights (with the default ``max_live_parameters`` of 1e9 every gathered parameter of a
      model this size stays gathered through the step), the fp32 partition and its moments, a
      persistent fp32 ``1/dp`` gradient buffer and the reduction bucket, both allocated at
      start-up.
    """
    t = cfg.train
    if t.zero_stage == 0:
        return _zero0_states(cfg, stage, dp)
    psi, w = stage.params, _ELEMENT_BYTES[t.precision]
    part = -(-psi // dp)  # ceil: DeepSpeed pads the flat buffer to a multiple of dp
    bucket = DS_REDUCE_BUCKET_ELEMENTS * w
    if t.zero_stage == 3:
        gathered = min(psi, DS_STAGE3_MAX_LIVE_ELEMENTS)
        params, grads, persistent = w * (part + gathered), 4 * part, True
        phases = (bucket, bucket, bucket, bucket)
        notes = [
            ("params", f"1/{dp} partition + {gathered:,} gathered"),
            ("grads", f"fp32 1/{dp} partition buffer"),
        ]
    else:
        params, grads, phases, notes = _zero12_parts(cfg, stage, dp, bucket)
        persistent = False
    notes += [
        ("optimizer", f"AdamW exp_avg + exp_avg_sq, fp32 1/{dp}"),
        ("master", f"fp32 1/{dp} partition"),
        ("comm_buffers", f"ZeRO reduce bucket, {DS_REDUCE_BUCKET_ELEMENTS:,} elements"),
    ]
    host_extra = 0
    if t.cpu_offload and t.zero_stage in (1, 2):
        # stage_1_and_2 with offload: the fp32 gradient partition and a per-parameter
        # accumulation buffer in host memory, a largest-parameter staging buffer on each side
        host_extra = 4 * part + w * zero2_gradient_elements(list(stage.tensors), dp)
        host_extra += w * stage.largest
        phases = (*(c + w * stage.largest for c in phases),)  # type: ignore[assignment]
        notes[-1] = ("comm_buffers", notes[-1][1] + " + the offload staging buffer")
    return _States(
        params=params,
        grads=grads,
        optimizer=8 * part,
        master=4 * part,
        comm=max(phases),
        grads_persistent=persistent,
        comm_phases=phases,
        comm_static=persistent,
        optimizer_step_elements=part,
        notes=tuple(notes),
        host_extra=host_extra,
    )


def _zero0_states(cfg: RunConfig, stage: _Stage, dp: int) -> _States:
    """ZeRO-0: see :func:`_model_states`."""
    t = cfg.train
    psi, w = stage.params, _ELEMENT_BYTES[t.precision]
    mixed = t.precision != "fp32"
    flat = 4 * min(psi, DS_ALLREDUCE_BUCKET_ELEMENTS) if dp > 1 else 0
    return _States(
        params=w * psi,
        grads=w * psi + (4 * psi if mixed else 0),
        optimizer=8 * psi,
        master=4 * psi if mixed else 0,
        comm=flat,
        grads_persistent=False,
        comm_phases=(0, 0, flat, 0),
        comm_static=False,
        optimizer_step_elements=stage.largest,
        notes=(
            ("grads", f"param.grad, {psi:,} x {w} B"),
            ("comm_buffers", "flat all-reduce copy" if flat else ""),
        ),
    )


def _zero12_parts(
    cfg: RunConfig, stage: _Stage, dp: int, bucket: int
) -> tuple[int, int, tuple[int, int, int, int], list[tuple[str, str]]]:
    """ZeRO-1/2 weights, gradients and bucket phases: see :func:`_model_states`."""
    t = cfg.train
    psi, w, zero = stage.params, _ELEMENT_BYTES[t.precision], t.zero_stage
    overlap = zero2_gradient_elements(list(stage.tensors), dp)
    grads = w * psi if zero == 1 else w * overlap
    if t.precision != "fp32":
        grads += 4 * -(-psi // dp)  # the fp32 gradient partition handed to the optimizer
    phases = (bucket, bucket, bucket, bucket)
    if zero == 2:  # released after every backward (_release_ipg_buffers in its epilogue)
        phases = (0, bucket, 0, 0)
    elif cfg.parallel.pp > 1:  # reduce_gradients(pipeline_parallel=True) adds a second one
        phases = (bucket, bucket, 2 * bucket, bucket)
    note = "full param.grad" if zero == 1 else f"whole params overlapping the 1/{dp} part"
    return w * psi, grads, phases, [("grads", note)]


# ----------------------------------------------------------------------------- activations


def attention_kind(cfg: RunConfig, device: str) -> str:
    """Which attention implementation the block runs (``kernels.attention``).

    ``triton``: the fused kernel (CUDA, ``kernels`` auto/triton, no attention dropout) saves
    q, k, v, the output and the log-sum-exp. ``sdpa``: torch SDPA on CUDA with the boolean GLM
    mask (memory-efficient backend: also the float mask bias ``[b, 1, s, s]``). ``flash_cpu``:
    SDPA on CPU without dropout (saves like ``sdpa``). ``math``: SDPA on CPU with dropout, the
    unfused math path (saves the scaled q and k, v, softmax probabilities, the dropout mask and
    the dropped probabilities: three ``[b, heads/tp, s, s]`` tensors, all fp32 even for bf16
    inputs: measured).
    """
    dropout = cfg.model.attention_dropout > 0
    if device == "cuda":
        if cfg.model.kernels != "torch" and not dropout:
            return "triton"
        return "sdpa"
    return "math" if dropout else "flash_cpu"


def _tokens(cfg: RunConfig) -> tuple[int, int]:
    """``(T, r)``: tokens of a micro-batch, and of its sequence-parallel slice (T without SP)."""
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    return tokens, tokens // cfg.parallel.tp if cfg.parallel.sequence_parallel else tokens


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
    f, e = m.ffn_hidden_size or 4 * h, _ELEMENT_BYTES[cfg.train.precision]
    tokens, r = _tokens(cfg)
    heads = m.num_attention_heads // tp
    total = 2 * r * h * e + 4 * r * 4  # LayerNorm inputs + mean/rstd
    total += 2 * tokens * h * e  # LayerNorm outputs (matmul inputs)
    total += tokens * h // tp * e  # context, input of the attention dense
    total += 2 * tokens * f // tp * e  # h->f output, GeLU output
    kind = attention_kind(cfg, device)
    qkv = 3 * tokens * h // tp * e
    if kind == "math":  # computed in fp32 whatever the input dtype
        total += 3 * tokens * h // tp * 4 + 3 * b * heads * s * s * 4
    else:
        total += qkv + tokens * h // tp * e + b * heads * s * 4  # q, k, v, output, lse
        if kind != "triton":
            total += b * s * s * e  # the boolean mask as a float bias [b, 1, s, s]
    if m.hidden_dropout > 0 and not (device == "cuda" and m.kernels != "torch"):
        total += 2 * r * h * e
    return total


def block_backward_bytes(cfg: RunConfig) -> int:
    """A block's backward working set at its start, on top of its saved activations.

    Measured: the peak of a block's backward is its first matmul backward (the MLP's
    ``dense_4h_to_h``), which allocates the gradient of its input ``[T, f/tp]`` (activation
    dtype) and its weight gradient ``[h, f/tp]`` (model dtype) while everything the block saved
    is still alive.
    """
    m = cfg.model
    f, e = m.ffn_hidden_size or 4 * m.hidden_size, _ELEMENT_BYTES[cfg.train.precision]
    tokens = _tokens(cfg)[0]
    return tokens * f // cfg.parallel.tp * e + m.hidden_size * f // cfg.parallel.tp * e


def _checkpointed_block_bytes(cfg: RunConfig) -> int:
    """With ``model.activation_checkpointing`` a block keeps only its input ``[b, r, h]``."""
    return _tokens(cfg)[1] * cfg.model.hidden_size * _ELEMENT_BYTES[cfg.train.precision]


def embedding_activation_bytes(cfg: RunConfig) -> int:
    """``EmbeddingLayer``: ``nn.Dropout``'s bool mask ``[b, r, h]`` (1 byte) when it drops."""
    return _tokens(cfg)[1] * cfg.model.hidden_size if cfg.model.hidden_dropout > 0 else 0


def final_layernorm_bytes(cfg: RunConfig) -> int:
    """``FinalLayerNorm``: its saved input and statistics, and its output ``[b, s, h]`` (the
    model's hidden states, gathered to the full sequence under SP), alive through the loss."""
    tokens, r = _tokens(cfg)
    e, h = _ELEMENT_BYTES[cfg.train.precision], cfg.model.hidden_size
    return r * h * e + 2 * r * 4 + tokens * h * e


@dataclass(frozen=True)
class _Loss:
    """The loss's memory (``kernels.cross_entropy``), every position a loss position (a bound).

    The fused cross entropy computes both gradients in forward and saves ``grad_hidden [n, h]``
    and ``grad_weight [vocab/tp, h]`` (``saved``). At its peak (``working``) the selected rows
    ``[n, h]``, ``grad_hidden`` and one chunk of logits ``[c, vocab/tp]`` in the input dtype with
    two fp32 temporaries of its size (``x - max`` and its ``exp``; a third, the fp32 copy, for
    16-bit logits) are alive, and
    ``grad_weight`` too once a second chunk starts (``c`` keeps a chunk's logits under
    :data:`LOSS_CHUNK_BYTES`).
    """

    working: int
    saved: int


def _loss(cfg: RunConfig, vocab_size: int) -> _Loss:
    tokens, _ = _tokens(cfg)
    e, h = _ELEMENT_BYTES[cfg.train.precision], cfg.model.hidden_size
    v = vocab_size // cfg.parallel.tp
    rows = min(tokens, max(16, LOSS_CHUNK_BYTES // (v * e)))
    weight = v * h * e
    temporaries = 8 if e == 4 else 12  # fp32 ``x - max`` and its exp (+ the ``.float()`` copy)
    working = 2 * tokens * h * e + rows * v * (e + temporaries) + (weight if tokens > rows else 0)
    return _Loss(working=working, saved=tokens * h * e + weight)


def in_flight(cfg: RunConfig, stage: int, accum: int) -> int:
    """Micro-batches whose activations a stage holds at once.

    One without a pipeline (``DataParallelRunner``: forward and backward per micro-batch);
    DeepSpeed's 1F1B ``TrainSchedule`` runs ``min(pp - stage, micro-batches)`` forwards ahead
    of their backwards on ``stage`` (its ``num_pipe_buffers`` before the floor of 2 buffers).
    """
    return min(cfg.parallel.pp - stage, accum) if cfg.parallel.pp > 1 else 1


def saved_activation_bytes(cfg: RunConfig, stage: _Stage, device: str) -> int:
    """What one micro-batch's forward leaves saved on ``stage`` (blocks, embedding, final LN),
    plus, on a stage that sends, its output ``[b, r, h]`` that the pipeline buffer keeps."""
    per_block = block_activation_bytes(cfg, device)
    if cfg.model.activation_checkpointing:
        per_block = _checkpointed_block_bytes(cfg)
    total = stage.blocks * per_block
    if stage.embedding:
        total += embedding_activation_bytes(cfg)
    if stage.loss:
        total += final_layernorm_bytes(cfg)
    else:
        total += _checkpointed_block_bytes(cfg)
    return total


# ----------------------------------------------------------------------------- peak phases


@dataclass(frozen=True)
class _Phases:
    """Bytes above the persistent states at each phase of a step, and what they include."""

    forward: int
    """Saved activations of the micro-batches in flight, plus the loss's working set."""
    backward: int
    """The largest backward working set (recomputation, the tied-gradient sum)."""
    step: int
    """After the last backward and its reduction: the gradient norm, the optimizer step's
    temporaries."""


def _phases(cfg: RunConfig, stage: _Stage, states: _States, accum: int, device: str) -> _Phases:
    """The candidate peaks of ``stage``, each on top of the states alive then.

    Gradients and the ZeRO-1/2 bucket exist from the step's first backward on, so they are
    alive in the forward of every micro-batch but the first (``accum > 1``). Sources: the
    torch kernels' saved tensors (:func:`block_activation_bytes`), the fused loss (:class:`_Loss`),
    autograd summing the tied head's and the lookup's gradients out of place
    (``2 x [vocab/tp, h]`` next to ``param.grad`` when one rank holds both, no pipeline; under
    ZeRO-2 the head's gradient is a third copy, outside the gradient partition), the manual
    gradient norm of ZeRO-0 fp32 (``parallel.layers.grad_norm``: a float64 copy of a gradient
    and its square, ``16`` bytes per element of the largest), torch AdamW's single-tensor step
    on CPU or under offload (``sqrt`` and the divided ``denom``: two fp32 temporaries of the
    largest stepped tensor; CUDA's fused AdamW has none). ZeRO-0's flat all-reduce copy and
    ZeRO's buckets are :attr:`_States.comm_phases`.
    """
    m, t = cfg.model, cfg.train
    w = _ELEMENT_BYTES[t.precision]
    vocab_rows = stage.vocab // cfg.parallel.tp
    flight = in_flight(cfg, stage.index, accum)
    saved = flight * saved_activation_bytes(cfg, stage, device)
    forward = backward = saved
    if stage.blocks:  # the last block's backward starts (after recomputing it, if checkpointed)
        recompute = block_activation_bytes(cfg, device) if m.activation_checkpointing else 0
        backward = saved + recompute + block_backward_bytes(cfg)
    if stage.loss:
        loss = _loss(cfg, stage.vocab)
        forward += loss.working
        backward = max(backward, saved + loss.saved + vocab_rows * m.hidden_size * w)
    if stage.embedding and cfg.parallel.pp == 1:
        copies = 3 if t.zero_stage == 2 else 2
        backward = max(backward, copies * vocab_rows * m.hidden_size * w)
    step = 0
    if t.zero_stage == 0 and t.precision == "fp32":
        step = max(step, 16 * stage.largest)
    if device == "cpu" or t.cpu_offload:
        step = max(step, 8 * states.optimizer_step_elements)
    return _Phases(forward=forward, backward=backward, step=step)


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


def _stage_estimate(cfg: RunConfig, stage: _Stage, dp: int, device: str) -> MemoryEstimate:
    """The peak of one stage: the largest of its phases (:class:`_Phases`, the reduction)."""
    t = cfg.train
    b, s = t.micro_batch_size, cfg.data.seq_length
    accum = t.global_batch_size // (b * dp)
    st = _model_states(cfg, stage, dp)
    ph = _phases(cfg, stage, st, accum, device)
    offload = t.cpu_offload
    base = st.params + (0 if offload else st.optimizer + st.master)
    base += accum * b * s * INPUT_BYTES_PER_TOKEN  # the step's batches, held throughout
    grads_fwd = st.grads if st.grads_persistent or accum > 1 else 0
    comm_fwd, comm_bwd, comm_reduce, comm_step = st.comm_phases
    if not (st.comm_static or accum > 1):
        comm_fwd = 0
    totals = {
        "forward": base + grads_fwd + comm_fwd + ph.forward,
        "backward": base + st.grads + comm_bwd + ph.backward,
        "gradient reduction": base + st.grads + comm_reduce,
        "gradient norm and optimizer step": base + st.grads + comm_step + ph.step,
    }
    phase = max(totals, key=lambda k: totals[k])
    states = base - accum * b * s * INPUT_BYTES_PER_TOKEN + st.grads + st.comm
    notes = (*st.notes, ("activations", f"peak phase: {phase}"))
    return MemoryEstimate(
        params=st.params,
        grads=st.grads,
        optimizer=0 if offload else st.optimizer,
        master=0 if offload else st.master,
        activations=totals[phase] - states,
        comm_buffers=st.comm,
        host=st.optimizer + st.master + st.host_extra if offload else 0,
        stage=stage.index,
        notes=notes,
    )


def estimate_memory(
    cfg: RunConfig, world_size: int, *, vocab_size: int | None = None, device: str = "cuda"
) -> MemoryEstimate:
    """Peak bytes per rank of ``cfg`` trained on ``world_size`` ranks (the worst rank).

    ``vocab_size`` is the tokenizer's padded vocabulary when ``model.vocab_size`` is 0.
    ``device`` (``cuda`` or ``cpu``) picks the kernels whose saved tensors are counted
    (:func:`attention_kind`) and the optimizer's temporaries; GPUs are what the estimate is
    for, CPU is where it is tested.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"estimate_memory: device must be 'cuda' or 'cpu', got {device!r}")
    dp = _layout(cfg, world_size)
    vocab = resolve_vocab_size(cfg.model, vocab_size)
    layers = layer_parameters(cfg.model, vocab, cfg.parallel.tp, cfg.parallel.pp)
    parts = stage_boundaries(cfg, layers)
    stages = [_stage(cfg, parts, i, vocab) for i in range(cfg.parallel.pp)]
    estimates = [_stage_estimate(cfg, st, dp, device) for st in stages]
    return max(estimates, key=lambda est: est.total)
