"""Finetuning and evaluation of a pretrained GLM on the training loop: cloze classification
and seq2seq.

``tasks`` reads task files and builds micro-batches, ``losses`` holds the :class:`BatchLoss`
implementations, ``run`` assembles a run (``python -m megatron_glm.finetune``), ``metrics`` and
``evaluate`` score predictions and run zero-shot evaluation (``tools/evaluate.py``).
"""
