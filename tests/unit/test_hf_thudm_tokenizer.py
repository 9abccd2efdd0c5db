"""THUDM's slow-tokenizer files (no ``tokenizer.json``) are converted by ``from-hf``.

The folders are built here, in the layouts THUDM publishes (nothing downloaded): a BERT-style
``vocab.txt`` (``[PAD]`` 0, ``[unused*]``, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102,
``[MASK]`` 103, as bert-large-uncased for glm-large), a GPT-2-style ``vocab.json`` +
``merges.txt`` (``<|endoftext|>`` the last id, as for glm-10b) and a RoBERTa-style one (``<s>``
0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last, as for glm-roberta). Expected special
ids are THUDM's, written out from THUDM/GLM ``data_utils/tokenization.py``
(``BertWordPieceTokenizer`` and ``GPT2BPETokenizer`` with ``add_block_symbols=True,
add_task_mask=True``): BERT eos/pad ``[PAD]``, ENC ``[CLS]``, MASK ``[MASK]`` from the vocabulary,
sop/eop at ``len(vocab)``, +1, gMASK/sMASK at +2, +3; GPT-2 eos ``<|endoftext|>``, then sop, eop,
``[CLS]``, ``[MASK]``, ``[SEP]``, ``[UNK]``, gMASK, sMASK at ``len(encoder)`` + 0..7; RoBERTa
ENC ``<s>``, eos ``</s>``, MASK ``<mask>``, then sop, eop, gMASK, sMASK.

Text ids are compared with independent slow tokenizers on the same files: ``transformers``'
Python ``BertTokenizerLegacy`` (5.x's name of the slow ``BertTokenizer``) and, since 5.x has no
slow GPT-2 class, OpenAI's byte-level BPE written out below (THUDM's ``tokenization_gpt2.py``).
"""

from __future__ import annotations

import json
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest
from safetensors.torch import save_file

from megatron_glm.data.hf_tokenizer import HFTokenizer
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.hf.import_hf import ImportResult, import_from_hf
from tests.unit.test_hf_thudm_reference import thudm_config, thudm_weights
from tests.unit.test_hf_tokenizer import _demo_texts

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

TEXTS = (
    "The Quick brown fox, jumped over 12 lazy dogs!",
    'Naïve café owners said: "it\'s fine" -- really?',
    "  leading spaces and\ttabs\nnew lines   ",
    "unbelievable tokenization of antidisestablishmentarianism",
)
SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"


def _bert_vocab(texts: list[str], out: Path) -> Path:
    """``vocab.txt`` with BERT's special layout and pieces trained on the demo documents."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=1200, special_tokens=specials)
    )
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return out


def _bpe_vocab(texts: list[str], out: Path, head: list[str], tail: str) -> Path:
    """``vocab.json`` + ``merges.txt`` of a byte-level BPE: ``head`` tokens first, ``tail`` last."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=head, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True)
    tok.model.save(str(out))  # vocab.json, merges.txt
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    vocab[tail] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return out


# ----------------------------------------------------- OpenAI's GPT-2 BPE (the slow reference)


