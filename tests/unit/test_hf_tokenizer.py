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


# ------------------------------------------------ Hugging Face tokenizer folders (WordPiece, BPE)

HF_VOCAB = 2000
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _train_hf_folder(kind: str, texts: list[str], out: Path) -> Path:
    """A small tokenizer of THUDM's kinds trained on the demo documents, saved as a folder:
    ``wordpiece`` as BERT uncased (glm-large), ``bpe`` as GPT-2 byte-level BPE (glm-10b)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(cleanup=False)
        trainer: Any = trainers.WordPieceTrainer(vocab_size=HF_VOCAB, special_tokens=BERT_SPECIALS)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=HF_VOCAB,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def _demo_texts(demo_corpus_path: Path) -> list[str]:
    lines = demo_corpus_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def hf_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path
) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "tokenizer"
    return request.param, _train_hf_folder(request.param, _demo_texts(demo_corpus_path), out)


def test_glm_specials_kept_or_appended(hf_folder: tuple[str, Path]) -> None:
    """Specials get THUDM's ids (THUDM/GLM data_utils/tokenization.py): BERT keeps [CLS]/[MASK],
    eos is [PAD], then sop, eop, gMASK, sMASK follow the vocabulary (BertWordPieceTokenizer);
    GPT-2 keeps eos and appends sop, eop, [CLS], [MASK], [SEP], [UNK], gMASK, sMASK
    (GPT2BPETokenizer). All distinct and inside the padded vocabulary; a special's spelling
    inside a text is one id (BERT's lower-casing spares it)."""
    from megatron_glm.data.hf_tokenizer import HFTokenizer
    from megatron_glm.data.tokenizer import load_tokenizer

    kind, folder = hf_folder
    tok = load_tokenizer(folder, tp=2)
    assert isinstance(tok, HFTokenizer)
    v = tok.base_vocab_size
    sop, eop = "<|startofpiece|>", "<|endofpiece|>"
    if kind == "wordpiece":  # BERT_SPECIALS: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4
        want = {"[CLS]": 2, "[MASK]": 4, EOS_TOKEN: 0, sop: v, eop: v + 1}
        want |= {"[gMASK]": v + 2, "[sMASK]": v + 3}
        added, unk = 4, 1
    else:
        want = {EOS_TOKEN: 0, sop: v, eop: v + 1, "[CLS]": v + 2, "[MASK]": v + 3}
        want |= {"[gMASK]": v + 6, "[sMASK]": v + 7}
        added, unk = 8, v + 5
    assert tok.special_ids() == want and tok.vocab_size == v + added and tok.unk_id == unk
    assert tok.special_tokens()[EOS_TOKEN] == ("[PAD]" if kind == "wordpiece" else EOS_TOKEN)
    ids = list(tok.special_ids().values())
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert max(ids) < tok.vocab_size <= tok.padded_vocab_size and tok.padded_vocab_size % 256 == 0
    assert tok.pad_id == tok.eos_id
    for token, i in tok.special_ids().items():
        spelled = tok.special_tokens()[token]
        got = tok.encode(f"Some text {spelled}more text")
        assert got.count(i) == 1, (token, got)
        assert spelled in tok.decode(got)


def _expected_text(tok: Any, text: str, kind: str) -> str:
    """What the vocabulary can give back: byte-level BPE the text itself; uncased WordPiece the
    normalised words joined by spaces (its decoder, clean-up off, joins ``##`` pieces)."""
    if kind == "bpe":
        return text
    normalized = tok.tokenizer.normalizer.normalize_str(text)
    return " ".join(w for w, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str(normalized))


def test_preprocess_with_a_tokenizer_folder(
    hf_folder: tuple[str, Path], demo_corpus_path: Path, tmp_path: Path
) -> None:
    """preprocess_data reads the folder through the same factory: every document's stored ids
    are the tokenizer's ids plus eos, inside the vocabulary, and decode to the text; sentence
    pieces encoded by 2 worker processes put together give the same text."""
    from megatron_glm.data.indexed import IndexedDataset
    from megatron_glm.data.preprocess import output_prefix_for, preprocess_data
    from megatron_glm.data.tokenizer import load_tokenizer

    kind, folder = hf_folder
    tok = load_tokenizer(folder)
    texts = _demo_texts(demo_corpus_path)
    preprocess_data([demo_corpus_path], tmp_path / "doc", folder, append_eod=True, progress=False)
    ds = IndexedDataset(output_prefix_for(tmp_path / "doc", "text", split=False))
    assert ds.num_documents == len(texts)
    for d, text in enumerate(texts):
        ids = ds[d].tolist()
        assert ids == [*tok.encode(text), tok.eos_id], d
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == _expected_text(tok, text, kind) + (
            EOS_TOKEN if kind == "bpe" else " [PAD]"  # THUDM's BERT eos
        )
    if kind == "bpe":
        kw: dict[str, Any] = {"split_sentences": True, "workers": 2, "progress": False}
        preprocess_data([demo_corpus_path], tmp_path / "split", folder, **kw)
        split = IndexedDataset(output_prefix_for(tmp_path / "split", "text", split=True))
        assert split.num_documents == len(texts) and len(split) > 2 * len(texts)
        for d, text in enumerate(texts):
            lo, hi = split.doc_idx[d], split.doc_idx[d + 1]
            assert "".join(tok.decode(split[i]) for i in range(lo, hi)) == text, d
    print(f"{kind}: {len(texts)} preprocessed documents round-trip, specials {tok.special_ids()}")


def test_training_preflight_accepts_a_tokenizer_folder(hf_folder: tuple[str, Path]) -> None:
    from megatron_glm.config import RunConfig
    from megatron_glm.training.preflight import load_tokenizer

    _, folder = hf_folder
    cfg = RunConfig()
    cfg.data.tokenizer_model = str(folder)
    cfg.parallel.tp = 2
    tok = load_tokenizer(cfg)
    assert tok.model_path == folder
    assert tok.padded_vocab_size % (cfg.model.make_vocab_size_divisible_by * 2) == 0


def test_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    from megatron_glm.data.tokenizer import load_tokenizer

    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(TokenizerError, match=f"{tmp_path} has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is not a tokenizers file"):
        load_tokenizer(tmp_path)


def test_export_of_a_tokenizer_folder_needs_no_remote_code(
    hf_folder: tuple[str, Path], demo_corpus_path: Path, tmp_path: Path
) -> None:
    """A model trained on a WordPiece/BPE folder exports a plain fast tokenizer holding GLM's
    specials at the trainer's ids: AutoTokenizer (no trust_remote_code) gives the same ids."""
    from megatron_glm.data.tokenizer import load_tokenizer

    _, folder = hf_folder
    tok = load_tokenizer(folder)
    export_tokenizer(folder, tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenization_glm.py").exists()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = _demo_texts(demo_corpus_path)
    for text in texts:
        ids = tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto.decode(ids) == tok.decode(ids)
    for token, i in tok.special_ids().items():  # as the vocabulary spells it (BERT eos: [PAD])
        assert auto.convert_tokens_to_ids(tok.special_tokens()[token]) == i
    assert auto.eos_token_id == auto.pad_token_id == tok.eos_id
    assert auto.mask_token_id == tok.mask_id and auto.cls_token_id == tok.cls_id
