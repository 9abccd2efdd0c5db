"""Finetuning and evaluation of a pretrained GLM (docs/design.md; issue 15)."""
