"""Decoding with a trained GLM: cached, batched generation (greedy, sampling, beam) and blank
filling (part A with masks, part B generated), see docs/design.md, "Generation"."""

from megatron_glm.generation.blank_fill import fill_blank, fill_blanks
from megatron_glm.generation.config import FillResult, GenerationConfig
from megatron_glm.generation.decoder import generate

__all__ = ["FillResult", "GenerationConfig", "fill_blank", "fill_blanks", "generate"]