@cache
def _byte_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bpe_word(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair until none is in the merges (GPT-2's ``bpe``)."""
    while len(parts) > 1:
        best = min(pairwise(parts), key=lambda pair: ranks.get(pair, 1 << 30))
        if best not in ranks:
            return parts
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def gpt2_encode(folder: Path, text: str) -> list[int]:
    """GPT-2's encoder: regex pre-split, bytes to unicode, merges applied by rank."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    ranks = {
        (m.split()[0], m.split()[1]): r for r, m in enumerate(x for x in lines if x and x[0] != "#")
    }
    ids = []
    for word in regex.findall(GPT2_PATTERN, text):
        ids += [vocab[p] for p in _bpe_word([_byte_to_unicode()[b] for b in word.encode()], ranks)]
    return ids


# ------------------------------------------------------------------------------ fixtures


def _import_folder(folder: Path, ck: Path, vocab_rows: int) -> ImportResult:
    """THUDM's config and random weights beside the vocabulary files, then from-hf."""
    (folder / "config.json").write_text(json.dumps(thudm_config(vocab_rows)))
    save_file(thudm_weights(vocab_rows), str(folder / "model.safetensors"))
    assert not (folder / "tokenizer.json").exists()
    return import_from_hf(folder, ck)


@pytest.fixture(scope="module")
def texts(demo_corpus_path: Path) -> list[str]:
    return _demo_texts(demo_corpus_path)


@pytest.fixture(scope="module")
def bert_import(
    texts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ImportResult]:
    folder = _bert_vocab(texts, tmp_path_factory.mktemp("bert") / "glm-large")
    return folder, _import_folder(folder, tmp_path_factory.mktemp("ck") / "bert", 1280)


# ------------------------------------------------------------------------------ tests


def test_vocab_txt_converted_with_thudm_ids(
    bert_import: tuple[Path, ImportResult], texts: list[str]
) -> None:
    """glm-large's layout: the copied tokenizer gives [MASK] 103, [CLS] 101, eos = pad = [PAD] 0
    and sop, eop, gMASK, sMASK right after the vocabulary; text ids equal the slow
    BertTokenizer's on the same vocab.txt (lower-cased), and [MASK] in a text is one id."""
    folder, result = bert_import
    copied = result.tokenizer
    assert copied is not None and (copied / "tokenizer.json").is_file() and result.warnings == []
    tok = load_tokenizer(copied)
    assert isinstance(tok, HFTokenizer) and tok.scheme.name == "bert"
    vocab_txt = folder / "vocab.txt"
    v = len(vocab_txt.read_text(encoding="utf-8").splitlines())
    assert tok.base_vocab_size == v
    assert tok.special_ids() == {
        "[CLS]": 101,
        "[MASK]": 103,
        "[sMASK]": v + 3,
        "[gMASK]": v + 2,
        SOP: v,
        EOP: v + 1,
        "<|endoftext|>": 0,
    }
    assert tok.unk_id == 100 and tok.pad_id == 0 and tok.vocab_size == v + 4
    slow = transformers.BertTokenizerLegacy(vocab_file=str(vocab_txt), do_lower_case=True)
    for text in [*TEXTS, *texts[:20], "a [MASK] b"]:
        assert tok.encode(text) == slow.encode(text, add_special_tokens=False), text
    assert tok.encode("x [MASK] y").count(103) == 1
    assert tok.encode(f"x {SOP} [gMASK] y") == [*tok.encode("x"), v, v + 2, *tok.encode("y")]


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_vocab_json_merges_converted_with_thudm_ids(
    kind: str, texts: list[str], tmp_path: Path
) -> None:
    """glm-10b (GPT-2) and glm-roberta layouts: THUDM's special ids, and text ids equal to
    OpenAI's byte-level BPE on the same files."""
    if kind == "gpt2":
        folder = _bpe_vocab(texts, tmp_path / "glm-10b", [], "<|endoftext|>")
    else:
        folder = _bpe_vocab(
            texts, tmp_path / "glm-roberta", ["<s>", "<pad>", "</s>", "<unk>"], "<mask>"
        )
    v = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    result = _import_folder(folder, tmp_path / "ck", vocab_rows=1280)
    assert result.tokenizer is not None
    tok = load_tokenizer(result.tokenizer)
    assert isinstance(tok, HFTokenizer) and tok.scheme.name == kind
    if kind == "gpt2":
        want = {"<|endoftext|>": v - 1, SOP: v, EOP: v + 1, "[CLS]": v + 2, "[MASK]": v + 3}
        want |= {"[gMASK]": v + 6, "[sMASK]": v + 7}
        assert tok.unk_id == v + 5 and tok.vocab_size == v + 8
    else:
        want = {"[CLS]": 0, "<|endoftext|>": 2, "[MASK]": v - 1, SOP: v, EOP: v + 1}
        want |= {"[gMASK]": v + 2, "[sMASK]": v + 3}
        assert tok.unk_id == 3 and tok.vocab_size == v + 4
    assert tok.special_ids() == want
    for text in [*TEXTS, *texts[:20]]:
        assert tok.encode(text) == gpt2_encode(folder, text), text
        assert tok.decode(tok.encode(text)) == text
    eos = tok.special_tokens()["<|endoftext|>"]
    assert tok.encode(f"a{eos} b") == [
        *gpt2_encode(folder, "a"),
        tok.eos_id,
        *gpt2_encode(folder, " b"),
    ]


def test_added_tokens_json_must_agree(texts: list[str], tmp_path: Path) -> None:
    """A folder whose ``added_tokens.json`` puts a special elsewhere is not converted (a note
    names the file and the ids); one that agrees with THUDM's order is."""
    folder = _bert_vocab(texts, tmp_path / "glm-large")
    v = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    (folder / "added_tokens.json").write_text(json.dumps({SOP: v, EOP: v + 1}))
    ok = _import_folder(folder, tmp_path / "ok", vocab_rows=1280)
    assert ok.tokenizer is not None and ok.warnings == []
    (folder / "added_tokens.json").write_text(json.dumps({SOP: v + 1, EOP: v}))
    bad = _import_folder(folder, tmp_path / "bad", vocab_rows=1280)
    assert bad.tokenizer is None
    assert any(
        "added_tokens.json" in w and f"has id {v + 1} there but {v}" in w for w in bad.warnings
    ), bad.warnings
