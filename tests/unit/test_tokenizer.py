"""GLMTokenizer and train_tokenizer: special ids, exact round trip, padding, errors, determinism."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm

from megatron_glm.data.jsonl import BadInputError, BadLineError
from megatron_glm.data.sentence_split import split_sentences_batch
from megatron_glm.data.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, GLMTokenizer, TokenizerError
from megatron_glm.data.tokenizer_training import _chunk_line, _select, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SMALL_VOCAB = 400  # 264 reserved ids + ~136 learned: enough for fast training on ~100 docs


def _texts(corpus: Path, n: int | None = None) -> list[str]:
    lines = corpus.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def _pieces(model: Path) -> list[tuple[str, float]]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path) -> Path:
    """The first 100 demo documents: enough text for SMALL_VOCAB, trains in well under 1 s."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    lines = demo_corpus_path.read_text(encoding="utf-8").splitlines(keepends=True)[:100]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> tuple[Path, dict]:
    """A SMALL_VOCAB unigram model of ``small_corpus`` and its training summary."""
    prefix = tmp_path_factory.mktemp("small_model") / "t"
    summary = train_tokenizer([small_corpus], prefix, SMALL_VOCAB, threads=1)
    return prefix.with_suffix(".model"), summary


# ----------------------------------------------------------------------------- special tokens


def test_special_ids(tiny_tokenizer: GLMTokenizer) -> None:
    tok = tiny_tokenizer
    ids = tok.special_ids()
    assert list(ids) == list(SPECIAL_TOKENS)
    assert len(set(ids.values()) | {tok.unk_id}) == len(SPECIAL_TOKENS) + 1
    # train_tokenizer reserves <unk> = 0 and the specials at 1..7, in SPECIAL_TOKENS order.
    assert tok.unk_id == 0
    assert list(ids.values()) == list(range(1, 8))
    named = (tok.cls_id, tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id)
    assert named == tuple(ids[t] for t in SPECIAL_TOKENS[:6])
    assert tok.eos_id == tok.pad_id == ids["<|endoftext|>"]
    for token, i in ids.items():
        assert tok.encode(token) == [i]
        assert tok.decode([i]) == token
        assert tok.id_to_piece(i) == token


def test_special_tokens_inside_text_are_one_id(tiny_tokenizer: GLMTokenizer) -> None:
    tok = tiny_tokenizer
    for token, i in tok.special_ids().items():
        for text in (f"a{token}b", f"the {token} value", f"{token}{token} x", f"x {token}"):
            ids = tok.encode(text)
            assert ids.count(i) == text.count(token)
            assert tok.decode(ids) == text
        ids = tok.encode(f"{token}word")
        assert ids[0] == i and tok.decode(ids[1:]) == "word"


def test_leading_space_before_special_is_kept(tiny_tokenizer: GLMTokenizer) -> None:
    tok = tiny_tokenizer
    # Only the dummy prefix is dropped; a real leading space still encodes (and decodes).
    ids = tok.encode(" [MASK]")
    assert ids[-1] == tok.mask_id and len(ids) > 1
    assert tok.decode(ids) == " [MASK]"


