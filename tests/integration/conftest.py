"""Integration fixtures: the sentence-split tiny corpus every CLI test trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_glm.data.preprocess import preprocess_data


@pytest.fixture(scope="module")
def tiny_corpus(
    tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> tuple[str, str]:
    """(data prefix, tokenizer .model): the 400-document test corpus, sentence-split."""
    out = tmp_path_factory.mktemp("tiny_corpus")
    summary = preprocess_data(
        [demo_corpus_path],
        out / "demo",
        tiny_tokenizer_model,
        split_sentences=True,
        append_eod=True,
        progress=False,
    )
    return summary.outputs["text"], str(tiny_tokenizer_model)
