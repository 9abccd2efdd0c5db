"""Data side: tokenizer, indexed datasets, packed windows, blank infilling.

Imports no other megatron_glm subpackage (only megatron_glm.config).
"""
