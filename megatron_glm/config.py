"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

A run is described by one :class:`RunConfig` made of per-component sections (model, data,
objective, parallel, optimizer, train, checkpoint, logging). Each section is a ``kw_only``
dataclass whose fields carry their meaning in an attribute docstring (the string after the field,
which ``glm-pretrain --help`` prints: ``config_docs``) and whose ``__post_init__`` rejects bad
values with a :class:`ConfigError` naming the field and the rule. Every rule that needs only the
config lives here; the pre-launch checks (``training.preflight``) add what needs the world size,
the machine or the files, and library code only asserts what this module guarantees.

YAML files are loaded with ``yaml.safe_load``. A section given as a string (``model: glm-tiny``)
names a file: it is looked up next to the run file, then in ``configs/<section>/`` of every parent
directory, so run recipes reuse ``configs/model/*.yaml``. Overrides ``key.sub=value`` are applied
to the raw mapping before validation (the value parsed as YAML), and an unknown key anywhere is an
error naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Precision = Literal["fp32", "bf16", "fp16"]
KernelChoice = Literal["auto", "triton", "torch"]
GeLUForm = Literal["tanh", "erf"]
DecayStyle = Literal["cosine", "linear", "constant"]


class ConfigError(ValueError):
    """A config value breaks a rule: ``config field 'train.zero_stage': <the rule>``.

    The one error type for a bad field, wherever the rule lives (a section's ``__post_init__``,
    the pre-launch checks, a library function handed a config value), so every such message has
    the same shape and a caller can read ``field`` instead of parsing the text. A ``ValueError``,
    so ``except ValueError`` (``pretrain.main``) catches it with every other input error.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config field '{field}': {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        return ConfigError, (self.field, self.message)  # survives pickling (DataLoader workers)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``field`` under a section: ``model.`` + ``hidden_size``."""
        return ConfigError(prefix + self.field, self.message)


def _require(cond: bool, name: str, rule: str) -> None:
    """Raise the uniform config error: which field, which rule."""
    if not cond:
        raise ConfigError(name, rule)


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a GLM (docs/design.md, "Model sizes")."""

    name: str = "glm"
    """Human-readable name, e.g. ``glm-large``; used in logs only."""
    num_layers: int = 2
    """Number of transformer blocks (a multiple of parallel.pp)."""
    hidden_size: int = 64
    """Width h of the residual stream (features per token)."""
    num_attention_heads: int = 2
    """Attention heads; must divide hidden_size (head size = hidden_size / heads) and be
    divisible by parallel.tp."""
    ffn_hidden_size: int | None = None
    """MLP inner width (features); null (None) means 4 * hidden_size. Divisible by parallel.tp."""
    vocab_size: int = 0
    """Padded vocabulary size (embedding rows); 0 means take it from the tokenizer at start-up.
    Otherwise it must equal the tokenizer's padded size and be divisible by parallel.tp."""
    max_position_embeddings: int = 512
    """Rows of the position and block-position tables: the longest row (tokens) the model
    accepts; at least data.seq_length."""
    hidden_dropout: float = 0.1
    """Dropout probability on the embedding output and on each residual branch, in [0, 1)."""
    attention_dropout: float = 0.1
    """Dropout probability on the attention probabilities, in [0, 1)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon added to the variance in every LayerNorm (a floor against division by zero)."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    gelu: GeLUForm = "tanh"
    """The MLP's GeLU: tanh (the tanh approximation, Megatron's and GLM's training form) or erf
    (the exact form THUDM's published Hugging Face models compute; from-hf sets it)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    kernels: KernelChoice = "auto"
    """Fused-op implementation: auto (Triton on CUDA, torch elsewhere), triton or torch."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded up to a multiple of this times parallel.tp
    (Megatron's rule: aligned matmul shapes, equal shards)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"must be divisible by num_attention_heads ({self.num_attention_heads})",
        )
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _require(self.ffn_hidden_size > 0, "ffn_hidden_size", "must be > 0")
        _require(self.vocab_size >= 0, "vocab_size", "must be >= 0 (0 = from tokenizer)")
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _require(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        _require(self.init_method_std > 0, "init_method_std", "must be > 0")
        _require(self.make_vocab_size_divisible_by > 0, "make_vocab_size_divisible_by", "> 0")
        _require(
            self.kernels in ("auto", "triton", "torch"), "kernels", "one of auto, triton, torch"
        )
        _require(self.gelu in ("tanh", "erf"), "gelu", "one of tanh, erf")


_SPLIT_HINT = (
    "expected 1-3 non-negative numbers separated by ',' or '/' with a positive sum, e.g. 969,30,1"
)


def _split_problem(text: str) -> str | None:
    """Why ``text`` is not a split string (the rule part of the config error), or None."""
    parts = [p.strip() for p in text.split("," if "," in text else "/")]
    if len(parts) > 3:
        return f"{text!r}: {len(parts)} weights, {_SPLIT_HINT}"
    for p in parts:
        try:
            x = float(p)
        except ValueError:
            return f"{text!r}: {p!r} is not a number; {_SPLIT_HINT}"
        if not (math.isfinite(x) and x >= 0):
            return f"{text!r}: weight {p!r} is not finite and >= 0; {_SPLIT_HINT}"
    if sum(float(p) for p in parts) <= 0:
        return f"{text!r}: weights sum to 0; {_SPLIT_HINT}"
    return None


def parse_split(text: str) -> tuple[float, float, float]:
    """Train, valid and test weights of ``data.split``, e.g. ``"969,30,1"`` or ``"98/2"``.

    Megatron-LM's ``--split``: its reader takes ``,`` or ``/`` between the numbers, and
    Megatron-core pads fewer than three with zeros and rejects more; the weights need not sum
    to 1 (they are normalised where used). Here every weight must be finite and >= 0, with a
    positive sum. Raises :class:`ConfigError` naming the field ``data.split``.
    """
    problem = _split_problem(text)
    if problem is not None:
        raise ConfigError("data.split", problem)
    weights = [float(p) for p in text.split("," if "," in text else "/")]
    weights += [0.0] * (3 - len(weights))
    return weights[0], weights[1], weights[2]


@dataclass(kw_only=True)
class DataConfig:
    """Where the training tokens come from and how they are split and packed."""

    data_path: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes (without .bin/.idx), e.g. ``data/corpus_text_sentence``."""
    data_weights: list[float] | None = None
    """Blending weights, one positive number per data_path prefix (normalised to sum to 1);
    null (None) means proportional to each corpus's tokens."""
    tokenizer_model: str = ""
    """Path to the SentencePiece ``.model`` with GLM's special tokens, or to a Hugging Face
    tokenizer folder (``tokenizer.json``; GLM's special tokens are added if absent)."""
    split: str = "969,30,1"
    """Train/valid/test weights over documents, ``,`` or ``/`` separated (see parse_split)."""
    seq_length: int = 512
    """Static row length S in tokens of every micro-batch (part A + part B + padding)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 builds batches in the training process."""
    cache_dir: str | None = None
    """Directory for the index caches (document shuffles, sample maps); null (None) means next
    to the data."""

    def __post_init__(self) -> None:
        _require(self.seq_length > 1, "seq_length", "must be > 1")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")
        problem = _split_problem(self.split)
        _require(problem is None, "split", problem or "")
        if self.data_weights is not None:
            _require(
                len(self.data_weights) == len(self.data_path),
                "data_weights",
                f"needs one weight per data_path entry ({len(self.data_path)})",
            )
            _require(all(w > 0 for w in self.data_weights), "data_weights", "must be > 0")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """GLM's blank-infilling objective mix (docs/design.md, "Blank infilling"; the paper's
    section 2)."""

    span_prob: float = 0.5
    """Probability that a row uses the span (token-level [MASK]) task."""
    sentence_prob: float = 0.25
    """Probability that a row uses the sentence ([sMASK]) task."""
    document_prob: float = 0.25
    """Probability that a row uses the document ([gMASK]) task."""
    single_span_prob: float = 0.0
    """Within the span task, probability of masking one single span instead of many."""
    mask_ratio: float = 0.15
    """Fraction of tokens the span task masks."""
    poisson_lambda: float = 3.0
    """Mean span length in tokens (lambda of the Poisson span-length distribution)."""
    max_span_length: int = 40
    """Longest span in tokens: span lengths are truncated to 1..max_span_length."""
    sentence_ratio: float = 0.15
    """Fraction of tokens the sentence task masks (whole sentences)."""
    document_min_ratio: float = 0.5
    """Smallest fraction of the window the document task generates."""
    document_max_ratio: float = 1.0
    """Largest fraction of the window the document task generates."""

    def __post_init__(self) -> None:
        probs = ("span_prob", "sentence_prob", "document_prob", "single_span_prob")
        for name in probs:
            _require(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        total = self.span_prob + self.sentence_prob + self.document_prob
        _require(
            abs(total - 1.0) < 1e-6, "span_prob", f"span+sentence+document must be 1 ({total})"
        )
        _require(0.0 < self.mask_ratio < 0.5, "mask_ratio", "must be in (0, 0.5)")
        _require(self.poisson_lambda > 0, "poisson_lambda", "must be > 0")
        _require(self.max_span_length >= 1, "max_span_length", "must be >= 1")
        _require(0.0 < self.sentence_ratio < 1.0, "sentence_ratio", "must be in (0, 1)")
        _require(
            0.0 < self.document_min_ratio <= self.document_max_ratio <= 1.0,
            "document_min_ratio",
            "need 0 < document_min_ratio <= document_max_ratio <= 1",
        )


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout; data parallelism takes the rest of the world size."""

    tp: int = 1
    """Tensor-parallel size: ranks that split each layer's weights (Megatron's column/row split)."""
    pp: int = 1
    """Pipeline-parallel size: stages the layers are split across (DeepSpeed's pipeline engine)."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout regions along the sequence across TP ranks (needs tp > 1, and
    data.seq_length divisible by tp): saves activation memory."""
    partition_method: str = "parameters"
    """How PipelineModule assigns layers to stages: parameters | uniform | type:REGEX."""

    def __post_init__(self) -> None:
        _require(self.tp >= 1, "tp", "must be >= 1")
        _require(self.pp >= 1, "pp", "must be >= 1")
        _require(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs tp > 1")
        method = self.partition_method
        _require(
            method in ("parameters", "uniform") or method.startswith("type:"),
            "partition_method",
            "one of parameters, uniform, type:REGEX",
        )


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW and the LR schedule (GLM's AnnealingLR: linear warmup, then decay)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    warmup_ratio: float = 0.01
    """Warmup length as a fraction of train_iters (used when warmup_iters is None)."""
    warmup_iters: int | None = None
    """Warmup length in optimizer steps; overrides warmup_ratio."""
    decay_style: DecayStyle = "cosine"
    """Shape of the decay from lr to min_lr_ratio * lr after warmup: cosine, linear, or constant
    (no decay)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and LayerNorm weights)."""
    adam_beta1: float = 0.9
    """Adam's decay rate of the first-moment (running mean of gradients) estimate, in [0, 1)."""
    adam_beta2: float = 0.95
    """Adam's decay rate of the second-moment (running mean of squared gradients) estimate."""
    adam_eps: float = 1e-8
    """Adam's epsilon, added to the root of the second moment (a floor against division by 0)."""
    clip_grad: float = 1.0
    """Global gradient-norm (L2 over all parameters) clipping threshold; 0 disables."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", "must be > 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        if self.warmup_iters is not None:
            _require(self.warmup_iters >= 0, "warmup_iters", "must be >= 0")
        _require(
            self.decay_style in ("cosine", "linear", "constant"),
            "decay_style",
            "one of cosine, linear, constant",
        )
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _require(self.adam_eps > 0, "adam_eps", "must be > 0")
        _require(self.clip_grad >= 0, "clip_grad", "must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """Batch sizes, length of the run, precision and ZeRO."""

    micro_batch_size: int = 4
    """Rows per micro-batch per data-parallel rank."""
    global_batch_size: int = 4
    """Rows per optimizer step over all data-parallel ranks (a multiple of micro * dp)."""
    train_iters: int = 100
    """Optimizer steps of the run (also the length of the LR schedule)."""
    seed: int = 1234
    """Seed of everything: init, data order, masking, dropout; in [0, 2**64)."""
    precision: Precision = "fp32"
    """Training precision: fp32; bf16 (bf16 weights, forward and backward; fp32 master weights
    and Adam state in the ZeRO optimizer); or fp16 with dynamic loss scaling (needs a GPU, or a
    CPU with native fp16)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 none, 1 shards the optimizer state over data-parallel ranks, 2 also
    the gradients, 3 also the parameters (2 and 3 not with parallel.pp > 1)."""
    cpu_offload: bool = False
    """ZeRO-Offload: fp32 master weights, gradients and Adam state of each ZeRO partition live in
    CPU memory and DeepSpeed's C++ CPU Adam updates them (compiled at first use, cached under the
    Python environment). Needs zero_stage >= 1."""
    eval_interval: int = 0
    """Validate every this many optimizer steps; 0 disables."""
    eval_iters: int = 10
    """Global batches per validation (Megatron's meaning: the same rows at any data-parallel
    size, so validation figures compare across layouts)."""
    exit_duration_mins: float = 0.0
    """Save a checkpoint and exit 0 once the run has lasted this long (minutes); 0 disables."""
    exit_interval: int = 0
    """Save a checkpoint and exit 0 after a step divisible by this (planned stops); 0 disables."""
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive steps with a non-finite loss (their updates are skipped)."""
    initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale doubles."""
    hysteresis: int = 2
    """fp16 only: overflows tolerated before the loss scale halves."""
    min_loss_scale: float = 1.0
    """fp16 only: the dynamic loss scale never drops below this."""
    distributed_timeout_minutes: float = 30.0
    """A collective (of every process group) fails after waiting this long, and a rank whose
    training makes no progress for this long ends itself (``training.watchdog``): the bound on
    how long a frozen or lost rank can hang the job (Megatron's --distributed-timeout-minutes)."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(0 <= self.seed < 2**64, "seed", "must be in [0, 2**64)")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "global_batch_size",
            f"must be a multiple of micro_batch_size ({self.micro_batch_size})",
        )
        _require(self.precision in ("fp32", "bf16", "fp16"), "precision", "fp32, bf16 or fp16")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _require(not self.cpu_offload or self.zero_stage >= 1, "cpu_offload", "needs zero >= 1")
        _require(self.eval_interval >= 0, "eval_interval", "must be >= 0")
        _require(self.eval_iters > 0, "eval_iters", "must be > 0")
        _require(self.exit_duration_mins >= 0, "exit_duration_mins", "must be >= 0 (0 disables)")
        _require(self.exit_interval >= 0, "exit_interval", "must be >= 0 (0 disables)")
        _require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        _require(0 <= self.initial_scale_power <= 63, "initial_scale_power", "must be in [0, 63]")
        _require(self.loss_scale_window >= 1, "loss_scale_window", "must be >= 1")
        _require(self.hysteresis >= 1, "hysteresis", "must be >= 1")
        _require(self.min_loss_scale > 0, "min_loss_scale", "must be > 0")
        _require(self.distributed_timeout_minutes > 0, "distributed_timeout_minutes", "must be > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where checkpoints go and when."""

    save: str | None = None
    """Directory to save checkpoints in; null (None) disables saving."""
    load: str | None = None
    """Directory to resume from; null (None) means auto-resume from ``save`` if it has a
    ``latest`` file."""
    save_interval: int = 0
    """Save every this many optimizer steps (and at the end); 0 saves only at the end."""
    allow_missing_rng: bool = False
    """Resume even if some rank has no RNG file in the checkpoint (another world size wrote it):
    those ranks warn and start fresh dropout streams, so the resume is not exact. Off, such a
    resume is refused before launch."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, "save_interval", "must be >= 0")


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, TensorBoard and progress output."""

    log_interval: int = 10
    """Print a log line every this many optimizer steps."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; null (None) disables."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""

    def __post_init__(self) -> None:
        _require(self.log_interval > 0, "log_interval", "must be > 0")


FinetuneTask = Literal["cloze", "seq2seq"]
CandidateScore = Literal["sum", "mean"]


@dataclass(kw_only=True)
class FinetuneConfig:
    """Finetuning (``glm-finetune``): the task, its files, patterns and verbalizers. Ignored by
    pretraining."""

    task: FinetuneTask = "cloze"
    """``cloze``: classification as a cloze question (a pattern with one [MASK], a verbalizer
    word per label); ``seq2seq``: source -> target by blank infilling."""
    task_dir: str = ""
    """Folder with train.jsonl, validation.jsonl and test.jsonl (cloze rows ``{"text", "label",
    optional "text_b"}``, seq2seq rows ``{"source", "target"}``)."""
    patterns: list[str] = field(default_factory=lambda: ["{text} [MASK]"])
    """Cloze patterns (PET): each holds ``{text}`` (optionally ``{text_b}``) and exactly one
    [MASK]. A run trains with one of them (``pattern_id``), as PET trains one model per
    pattern."""
    pattern_id: int = 0
    """Index into ``patterns`` of the pattern this run uses."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Cloze: label -> the word or phrase that fills [MASK]. All single-token: cross entropy over
    those tokens' logits at [MASK]; otherwise each is scored by its tokens' log-probabilities
    generated in part B."""
    score: CandidateScore = "sum"
    """Multi-token verbalizers: a candidate's score is the ``sum`` of its tokens'
    log-probabilities or their ``mean`` (length-normalised)."""
    label_smoothing: float = 0.0
    """Seq2seq: label smoothing of the target tokens' cross entropy (0 = none)."""
    mask: Literal["[gMASK]", "[MASK]"] = "[gMASK]"
    """Seq2seq: the mask token appended to the source."""
    max_target_length: int = 64
    """Seq2seq: target tokens kept (longer targets are cut; the source is cut to fit the rest
    of data.seq_length)."""
    metric: (
        Literal["accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "exact_match", "loss"] | None
    ) = None
    """Validation metric that picks the best checkpoint (``<checkpoint.save>/best``):
    ``accuracy`` or ``macro_f1`` (cloze), ``rouge1``, ``rouge2``, ``rougeL`` or ``exact_match``
    (seq2seq: greedy decodes of the validation split at every validation), all higher is
    better, or ``loss`` (lower is better); null: accuracy for cloze, loss for seq2seq."""
    init: str | None = None
    """Checkpoint folder (a pretraining run's checkpoint.save, or an HF import) whose weights
    start the run at iteration 0 with a fresh optimizer; ignored when the run resumes its own
    checkpoint.save."""

    def __post_init__(self) -> None:
        _require(bool(self.patterns), "patterns", "must hold at least one pattern")
        _require(
            0 <= self.pattern_id < len(self.patterns),
            "pattern_id",
            f"{self.pattern_id} is not an index into patterns ({len(self.patterns)} given)",
        )
        for i, pattern in enumerate(self.patterns):
            _require(
                pattern.count("[MASK]") == 1 and "{text}" in pattern,
                f"patterns[{i}]",
                f"{pattern!r} must hold {{text}} and exactly one [MASK]",
            )
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        _require(self.max_target_length > 0, "max_target_length", "must be > 0")
        cloze = ("accuracy", "macro_f1")
        _require(
            (self.metric in cloze) == (self.task == "cloze") or self.metric in (None, "loss"),
            "metric",
            f"{self.metric!r} is not a {self.task} metric (cloze: accuracy, macro_f1; seq2seq: "
            "rouge1, rouge2, rougeL, exact_match; both: loss)",
        )

    @property
    def best_metric(self) -> str:
        """``metric`` resolved: accuracy for cloze, loss for seq2seq when not given."""
        if self.metric is not None:
            return self.metric
        return "accuracy" if self.task == "cloze" else "loss"


@dataclass(kw_only=True)
class RunConfig:
    """One training run: every section, validated together."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture: sizes, dropout, initialisation, fused kernels."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora and their blend, tokenizer, train/valid/test split, sequence length."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Blank-infilling objectives: the span/sentence/document mix and span statistics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor and pipeline parallel sizes; data parallelism takes the rest of the world size."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, run length, seed, precision, ZeRO, loss scaling, evaluation, stops."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where checkpoints are saved and resumed from, and how often."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console log lines, TensorBoard and the progress bar."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Finetuning task, patterns and verbalizers (``glm-finetune``; pretraining ignores it)."""

    def __post_init__(self) -> None:
        """Rules across sections; each needs only the config (the world size is the launch's)."""
        _require(
            self.model.max_position_embeddings >= self.data.seq_length,
            "model.max_position_embeddings",
            f"must be >= data.seq_length ({self.data.seq_length})",
        )
        self._check_tensor_parallel()
        self._check_pipeline()
        _require(
            self.train.eval_interval == 0 or parse_split(self.data.split)[1] > 0,
            "data.split",
            f"'{self.data.split}' gives the validation split no documents but "
            f"train.eval_interval={self.train.eval_interval}; use e.g. 969,30,1 "
            "or set train.eval_interval=0",
        )

    def _check_tensor_parallel(self) -> None:
        """Every tensor that tensor parallelism splits must split evenly over ``parallel.tp``."""
        m, tp = self.model, self.parallel.tp
        _require(
            m.num_attention_heads % tp == 0,
            "model.num_attention_heads",
            f"must be divisible by parallel.tp ({tp})",
        )
        assert m.ffn_hidden_size is not None  # ModelConfig resolved None to 4 * hidden_size
        _require(
            m.ffn_hidden_size % tp == 0,
            "model.ffn_hidden_size",
            f"{m.ffn_hidden_size} must be divisible by parallel.tp ({tp})",
        )
        _require(
            m.vocab_size % tp == 0,
            "model.vocab_size",
            f"{m.vocab_size} must be divisible by parallel.tp ({tp}); use 0 to take the "
            "tokenizer's (padded to make_vocab_size_divisible_by x tp)",
        )
        _require(
            not self.parallel.sequence_parallel or self.data.seq_length % tp == 0,
            "data.seq_length",
            f"{self.data.seq_length} must be divisible by parallel.tp ({tp}) with "
            "parallel.sequence_parallel",
        )

    def _check_pipeline(self) -> None:
        """Layers split evenly over the stages, and no ZeRO stage the pipeline engine refuses."""
        pp, zero = self.parallel.pp, self.train.zero_stage
        _require(
            self.model.num_layers % pp == 0 or pp == 1,
            "model.num_layers",
            f"must be divisible by parallel.pp ({pp})",
        )
        _require(
            pp == 1 or zero <= 1,
            "train.zero_stage",
            f"ZeRO-{zero} cannot be combined with parallel.pp={pp}: DeepSpeed's pipeline engine "
            "accumulates each stage's gradients over the micro-batches of a step, which ZeRO-2 "
            "(sharded gradients) and ZeRO-3 (sharded parameters) do not allow, and DeepSpeed "
            "refuses it; use train.zero_stage=1 (sharded optimizer state) with pipeline "
            "parallelism, or parallel.pp=1 with ZeRO-2/3",
        )


# ----------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML scalar/list against a field type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(key, f"bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"{value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {
            _coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()
        }
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        return _finite_float(value, key)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, bool):
        raise ConfigError(
            key, f"expected str, got {value!r} (quote it: YAML reads yes/no/on/off as booleans)"
        )
    raise ConfigError(key, f"expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _finite_float(value: Any, key: str) -> float:
    """A finite float from a YAML number or float literal (YAML 1.1 reads ``3e-4`` as a string).

    ``.inf``, ``1e999`` and ``.nan`` are refused: no float field means anything when infinite,
    and an infinite learning rate turns the weights into NaN at the first update.
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise ConfigError(key, f"expected float, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    return number


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys name the closest valid key."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"config section '{prefix.rstrip('.') or cls.__name__}': expected a mapping"
        )
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{full}'{hint}")
        tp = types_[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section names its fields relative to itself
        raise exc.under(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logs, checkpoints and YAML dumps)."""
    return dataclasses.asdict(cfg)


def _find_section_file(name: str, section: str, base: Path) -> Path:
    """Resolve ``model: glm-tiny`` to a YAML file next to the run file or in configs/<section>/."""
    candidates = [base / name, base / f"{name}.yaml"]
    for parent in [base, *base.parents]:
        candidates += [
            parent / section / f"{name}.yaml",
            parent / "configs" / section / f"{name}.yaml",
        ]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise ValueError(f"config section '{section}': no file for '{name}' (looked in {base})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping, resolving sections given as file names."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    for section, value in list(raw.items()):
        if isinstance(value, str) and section in {f.name for f in dataclasses.fields(RunConfig)}:
            sub = _find_section_file(value, section, path.parent)
            try:
                raw[section] = yaml.safe_load(sub.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{sub}: invalid YAML: {exc}") from None
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested mapping in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}': expected key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            raise ValueError(f"override '{item}': value is not valid YAML: {exc}") from None
    return raw


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, cls: type = RunConfig
) -> Any:
    """Load a run config: YAML file (optional), then overrides, then validation."""
    raw = load_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides or [])
    return from_dict(cls, raw)
