"""Shared fixtures: a small real-text corpus and a tiny tokenizer trained on it.

Both are session-scoped (built once per pytest process: 2-3 s of CPU, 5-9 s of wall time on
the shared 2-core CI machine) and deterministic: the corpus is the first documents of the
stdlib-docstring demo corpus, and tokenizer training is a pure function of its input and
parameters (see ``megatron_glm.data.tokenizer_training``).

DeepSpeed picks its accelerator at import time; tests run it on CPU, and one OpenMP thread per
process keeps multi-process tests from oversubscribing the 2 CI cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from megatron_glm.data.demo_corpus import write_demo_corpus
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.data.tokenizer_training import train_tokenizer

TEST_CORPUS_DOCS = 400
"""Documents in ``demo_corpus_path`` (~450 KB of text, enough for a 1500-piece vocabulary)."""
TINY_VOCAB_SIZE = 1500
"""Vocabulary of ``tiny_tokenizer_model``: 8 reserved + 256 byte pieces + ~1236 learned."""


@pytest.fixture(scope="session")
def demo_corpus_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSONL (``{"text": ...}`` per line) holding the first 400 demo-corpus documents."""
    path = tmp_path_factory.mktemp("demo_corpus") / "corpus.jsonl"
    write_demo_corpus(path, max_docs=TEST_CORPUS_DOCS)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path) -> Path:
    """Path to a unigram SentencePiece ``.model`` (vocab 1500) trained on ``demo_corpus_path``."""
    prefix = tmp_path_factory.mktemp("tiny_tokenizer") / "tok"
    train_tokenizer([demo_corpus_path], prefix, TINY_VOCAB_SIZE, threads=1)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_model: Path) -> GLMTokenizer:
    """A :class:`GLMTokenizer` over ``tiny_tokenizer_model`` (padded vocab 1536)."""
    return GLMTokenizer(tiny_tokenizer_model)
