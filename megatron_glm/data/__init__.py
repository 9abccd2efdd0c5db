"""Data side: tokenizer, indexed datasets, packed windows, blank infilling. Imports no other subpackage."""
