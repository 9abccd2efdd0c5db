"""megatron_glm: an open trainer for GLM (General Language Model) on DeepSpeed.

Layers, one-way: ``parallel`` <- ``kernels`` <- ``model`` <- ``training``; ``data`` stands alone.
Nothing in the library reads ``sys.argv`` or keeps global state; CLIs live in ``tools/`` and in the
``__main__``-style entry modules (``megatron_glm.pretrain``).
"""

__version__ = "0.1.0"
