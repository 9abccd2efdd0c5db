"""Finetuning a pretrained GLM on the training loop: cloze classification and seq2seq.

``tasks`` reads task files and builds micro-batches, ``losses`` holds the :class:`BatchLoss`
implementations, ``run`` assembles a run (``python -m megatron_glm.finetune``).
"""