def test_megatron_reads_the_eod_id(
    tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer
) -> None:
    """Megatron-LM loads the model with plain SentencePiece; its GPTSentencePieceTokenizer and
    Llama2Tokenizer take ``eod = eos_id()`` (preprocess_data.py --append-eod appends it; it was
    -1), its SentencePieceTokenizer takes ``eos`` = the id of ``id_to_piece(eos_id())``. Both
    must be our eos, the piece <|endoftext|>, at the same id as ever."""
    tok = tiny_tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_model))
    eod = sp.eos_id()
    assert eod == tok.eos_id == tok.pad_id == 7
    assert sp.id_to_piece(eod) == EOS_TOKEN == "<|endoftext|>"
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}  # _populate_vocab
    assert vocab[sp.id_to_piece(sp.eos_id())] == tok.eos_id
    # Megatron's --append-eod output reads back as the text and <|endoftext|>, as ours does
    text = "Return the value.\n    Indented: yes"
    ids = [*sp.encode_as_ids(text), eod]
    assert ids == tok.encode(text + EOS_TOKEN)
    assert tok.decode(ids) == text + EOS_TOKEN
    # It is a control symbol: plain SentencePiece never makes it from text and decodes it to "";
    # our tokenizer still does both, as when it was user-defined. The other specials are.
    assert sp.is_control(eod) and sp.decode([eod]) == ""
    assert eod not in sp.encode(f"a {EOS_TOKEN} b") and tok.encode(f"a {EOS_TOKEN} b").count(eod)
    for token in SPECIAL_TOKENS[:-1]:
        assert sp.encode(f"x {token}y").count(tok.special_ids()[token]) == 1


