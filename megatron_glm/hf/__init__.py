"""Hugging Face format: our remote code (configuration, modeling) and the exporter.

``configuration_glm.py`` and ``modeling_glm.py`` import only torch and transformers: they are
copied verbatim into every exported folder. :mod:`.export` sits above ``training`` (it reads
checkpoints), so nothing in ``model`` or ``training`` imports this package.
"""
