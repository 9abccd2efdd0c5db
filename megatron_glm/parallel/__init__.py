"""Distributed substrate: layout and groups, autograd collectives, TP layers, vocab-parallel CE,
the model-parallel RNG and checkpoint resharding. Knows nothing about GLM."""
