"""Distributed substrate: layout and groups, autograd collectives, TP layers, vocab-parallel CE,
and the model-parallel RNG. Knows nothing about GLM."""
