"""Packaging entry point: ``pip install -e .`` installs the library and its console scripts.

Dependencies are listed in requirements.txt with their pins (torch is pinned to the CPU build on
local disk so nothing upgrades it); ``install_requires`` only states the ranges the library needs.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_glm",
    version="0.1.0",
    description="GLM pretraining and finetuning on DeepSpeed with Megatron-style parallelism",
    packages=find_packages(include=["megatron_glm", "megatron_glm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.14",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "pyyaml>=6.0",
        "tqdm>=4.66",
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
        ],
    },
)
