"""Analytic parameter and FLOP counts of a GLM config (no model is built).

``num_parameters`` counts every trainable tensor once (the tied head is the word embedding, so it
adds nothing). ``matmul_parameters`` (N_matmul) counts the weights that take part in a matrix
multiplication per token: per block QKV ``3h^2``, attention output ``h^2``, MLP ``2 h f``, plus
the tied head ``V h`` (used as a matmul once, in the output projection; the embedding *lookup* is a
gather and costs no FLOPs). Biases, LayerNorms and the position tables are excluded: they are
elementwise or lookups. Then (docs/design.md, "Metrics")::

    flops_per_token = 6 * N_matmul + 12 * L * h * S

6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The attention term is QK^T and AV:
2 matmuls x 2 FLOPs x S x h per token per layer forward, x3 for backward, over the full S x S
score matrix (no credit is taken for masked blocks). These are *model* FLOPs: recomputation by
activation checkpointing is not counted, as is conventional for MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_glm.config import ModelConfig
from megatron_glm.model.glm import resolve_vocab_size


def _ffn(cfg: ModelConfig) -> int:
    assert cfg.ffn_hidden_size is not None  # filled by ModelConfig.__post_init__
    return cfg.ffn_hidden_size


def num_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Total trainable parameters of ``build_model(cfg, vocab_size=...)``."""
    v = resolve_vocab_size(cfg, vocab_size)
    h, f, L = cfg.hidden_size, _ffn(cfg), cfg.num_layers
    embeddings = v * h + 2 * cfg.max_position_embeddings * h  # word + position + block position
    attention = (3 * h * h + 3 * h) + (h * h + h)  # QKV + dense, with biases
    mlp = (h * f + f) + (f * h + h)
    layernorms = 2 * (2 * h)
    return embeddings + L * (attention + mlp + layernorms) + 2 * h  # + final LayerNorm


def matmul_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """N_matmul: QKV, attention dense and MLP weights of every block, plus the tied head once."""
    v = resolve_vocab_size(cfg, vocab_size)
    h, f, L = cfg.hidden_size, _ffn(cfg), cfg.num_layers
    return L * (4 * h * h + 2 * h * f) + v * h


def flops_per_token(cfg: ModelConfig, vocab_size: int | None, seq_length: int) -> int:
    """Training FLOPs per token (forward + backward): ``6 * N_matmul + 12 * L * h * S``."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    n_matmul = matmul_parameters(cfg, vocab_size)
    return 6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * seq_length


@dataclass(frozen=True)
class TensorParallelTraffic:
    """Collective payloads of one transformer layer for one micro-batch (forward + backward).

    Payload = the size of the tensor handed to the collective: the tensor of an all-reduce, the
    *output* of an all-gather, the *input* of a reduce-scatter (all three equal ``b * s * h``
    elements for the activations). ``wire_bytes_per_rank`` is what each rank sends with ring
    algorithms: ``2 (t-1)/t`` of an all-reduce payload, ``(t-1)/t`` of the others.
    """

    all_reduce_bytes: int
    all_gather_bytes: int
    reduce_scatter_bytes: int
    wire_bytes_per_rank: float


def tensor_parallel_bytes_per_layer(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_length: int,
    tp: int,
    sequence_parallel: bool,
    bytes_per_element: int,
) -> TensorParallelTraffic:
    """Bytes TP communicates per transformer layer per micro-batch (x micro-batches = per step).

    With ``A = b * s * h * bytes_per_element`` (one full activation) and ``t = tp``:

    * TP only: 2 all-reduces of ``A`` forward (attention output, MLP output) and 2 backward
      (gradients of the QKV and h->4h inputs): payload ``4A``, wire ``8 (t-1)/t A`` per rank.
    * TP + SP: each all-reduce becomes an all-gather (column input) or a reduce-scatter (row
      output) of the same ``A``, and backward does the conjugates: 4 all-gathers + 4
      reduce-scatters, payload ``8A`` but wire again ``8 (t-1)/t A`` -- sequence parallelism
      moves the same bytes and saves the activation memory of LayerNorm/dropout. Plus the
      all-reduce of the sequence-split replicated parameters' gradients (2 LayerNorms x (gain +
      bias) + 2 row-parallel biases = ``6 h`` elements): wire ``12 (t-1)/t h`` elements.
    * ``cfg.activation_checkpointing`` recomputes the forward in backward, and with it the
      forward's collectives: the two column-input gathers (SP) and the row-output reductions --
      except that torch's non-reentrant checkpoint stops recomputing once every tensor backward
      needs is rebuilt, so without residual dropout (``hidden_dropout == 0``: nothing after the
      MLP's output reduction is saved) that last reduction is not repeated.

    The embedding, the vocab-parallel head and its cross entropy are outside the layers and not
    counted. A test counts the collectives of a real block against this.
    """
    if tp == 1:
        return TensorParallelTraffic(0, 0, 0, 0.0)
    act = micro_batch_size * seq_length * cfg.hidden_size * bytes_per_element
    gathers = reductions = 4  # 2 in forward + the 2 conjugates of the other kind in backward
    if cfg.activation_checkpointing:
        gathers += 2
        reductions += 2 if cfg.hidden_dropout > 0 else 1
    ring = (tp - 1) / tp
    if not sequence_parallel:
        all_reduce = reductions * act  # column inputs communicate only in backward
        return TensorParallelTraffic(all_reduce, 0, 0, 2 * ring * all_reduce)
    param_grads = 6 * cfg.hidden_size * bytes_per_element
    return TensorParallelTraffic(
        all_reduce_bytes=param_grads,
        all_gather_bytes=gathers * act,
        reduce_scatter_bytes=reductions * act,
        wire_bytes_per_rank=ring * (gathers + reductions) * act + 2 * ring * param_grads,
    )