def test_a_user_defined_eos_still_loads(
    tmp_path: Path, small_corpus: Path, tiny_tokenizer: GLMTokenizer
) -> None:
    """Models trained before (<|endoftext|> user-defined, SentencePiece eos_id -1) load with the
    same special ids and encode/decode the specials as models trained now do."""
    model = _train_raw(
        tmp_path,
        small_corpus,
        "old",
        vocab_size=SMALL_VOCAB,
        user_defined_symbols=list(SPECIAL_TOKENS),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    old = GLMTokenizer(model)
    assert spm.SentencePieceProcessor(model_file=str(model)).eos_id() == -1
    assert old.special_ids() == tiny_tokenizer.special_ids()
    text = f"{EOS_TOKEN}a {EOS_TOKEN}b [MASK] c{EOS_TOKEN}"
    for tok in (old, tiny_tokenizer):
        ids = tok.encode(text)
        assert ids[0] == ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 3
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
        assert tok.decode([tok.eos_id]) == EOS_TOKEN


# ----------------------------------------------------------------------------- round trip


def test_round_trip_demo_text(tiny_tokenizer: GLMTokenizer, demo_corpus_path: Path) -> None:
    texts = _texts(demo_corpus_path)
    encoded = tiny_tokenizer.encode_batch(texts)
    assert [tiny_tokenizer.decode(ids) for ids in encoded] == texts
    assert all(0 <= i < tiny_tokenizer.vocab_size for ids in encoded for i in ids)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  two  spaces\tand a tab\n\nnew lines  ",
        "ﬁ ligature, ＦＵＬＬ width, café, 日本語, emoji 🙂",  # NFKC would rewrite these
        "    indented code():\r\n        return x",
        "<0x41> [mask] <|endoftext",  # look-alikes of byte pieces and specials stay text
    ],
)
def test_round_trip_is_exact(tiny_tokenizer: GLMTokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_id not in ids  # byte fallback: nothing becomes <unk>
    assert tiny_tokenizer.decode(np.asarray(ids, dtype=np.int64)) == text


def test_encode_batch_matches_encode(tiny_tokenizer: GLMTokenizer, demo_corpus_path: Path) -> None:
    texts = [*_texts(demo_corpus_path, 50), "[gMASK] starts", "<|endoftext|>", "", "x [CLS]"]
    expected = [tiny_tokenizer.encode(t) for t in texts]
    assert tiny_tokenizer.encode_batch(texts) == expected
    assert tiny_tokenizer.encode_batch(texts, num_threads=1) == expected
    assert tiny_tokenizer.encode_batch(texts, num_threads=2) == expected
    # no text starts with a special token: nothing is fixed, results are the same
    plain = [*texts[:50], "x [CLS]", "line\n[MASK] after a break", "[not special", "<|x"]
    assert tiny_tokenizer.encode_batch(plain) == [tiny_tokenizer.encode(t) for t in plain]


def test_encode_pieces_decode_to_their_documents(
    tiny_tokenizer: GLMTokenizer, demo_corpus_path: Path
) -> None:
    """Documents in pieces (sentences keeping the whitespace before them, special tokens at the
    start of a first and of a later piece, one-piece documents): each document's ids decode to
    it exactly; a first piece is encoded as encode() encodes it alone, a one-piece document is
    encode() of the document; any thread count gives the same ids."""
    tok = tiny_tokenizer
    docs = [
        *_texts(demo_corpus_path, 60),
        "[MASK] starts. Then\n\n    indented.",
        "x <|endoftext|> y. <|endoftext|>z<|endoftext|>",
        "One.\n[gMASK] after a break.  <|endoftext|>",
        " leading space. and\ttab  ",
        "single",
    ]
    pieces, per_doc = split_sentences_batch(docs)
    assert per_doc.max() > 5 and (per_doc == 1).any()
    ids = tok.encode_pieces(pieces, per_doc)
    assert tok.encode_pieces(pieces, per_doc, num_threads=1) == ids
    assert len(ids) == len(pieces)
    bounds = np.concatenate([[0], np.cumsum(per_doc)]).tolist()
    for d, doc in enumerate(docs):
        a, b = bounds[d], bounds[d + 1]
        assert "".join(pieces[a:b]) == doc
        assert tok.decode([i for x in ids[a:b] for i in x]) == doc, d
        assert ids[a] == tok.encode(pieces[a]), d
        if b - a == 1:
            assert ids[a] == tok.encode(doc)


def test_special_starts_compiled_and_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled scan finds exactly the special-token starts; the fallback a superset."""
    import megatron_glm.data.tokenizer as module

    texts = ["[MASK] a", "[not", "", "<|endoftext|>", "<|end", "x[CLS]", "[gMASK]", "é [CLS]"]
    assert module.NATIVE is not None, "megatron_glm.data._native was not built"
    assert list(GLMTokenizer._special_starts(texts)) == [0, 3, 6]
    monkeypatch.setattr(module, "NATIVE", None)
    assert list(GLMTokenizer._special_starts(texts)) == [0, 1, 3, 4, 6]


# ----------------------------------------------------------------------------- vocab padding


def _next_multiple(n: int, m: int) -> int:
    while n % m:
        n += 1
    return n


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("divisor", [1, 8, 100, 128, 1500, 4096])
def test_padded_vocab_size(tiny_tokenizer_model: Path, tp: int, divisor: int) -> None:
    tok = GLMTokenizer(tiny_tokenizer_model, make_vocab_size_divisible_by=divisor, tp=tp)
    assert tok.vocab_size == 1500
    assert tok.padded_vocab_size == _next_multiple(1500, divisor * tp)


def test_padded_vocab_examples(tiny_tokenizer_model: Path) -> None:
    assert GLMTokenizer(tiny_tokenizer_model).padded_vocab_size == 1536
    assert GLMTokenizer(tiny_tokenizer_model, tp=4).padded_vocab_size == 1536
    assert GLMTokenizer(tiny_tokenizer_model, tp=8).padded_vocab_size == 2048
    assert (
        GLMTokenizer(tiny_tokenizer_model, make_vocab_size_divisible_by=1).padded_vocab_size == 1500
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 0}, "tp must be >= 1, got 0"),
        ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by must be >= 1, got 0"),
    ],
)
def test_bad_padding_arguments(tiny_tokenizer_model: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GLMTokenizer(tiny_tokenizer_model, **kwargs)


def test_decode_padding_rows_and_bad_ids(tiny_tokenizer: GLMTokenizer) -> None:
    tok = tiny_tokenizer
    ids = tok.encode("a b")
    assert tok.decode([*ids, 1500, *ids, 1535]) == "a b<pad:1500> a b<pad:1535>"
    assert tok.id_to_piece(1501) == "<pad:1501>"
    assert tok.decode(np.array([2, 1500], dtype=np.uint16)) == "[MASK]<pad:1500>"
    model = tok.model_path
    with pytest.raises(
        TokenizerError,
        match=f"^token id 1536 at position 1 is outside \\[0, 1536\\) \\(padded vocab of "
        f"{re.escape(str(model))}\\)$",
    ):
        tok.decode([5, 1536])
    with pytest.raises(TokenizerError, match=r"^token id -1 at position 0 is outside"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match=r"^token id 9999 is outside"):
        tok.id_to_piece(9999)
    with pytest.raises(TokenizerError, match=r"^decode expects a 1-D array of ids, got shape"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))


def test_pickle_round_trip(tiny_tokenizer: GLMTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    text = "[MASK] Return the value. <|endoftext|>"
    assert clone.encode(text) == tiny_tokenizer.encode(text)
    assert clone.special_ids() == tiny_tokenizer.special_ids()
    assert clone.padded_vocab_size == tiny_tokenizer.padded_vocab_size


# ----------------------------------------------------------------------------- bad models


def _train_raw(
    tmp_path: Path, corpus: Path, name: str, vocab_size: int = 300, **options: Any
) -> Path:
    """A SentencePiece model trained directly (not by train_tokenizer), with given options."""
    sentences = [line for t in _texts(corpus) for line in t.splitlines() if line.strip()]
    prefix = tmp_path / name
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return prefix.with_suffix(".model")


def test_missing_special_tokens_named(tmp_path: Path, small_corpus: Path) -> None:
    kept = [t for t in SPECIAL_TOKENS if t not in ("[sMASK]", "<|endofpiece|>")]
    model = _train_raw(tmp_path, small_corpus, "missing", user_defined_symbols=kept)
    expected = (
        f"tokenizer model {model} lacks GLM special token(s) [sMASK], <|endofpiece|>; train it "
        f"with tools/train_tokenizer.py, which reserves them at ids 1..7"
    )
    with pytest.raises(TokenizerError, match=f"^{re.escape(expected)}$"):
        GLMTokenizer(model)


def test_special_tokens_must_be_user_defined(tmp_path: Path, small_corpus: Path) -> None:
    # Control symbols exist in the vocabulary but are never produced from text.
    model = _train_raw(tmp_path, small_corpus, "control", control_symbols=list(SPECIAL_TOKENS))
    with pytest.raises(
        TokenizerError,
        match=f"^tokenizer model {re.escape(str(model))}: special token \\[CLS\\] encodes to .*"
        f"not one id; it must be a SentencePiece user-defined symbol$",
    ):
        GLMTokenizer(model)


def test_unreadable_models(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match=f"^tokenizer model {re.escape(str(missing))} does"):
        GLMTokenizer(missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=f"^tokenizer model {re.escape(str(junk))} is not a"):
        GLMTokenizer(junk)


# ----------------------------------------------------------------------------- training


def test_train_summary_counts(small_corpus: Path, small_model: tuple[Path, dict]) -> None:
    model, s = small_model
    lines = [ln for t in _texts(small_corpus) for ln in t.splitlines() if ln.strip()]
    assert s["sentences_total"] == s["sentences_used"] == len(lines)
    assert s["vocab_size"] == SMALL_VOCAB and s["padded_vocab_size"] == 512
    assert s["special_ids"] == dict(zip(SPECIAL_TOKENS, range(1, 8), strict=True))
    assert s["model"] == str(model) and model.is_file()
    assert s["vocab"] == str(model.with_suffix(".vocab")) and model.with_suffix(".vocab").is_file()
    assert s["unk_fraction"] == 0.0
    assert 1.0 < s["chars_per_token"] < 10.0


def test_sampling_is_deterministic_across_processes(tmp_path: Path, small_corpus: Path) -> None:
    """With fewer sentences allowed than the input holds, the sample is ours and seeded."""
    call = (
        "from megatron_glm.data.tokenizer_training import train_tokenizer as t; import sys; "
        f"t([sys.argv[1]], sys.argv[2], {SMALL_VOCAB}, input_sentence_size=500, threads=1)"
    )
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-c", call, str(small_corpus), str(tmp_path / name)], check=True
        )
    s = train_tokenizer(
        [small_corpus], tmp_path / "c", SMALL_VOCAB, input_sentence_size=500, threads=1
    )
    assert s["sentences_used"] == 500 < s["sentences_total"]
    assert _pieces(tmp_path / "a.model") == _pieces(tmp_path / "b.model")
    assert _pieces(tmp_path / "a.model") == _pieces(tmp_path / "c.model")
    other = train_tokenizer(
        [small_corpus], tmp_path / "d", SMALL_VOCAB, input_sentence_size=500, threads=1, seed=7
    )
    assert other["sentences_used"] == 500
    assert _pieces(tmp_path / "d.model") != _pieces(tmp_path / "a.model")


def test_input_formats_give_the_same_model(
    tmp_path: Path, small_corpus: Path, small_model: tuple[Path, dict]
) -> None:
    texts = _texts(small_corpus)
    gz = tmp_path / "corpus.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"body": t}) for t in texts) + "\n\n")
    plain = tmp_path / "corpus.txt"
    plain.write_text("\n".join(texts), encoding="utf-8")
    g = train_tokenizer([gz], tmp_path / "g", SMALL_VOCAB, threads=1, json_key="body")
    p = train_tokenizer([plain], tmp_path / "p", SMALL_VOCAB, threads=1)
    assert g["bad_lines"].counts["invalid_json"] == 1  # the blank last line: counted, not used
    assert g["bad_lines"].locations["invalid_json"] == [f"{gz}:{len(texts) + 1}"]
    assert p["bad_lines"].total == 0 and small_model[1]["bad_lines"].total == 0
    reference = _pieces(small_model[0])
    assert _pieces(tmp_path / "g.model") == reference
    assert _pieces(tmp_path / "p.model") == reference


# One bad line of every kind, inserted into the small corpus: (line, reason, detail).
BAD_TRAINING_LINES: list[tuple[bytes, str, str]] = [
    (b'{"text": broken\n', "invalid_json", "Expecting value: line 1 column 10 (char 9)"),
    (b"\n", "invalid_json", "Expecting value: line 1 column 1 (char 0)"),
    (b'{"other": "x"}\n', "missing_key", "no key 'text'"),
    (b"[1, 2]\n", "missing_key", "line is a JSON list, not an object"),
    (b'{"text": 3}\n', "non_string", "'text' is int, not a string"),
    (b'{"text": "\xff"}\n', "invalid_utf8", "byte 10: invalid start byte"),
    (b'{"text": "a\\ud800b"}\n', "invalid_utf8", "'text' holds a lone surrogate at character 1"),
    (b'{"text": " \\t "}\n', "empty_text", "'text' is empty or only whitespace"),
]
WORDS = {
    "invalid_json": "invalid JSON",
    "missing_key": "missing key",
    "non_string": "non-string value",
    "invalid_utf8": "invalid UTF-8",
    "empty_text": "empty text",
}


def _with_bad_lines(small_corpus: Path, path: Path, bad: list[bytes]) -> list[int]:
    """Write the small corpus to ``path`` with ``bad`` lines spread through it; their line
    numbers."""
    good = small_corpus.read_bytes().splitlines(keepends=True)
    out, where = [], []
    for i, line in enumerate(good):
        if i % 10 == 3 and bad:
            out.append(bad.pop(0))
            where.append(len(out))
        out.append(line)
    path.write_bytes(b"".join(out))
    return where


@pytest.mark.parametrize(("line", "reason", "detail"), BAD_TRAINING_LINES)
def test_strict_training_stops_at_a_bad_line(
    tmp_path: Path, small_corpus: Path, line: bytes, reason: str, detail: str
) -> None:
    path = tmp_path / "bad.jsonl"
    (lineno,) = _with_bad_lines(small_corpus, path, [line])
    message = f"{path}:{lineno}: {WORDS[reason]}: {detail}"
    with pytest.raises(BadLineError, match=f"^{re.escape(message)}$"):
        train_tokenizer([path], tmp_path / "m", SMALL_VOCAB, threads=1, strict=True)
    assert not (tmp_path / "m.model").exists()


def test_bad_training_lines_are_counted_and_left_out(
    tmp_path: Path, small_corpus: Path, small_model: tuple[Path, dict]
) -> None:
    """The preprocessor's policy: every bad line counted by reason with its file:line, none
    used; the good lines give the model of the clean corpus."""
    path = tmp_path / "bad.jsonl"
    where = _with_bad_lines(small_corpus, path, [line for line, _, _ in BAD_TRAINING_LINES])
    s = train_tokenizer([path], tmp_path / "m", SMALL_VOCAB, threads=1)
    expected: dict[str, list[str]] = {r: [] for r in WORDS}
    for lineno, (_, reason, _) in zip(where, BAD_TRAINING_LINES, strict=True):
        expected[reason].append(f"{path}:{lineno}")
    assert s["bad_lines"].locations == expected
    assert s["bad_lines"].counts == {r: len(v) for r, v in expected.items()}
    assert s["sentences_total"] == small_model[1]["sentences_total"]
    assert _pieces(tmp_path / "m.model") == _pieces(small_model[0])


def test_training_input_without_text(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n\n")
    message = (
        f"train_tokenizer: inputs ['{path}'] hold no text\nbad lines: 2\n"
        f"  invalid JSON: 2 ({path}:1, {path}:2)"
    )
    with pytest.raises(TokenizerError, match=f"^{re.escape(message)}$"):
        train_tokenizer([path], tmp_path / "m", SMALL_VOCAB)
    assert not (tmp_path / "m.model").exists()


@pytest.mark.parametrize("kind", ["cut short", "not gzip"])
def test_damaged_gz_training_input(tmp_path: Path, small_corpus: Path, kind: str) -> None:
    """A .gz cut in half, or plain text named .gz: reported naming the file and the last
    complete line read (counted independently, with zlib), the lines before it used; under
    strict an error, not an EOFError/BadGzipFile."""
    path = tmp_path / "corpus.jsonl.gz"
    if kind == "cut short":
        gz = gzip.compress(small_corpus.read_bytes(), mtime=0)
        path.write_bytes(gz[: len(gz) // 2])
        readable = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
        last, partial = readable.count(b"\n"), len(readable) - readable.rfind(b"\n") - 1
        assert last > 10 and partial > 0
        why = "Compressed file ended before the end-of-stream marker was reached"
        dropped = f"; the {partial} bytes read of line {last + 1} are dropped"
    else:
        path.write_bytes(small_corpus.read_bytes())
        last, why, dropped = 0, "Not a gzipped file (b'{\"')", ""
    message = f"{path}: cut short after line {last}: unreadable gzip data ({why}){dropped}"
    with pytest.raises(BadInputError, match=f"^{re.escape(message)}$"):
        train_tokenizer([path], tmp_path / "m", SMALL_VOCAB, strict=True)
    if kind == "not gzip":
        with pytest.raises(TokenizerError, match=f"inputs cut short: 1\n  {re.escape(message)}$"):
            train_tokenizer([path], tmp_path / "m", SMALL_VOCAB)
        return
    s = train_tokenizer([path], tmp_path / "m", SMALL_VOCAB, threads=1)
    assert s["bad_lines"].cut_short == [message]
    lines = [ln for t in _texts(small_corpus, last) for ln in t.splitlines() if ln.strip()]
    assert s["sentences_total"] == len(lines)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"vocab_size": 264},
            "vocab_size 264 leaves no room for learned pieces: <unk>, 7 special tokens and 256 "
            "byte-fallback pieces take 264 ids",
        ),
        ({"model_type": "word"}, "model_type must be one of ('unigram', 'bpe'), got 'word'"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"input_sentence_size": 0}, "input_sentence_size must be >= 1, got 0"),
    ],
)
def test_bad_training_arguments(
    tmp_path: Path, small_corpus: Path, kwargs: dict, message: str
) -> None:
    args: dict = {"vocab_size": SMALL_VOCAB, **kwargs}
    vocab = args.pop("vocab_size")
    with pytest.raises(TokenizerError, match=f"^{re.escape(message)}$"):
        train_tokenizer([small_corpus], tmp_path / "m", vocab, **args)
    missing = tmp_path / "absent.jsonl"
    message = f"train_tokenizer: input file {missing} does not exist"
    with pytest.raises(TokenizerError, match=f"^{re.escape(message)}$"):
        train_tokenizer([missing], tmp_path / "m", SMALL_VOCAB)


def test_chunk_line_fits_and_rejoins() -> None:
    line = ("wörd " * 3000) + "x" * 5000 + " 日本" * 900
    chunks = _chunk_line(line, 4192)
    assert "".join(chunks) == line
    assert all(0 < len(c.encode("utf-8")) <= 4192 for c in chunks)
    assert all(c.startswith(" ") for c in chunks[1:3])  # cut at spaces where there are some
    assert _chunk_line("short", 4192) == ["short"]


def test_select_picks_exact_indices() -> None:
    items = [f"s{i}" for i in range(10)]
    assert list(_select(items, np.array([0, 3, 9]))) == ["s0", "s3", "s9"]
    assert list(_select(items, None)) == items


def test_long_lines_are_cut_not_dropped(tmp_path: Path, small_corpus: Path) -> None:
    corpus = tmp_path / "long.txt"
    lines = [ln for t in _texts(small_corpus) for ln in t.splitlines() if ln.strip()]
    lines.append(" ".join(lines[:300]))
    long_lines = [ln for ln in lines if len(ln.encode("utf-8")) > 4192]
    assert len(long_lines) >= 1
    corpus.write_text("\n".join(lines) + "\n", "utf-8")
    s = train_tokenizer([corpus], tmp_path / "l", SMALL_VOCAB, threads=1)
    assert s["lines_chunked"] == len(long_lines)
    n_pieces = sum(len(_chunk_line(ln, 4192)) for ln in long_lines)
    assert s["sentences_total"] == len(lines) - len(long_lines) + n_pieces


def test_train_tokenizer_cli(tmp_path: Path, small_corpus: Path) -> None:
    cmd = [
        sys.executable, "tools/train_tokenizer.py", "--input", str(small_corpus),
        "--model-prefix", str(tmp_path / "cli"), "--vocab-size", str(SMALL_VOCAB),
        "--model-type", "bpe", "--threads", "1",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.startswith(f"wrote {tmp_path / 'cli'}.model and {tmp_path / 'cli'}.vocab")
    assert "special ids: [CLS]=1 [MASK]=2 [sMASK]=3 [gMASK]=4 <|startofpiece|>=5" in res.stdout
    tok = GLMTokenizer(tmp_path / "cli.model")
    assert tok.vocab_size == SMALL_VOCAB and tok.encode("[sMASK]") == [3]
    bad = subprocess.run(
        [*cmd[:-6], "--vocab-size", "10"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: vocab_size 10 leaves no room for learned pieces")
    assert "\n  bad lines: 0\n" in res.stdout
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"text": 3}\n' + small_corpus.read_bytes())
    strict = subprocess.run(
        [*cmd[:3], str(broken), *cmd[4:], "--strict"], cwd=REPO, capture_output=True, text=True
    )
    assert (strict.returncode, strict.stdout) == (2, "")
    assert strict.stderr == f"error: {broken}:1: non-string value: 'text' is int, not a string\n"
