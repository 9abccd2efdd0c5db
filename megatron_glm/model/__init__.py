"""GLM model: flat stage-able layers, tied head, loss on loss positions only, FLOP counts."""

from megatron_glm.model.embedding import EmbeddingLayer
from megatron_glm.model.flops import (
    TensorParallelTraffic,
    flops_per_token,
    matmul_parameters,
    num_parameters,
    tensor_parallel_bytes_per_layer,
)
from megatron_glm.model.glm import (
    GLMModel,
    build_model,
    init_layer,
    resolve_vocab_size,
    tensor_parallel_layout,
)
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.model.loss import LossOutput, glm_loss
from megatron_glm.model.transformer import MLP, FinalLayerNorm, GLMBlock, SelfAttention

__all__ = [
    "MLP",
    "EmbeddingLayer",
    "FinalLayerNorm",
    "GLMBlock",
    "GLMModel",
    "KVCache",
    "LossOutput",
    "SelfAttention",
    "TensorParallelTraffic",
    "build_model",
    "flops_per_token",
    "glm_loss",
    "init_layer",
    "matmul_parameters",
    "num_parameters",
    "resolve_vocab_size",
    "tensor_parallel_bytes_per_layer",
    "tensor_parallel_layout",
]
