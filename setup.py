"""Packaging entry point: ``pip install -e .`` installs the library and its console scripts.

Dependencies are listed in requirements.txt with their pins (torch is pinned to the CPU build on
local disk so nothing upgrades it); ``install_requires`` only states the ranges the library needs.

One small C extension, ``megatron_glm.data._native`` (hot loops of the preprocessor), is built
with the install (in place for ``-e``); it is optional: without a compiler the install goes on
and the preprocessor uses its pure-Python fallbacks, same output, slower.
"""

from setuptools import Extension, find_packages, setup

setup(
    name="megatron_glm",
    version="0.1.0",
    description="GLM pretraining and finetuning on DeepSpeed with Megatron-style parallelism",
    packages=find_packages(include=["megatron_glm", "megatron_glm.*"]),
    ext_modules=[
        Extension(
            "megatron_glm.data._native",
            ["megatron_glm/data/_native.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.14",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "orjson>=3.9",
        "protobuf>=4.21",
        "rouge-score>=0.1.2",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.5", "mypy>=1.10"],
    },
    entry_points={
        "console_scripts": [
            "glm-pretrain=megatron_glm.pretrain:main",
            "glm-finetune=megatron_glm.finetune.__main__:main",
        ],
    },
)
