"""The Hugging Face tokenizer export: AutoTokenizer gives GLMTokenizer's ids and text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from megatron_glm.data.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, GLMTokenizer, TokenizerError
from megatron_glm.hf.tokenizer_export import export_tokenizer

transformers = pytest.importorskip("transformers")

# Texts the demo corpus may lack: specials at the start, inside words, around eos; runs of
# spaces, tabs, newlines, characters outside the vocabulary (byte fallback), piece-like text.
EDGE_TEXTS = (
    "",
    " ",
    "[MASK] starts with a mask",
    "  [gMASK]x<|endoftext|> y<|endoftext|>",
    f"{EOS_TOKEN}a {EOS_TOKEN}b [MASK] c{EOS_TOKEN}",
    "word[sMASK][MASK]word",
    "x<|startofpiece|> y <|endofpiece|>",
    "a  b\n\n c\t\t d   ",
    "<0x41> <unk> ⁇ <pad:3>",
    "héllo 日本語 😀 ﬁ",
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Any:
    out = tmp_path_factory.mktemp("hf_tokenizer")
    export_tokenizer(tiny_tokenizer_model, out)
    return transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)


def test_ids_and_text_equal_glm_tokenizer(
    hf_tokenizer: Any, tiny_tokenizer: GLMTokenizer, demo_corpus_path: Path
) -> None:
    """Every demo document (and the edge texts): the same ids, with and without
    ``add_special_tokens`` (it adds nothing), and decode gives back GLMTokenizer's text, which
    is the document itself."""
    lines = demo_corpus_path.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines] + list(EDGE_TEXTS)
    for text in texts:
        ids = tiny_tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == tiny_tokenizer.decode(ids) == text, text
    batch = hf_tokenizer(texts[:8])
    assert batch["input_ids"] == [tiny_tokenizer.encode(t) for t in texts[:8]]
    assert sorted(batch) == ["attention_mask", "input_ids"]  # what GLM's forward takes
    print(f"tokenizer export: {len(lines)} demo documents + {len(EDGE_TEXTS)} edge texts equal")


def test_special_tokens_map_to_glm_ids(hf_tokenizer: Any, tiny_tokenizer: GLMTokenizer) -> None:
    for token, i in tiny_tokenizer.special_ids().items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == i, token
        assert hf_tokenizer.convert_ids_to_tokens(i) == token
    named = {
        "cls_token_id": tiny_tokenizer.cls_id,
        "mask_token_id": tiny_tokenizer.mask_id,
        "smask_token_id": tiny_tokenizer.smask_id,
        "gmask_token_id": tiny_tokenizer.gmask_id,
        "sop_token_id": tiny_tokenizer.sop_id,
        "eop_token_id": tiny_tokenizer.eop_id,
        "eos_token_id": tiny_tokenizer.eos_id,
        "pad_token_id": tiny_tokenizer.pad_id,
        "unk_token_id": tiny_tokenizer.unk_id,
    }
    assert {name: getattr(hf_tokenizer, name) for name in named} == named
    assert len(hf_tokenizer) == hf_tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert set(hf_tokenizer.all_special_tokens) == {*SPECIAL_TOKENS, "<unk>"}


def test_decode_specials_padding_rows_and_skip(
    hf_tokenizer: Any, tiny_tokenizer: GLMTokenizer
) -> None:
    """Eos decodes to its text (SentencePiece alone gives ""), padding rows as ``<pad:ID>``
    with the text after them keeping its leading space, as GLMTokenizer renders them."""
    word = tiny_tokenizer.encode("the")
    pad_row = tiny_tokenizer.vocab_size + 3
    ids = [tiny_tokenizer.sop_id, *word, tiny_tokenizer.eos_id, *word, pad_row, *word]
    assert hf_tokenizer.decode(ids) == tiny_tokenizer.decode(ids)
    assert hf_tokenizer.decode(ids) == f"<|startofpiece|> the{EOS_TOKEN} the<pad:{pad_row}> the"
    assert hf_tokenizer.decode([tiny_tokenizer.mask_id, *word], skip_special_tokens=True) == (
        tiny_tokenizer.decode(word)
    )


def test_export_writes_a_self_contained_folder(tmp_path: Path, tiny_tokenizer_model: Path) -> None:
    export_tokenizer(tiny_tokenizer_model, tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == [
        "special_tokens_map.json",
        "tokenization_glm.py",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tiny_tokenizer_model.read_bytes()
    source = (tmp_path / "hf" / "tokenization_glm.py").read_text()
    assert "from megatron_glm" not in source and "import megatron_glm" not in source
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"] == ["tokenization_glm.GLMTokenizer", None]


def test_export_refuses_a_model_without_glm_specials(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"bad\.model"):
        export_tokenizer(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
