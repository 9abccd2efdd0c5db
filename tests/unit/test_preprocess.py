"""preprocess_data: bad-line accounting, exact tokens, determinism, inputs, strict mode, CLIs.

The reference for every token is the tokenizer's own ``encode`` of each document (or of each
sentence of :func:`split_sentences`, itself checked against a character-loop reference in
test_sentence_split.py: the first one of a document alone, a later one as it continues the
text, see :func:`_sentence_ids`), plus eos at the end of each document, compared with
what the memory-mapped reader returns.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from megatron_glm.data.indexed import IndexedDataset, data_file_path, index_file_path
from megatron_glm.data.preprocess import (
    BadInputError,
    BadLineError,
    output_prefix_for,
    preprocess_data,
    resolve_inputs,
)
from megatron_glm.data.sentence_split import split_sentences
from megatron_glm.data.tokenizer import GLMTokenizer

ROOT = Path(__file__).resolve().parents[2]
N_DEMO = 40

# Every kind of bad line, as raw bytes, with its reason.
BAD_LINES: list[tuple[bytes, str]] = [
    (b'{"text": "caf\xe9 au lait"}\n', "invalid_utf8"),  # latin-1 byte
    (b'{"text": "a\\ud800b"}\n', "invalid_utf8"),  # lone surrogate escape
    (b'{"text": "unterminated}\n', "invalid_json"),
    (b"\n", "invalid_json"),  # blank line
    (b'{"text": "x"} trailing\n', "invalid_json"),
    (b'{"body": "no text key"}\n', "missing_key"),
    (b'["text", "a list"]\n', "missing_key"),
    (b'{"text": 17}\n', "non_string"),
    (b'{"text": ["pre", "split"]}\n', "non_string"),
    (b'{"text": ""}\n', "empty_text"),
    (b'{"text": " \\n\\t\\u3000 "}\n', "empty_text"),  # whitespace only counts as empty
]

# Good lines beyond the demo corpus: special token first (dummy prefix rule), CJK, raw U+2028
# inside a JSON string (a line break for str.splitlines, not for JSONL), CRLF line ending.
EXTRA_GOOD = [
    json.dumps({"text": "[MASK] fills a blank. Then more text."}).encode() + b"\n",
    json.dumps({"text": "你好。世界！Mixed text: yes"}, ensure_ascii=False).encode() + b"\n",
    '{"text": "line\u2028separator inside. End"}\n'.encode(),
    b'{"text": "windows line ending. Works"}\r\n',
]


def _demo_lines(demo_corpus_path: Path, n: int = N_DEMO) -> list[bytes]:
    with open(demo_corpus_path, "rb") as f:
        return [next(f) for _ in range(n)]


def _build_corpus(demo_corpus_path: Path) -> tuple[list[bytes], list[str], dict[str, list[int]]]:
    """Lines (good and bad interleaved), the good texts in order, bad line numbers by reason."""
    good = _demo_lines(demo_corpus_path) + EXTRA_GOOD
    lines: list[bytes] = []
    texts: list[str] = []
    bad_at: dict[str, list[int]] = {}
    for i, line in enumerate(good):
        lines.append(line)
        texts.append(json.loads(line)["text"])
        if i < len(BAD_LINES):
            raw, reason = BAD_LINES[i]
            lines.append(raw)
            bad_at.setdefault(reason, []).append(len(lines))
    last = json.dumps({"text": "no newline at the end. Still read"}).encode()
    lines.append(last)
    texts.append(json.loads(last)["text"])
    return lines, texts, bad_at


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path) -> dict:
    lines, texts, bad_at = _build_corpus(demo_corpus_path)
    path = tmp_path_factory.mktemp("pp") / "corpus.jsonl"
    path.write_bytes(b"".join(lines))
    return {"path": path, "lines": lines, "texts": texts, "bad_at": bad_at}


def _run(corpus_path: Path | list[str], out: Path, model: Path, **kw: object):
    inputs = corpus_path if isinstance(corpus_path, list) else [str(corpus_path)]
    return preprocess_data(inputs, out, model, progress=False, **kw)  # type: ignore[arg-type]


def _files(prefix: str) -> tuple[bytes, bytes]:
    return Path(data_file_path(prefix)).read_bytes(), Path(index_file_path(prefix)).read_bytes()


def _sentence_ids(tok: GLMTokenizer, text: str) -> list[list[int]]:
    """Reference ids of the sentences of ``text``: the first encoded alone, as a document starts;
    each later one as the text it continues, by the model with its dummy prefix switched off
    (SentencePiece's own flag, set here in the model proto)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    continuing = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    first, *rest = split_sentences(text)
    return [tok.encode(first)] + [continuing.encode(s) for s in rest]


def test_bad_lines_counted_and_every_good_line_tokenized(
    corpus: dict, tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer, tmp_path: Path
) -> None:
    summary = _run(
        corpus["path"],
        tmp_path / "out",
        tiny_tokenizer_model,
        split_sentences=True,
        append_eod=True,
        chunk_bytes=3000,  # many chunks, several in flight
    )
    path = str(corpus["path"])
    expected_counts = {r: len(v) for r, v in corpus["bad_at"].items()}
    assert {r: n for r, n in summary.bad.counts.items() if n} == expected_counts
    for reason, linenos in corpus["bad_at"].items():
        assert summary.bad.locations[reason] == [f"{path}:{n}" for n in linenos]
    texts = corpus["texts"]
    assert summary.documents == len(texts)
    prefix = output_prefix_for(tmp_path / "out", "text", split=True)
    assert prefix.endswith("out_text_sentence")
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and ds.num_documents == len(texts)
    eos = tiny_tokenizer.eos_id
    n_seq = 0
    for d, text in enumerate(texts):
        ids = _sentence_ids(tiny_tokenizer, text)
        ids[-1] = [*ids[-1], eos]
        assert ds.document_sequence_sizes(d).tolist() == [len(x) for x in ids], d
        assert ds.document(d).tolist() == [t for x in ids for t in x], d
        assert tiny_tokenizer.decode(ds.document(d)[:-1]) == text, d
        n_seq += len(ids)
    assert summary.sequences == len(ds) == n_seq
    assert summary.tokens == len(ds.tokens)
    report = summary.format()
    assert f"bad lines: {sum(expected_counts.values())}" in report
    assert f"invalid UTF-8: 2 ({path}:{corpus['bad_at']['invalid_utf8'][0]}, " in report


def test_split_dataset_decodes_to_its_documents(
    demo_corpus_path: Path, tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer, tmp_path: Path
) -> None:
    """The 400 test documents split into sentences: each document's ids decode back to it
    exactly, newlines and indentation included (they were dropped, 11.8% of the tokens of the
    demo corpus), and the sentence-level dataset holds about as many tokens as the document-level
    one, most documents the very same ids."""
    kw = {"append_eod": True, "workers": 2}
    split = _run(demo_corpus_path, tmp_path / "s", tiny_tokenizer_model, split_sentences=True, **kw)
    whole = _run(demo_corpus_path, tmp_path / "d", tiny_tokenizer_model, **kw)
    ds, dd = IndexedDataset(split.outputs["text"]), IndexedDataset(whole.outputs["text"])
    texts = [json.loads(line)["text"] for line in demo_corpus_path.read_bytes().splitlines()]
    assert ds.num_documents == dd.num_documents == len(texts) == 400
    assert len(ds) > 5 * len(texts)  # really split: many sentences per document
    same = 0
    for d, text in enumerate(texts):
        ids = ds.document(d)
        assert ids[-1] == tiny_tokenizer.eos_id
        assert tiny_tokenizer.decode(ids[:-1]) == text, d
        same += np.array_equal(ids, dd.document(d))
    print(
        f"\ntokens: sentence level {split.tokens}, document level {whole.tokens} "
        f"({100 * (split.tokens / whole.tokens - 1):+.2f}%), {same} of {len(texts)} documents "
        f"with the same ids"
    )
    assert abs(split.tokens - whole.tokens) <= 0.01 * whole.tokens
    assert same >= 0.9 * len(texts)


def test_document_level_tokens_equal_sentencepiece(
    corpus: dict, tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer, tmp_path: Path
) -> None:
    summary = _run(corpus["path"], tmp_path / "out", tiny_tokenizer_model, append_eod=True)
    ds = IndexedDataset(output_prefix_for(tmp_path / "out", "text", split=False))
    raw_sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_model))
    texts = corpus["texts"]
    assert summary.level == "document" and len(ds) == ds.num_documents == len(texts)
    for d, text in enumerate(texts):
        expected = [*tiny_tokenizer.encode(text), tiny_tokenizer.eos_id]
        assert ds[d].tolist() == expected, d
        if not text.startswith("["):  # plain SentencePiece agrees except after a special token
            assert ds[d].tolist() == [*raw_sp.encode(text), tiny_tokenizer.eos_id]
    # without --append-eod no eos is added
    _run(corpus["path"], tmp_path / "noeod", tiny_tokenizer_model)
    ds2 = IndexedDataset(output_prefix_for(tmp_path / "noeod", "text", split=False))
    assert ds2[0].tolist() == tiny_tokenizer.encode(texts[0])


def test_output_identical_for_workers_and_chunking(
    corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    outs = []
    for name, kw in {
        "w1": {"workers": 1},
        "w2": {"workers": 2},
        "w2_small_chunks": {"workers": 2, "chunk_bytes": 1000},
    }.items():
        _run(
            corpus["path"],
            tmp_path / name,
            tiny_tokenizer_model,
            split_sentences=True,
            append_eod=True,
            **kw,
        )
        outs.append(_files(output_prefix_for(tmp_path / name, "text", split=True)))
    assert outs[0] == outs[1] == outs[2]


def test_output_identical_without_compiled_helpers(
    corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pure-Python fallbacks (no C compiler at install) write the same bytes. The encoder
    processes are forked, so they inherit the patched modules."""
    import megatron_glm.data.preprocess as preprocess_module
    import megatron_glm.data.sentence_split as split_module

    kw = {"split_sentences": True, "append_eod": True, "workers": 2, "chunk_bytes": 2000}
    _run(corpus["path"], tmp_path / "native", tiny_tokenizer_model, **kw)
    monkeypatch.setattr(preprocess_module, "NATIVE", None)
    monkeypatch.setattr(split_module, "NATIVE", None)
    _run(corpus["path"], tmp_path / "python", tiny_tokenizer_model, **kw)
    native = _files(output_prefix_for(tmp_path / "native", "text", split=True))
    assert native == _files(output_prefix_for(tmp_path / "python", "text", split=True))


def test_spawned_encoders_write_the_same_bytes(
    corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fork is unavailable the encoders are spawned and load the model themselves."""
    import multiprocessing

    kw = {"split_sentences": True, "append_eod": True, "workers": 2, "chunk_bytes": 4000}
    _run(corpus["path"], tmp_path / "fork", tiny_tokenizer_model, **kw)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    _run(corpus["path"], tmp_path / "spawn", tiny_tokenizer_model, **kw)
    forked = _files(output_prefix_for(tmp_path / "fork", "text", split=True))
    assert forked == _files(output_prefix_for(tmp_path / "spawn", "text", split=True))


def test_gz_and_glob_inputs(corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path) -> None:
    lines = corpus["lines"]
    half = corpus["bad_at"]["missing_key"][0] - 1  # bad lines fall in both files
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"".join(lines[:half]))
    with gzip.open(d / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[half:]))
    (d / "ignored.txt").write_text("not matched by the glob")
    summary = _run([str(d / "*.jsonl*")], tmp_path / "g", tiny_tokenizer_model, append_eod=True)
    assert summary.inputs == [str(d / "a.jsonl"), str(d / "b.jsonl.gz")]
    _run(corpus["path"], tmp_path / "single", tiny_tokenizer_model, append_eod=True)
    assert _files(output_prefix_for(tmp_path / "g", "text", False)) == _files(
        output_prefix_for(tmp_path / "single", "text", False)
    )
    # bad-line locations name the file and the line within it
    locs = [loc for v in summary.bad.locations.values() for loc in v]
    first_bad_b = min(n for v in corpus["bad_at"].values() for n in v if n > half)
    assert f"{d / 'b.jsonl.gz'}:{first_bad_b - half}" in locs


def _readable_part(gz: bytes) -> tuple[bytes, int]:
    """The complete lines a damaged gzip stream still yields (decompressed independently of the
    library, with zlib), and the byte count of the partial line after them."""
    data = zlib.decompressobj(wbits=31).decompress(gz)
    complete = data[: data.rfind(b"\n") + 1]
    return complete, len(data) - len(complete)


def test_cut_short_gz_keeps_the_lines_read(
    corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    """A .gz cut in half: the lines before the cut are written exactly as from a clean file of
    those lines, bad lines among them counted as usual; the report names the file and the last
    complete line; under strict it is an error and nothing is published."""
    whole = b"".join(corpus["lines"])
    gz = gzip.compress(whole, mtime=0)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz[: len(gz) // 2])
    complete, partial = _readable_part(cut.read_bytes())
    last = complete.count(b"\n")
    assert 10 < last < len(corpus["lines"]) - 5 and partial > 0  # cut inside a line, mid-corpus
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(complete)
    kw = {"split_sentences": True, "append_eod": True, "chunk_bytes": 3000}
    got = _run(cut, tmp_path / "cut", tiny_tokenizer_model, **kw)
    ref = _run(clean, tmp_path / "clean", tiny_tokenizer_model, **kw)
    message = (
        f"{cut}: cut short after line {last}: unreadable gzip data (Compressed file ended "
        f"before the end-of-stream marker was reached); the {partial} bytes read of line "
        f"{last + 1} are dropped"
    )
    assert got.bad.cut_short == [message] and ref.bad.cut_short == []
    assert f"inputs cut short: 1\n  {message}\n" in got.format()
    assert got.documents == ref.documents > 10 and got.bad.counts == ref.bad.counts
    assert got.bad.total > 0  # bad lines before the cut are still counted
    assert _files(got.outputs["text"]) == _files(ref.outputs["text"])
    with pytest.raises(BadInputError) as info:
        _run(cut, tmp_path / "strict", tiny_tokenizer_model, **kw, strict=True)
    # strict stops at the first bad line, which comes before the cut
    assert isinstance(info.value, BadLineError)
    good_part = tmp_path / "good.jsonl.gz"
    good_lines = b"".join(_demo_lines_of(corpus, 30))
    good_gz = gzip.compress(good_lines, mtime=0)
    good_part.write_bytes(good_gz[: len(good_gz) // 2])
    complete, partial = _readable_part(good_part.read_bytes())
    last = complete.count(b"\n")
    with pytest.raises(BadInputError) as info:
        _run(good_part, tmp_path / "strict", tiny_tokenizer_model, **kw, strict=True)
    assert not isinstance(info.value, BadLineError)
    assert str(info.value) == (
        f"{good_part}: cut short after line {last}: unreadable gzip data (Compressed file ended "
        f"before the end-of-stream marker was reached); the {partial} bytes read of line "
        f"{last + 1} are dropped"
    )
    assert [p for p in os.listdir(tmp_path) if p.startswith("strict")] == []


def _demo_lines_of(corpus: dict, n: int) -> list[bytes]:
    """The first ``n`` good lines of the test corpus (the demo documents)."""
    bad = {raw for raw, _ in BAD_LINES}
    return [line for line in corpus["lines"] if line not in bad][:n]


def test_plain_text_named_gz(corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path) -> None:
    """Not gzip at all: nothing read, reported with line 0; the CLI exits 2 under --strict with
    the message and no traceback, and 0 without it, the report in its summary; other inputs of
    the run are used."""
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"".join(_demo_lines_of(corpus, 5)))
    message = f"{fake}: cut short after line 0: unreadable gzip data (Not a gzipped file (b'{{\"'))"
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"".join(_demo_lines_of(corpus, 3)))
    summary = _run([str(fake), str(other)], tmp_path / "f", tiny_tokenizer_model)
    assert summary.bad.cut_short == [message] and summary.documents == 3
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        str(fake),
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer-model",
        str(tiny_tokenizer_model),
        "--no-progress",
    ]
    res = subprocess.run([*cmd, "--strict"], capture_output=True, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", f"error: {message}\n")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0 and f"inputs cut short: 1\n  {message}\n" in res.stdout


def test_strict_names_file_line_and_reason(
    corpus: dict, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    first = min((n, r) for r, v in corpus["bad_at"].items() for n in v)
    assert first[1] == "invalid_utf8"
    with pytest.raises(BadLineError) as info:
        _run(corpus["path"], tmp_path / "s", tiny_tokenizer_model, strict=True)
    assert str(info.value) == (
        f"{corpus['path']}:{first[0]}: invalid UTF-8: byte 13: invalid continuation byte"
    )
    assert isinstance(info.value, ValueError)
    assert [p for p in os.listdir(tmp_path) if p.startswith("s_")] == []  # nothing published
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_bytes(b'{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(BadLineError, match=r"bad\.jsonl:2: non-string value: 'text' is int"):
        _run(bad_json, tmp_path / "s2", tiny_tokenizer_model, strict=True)


def test_several_json_keys_stay_aligned(tiny_tokenizer_model: Path, tmp_path: Path) -> None:
    rows = [
        {"title": "First.", "text": "Body one. Two"},
        {"text": "no title here"},  # missing key: the whole line is bad for both outputs
        {"title": "Third", "text": ""},  # empty text: bad for both
        {"title": "Fourth title", "text": "Body four"},
    ]
    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(path, tmp_path / "k", tiny_tokenizer_model, json_keys=["title", "text"])
    assert summary.bad.counts["missing_key"] == 1 and summary.bad.counts["empty_text"] == 1
    assert summary.bad.locations["missing_key"] == [f"{path}:2"]
    tok = GLMTokenizer(tiny_tokenizer_model)
    for key in ("title", "text"):
        ds = IndexedDataset(summary.outputs[key])
        assert [ds[i].tolist() for i in range(len(ds))] == [
            tok.encode(rows[i][key]) for i in (0, 3)
        ]


def test_chunks_in_flight_are_bounded(
    demo_corpus_path: Path,
    tiny_tokenizer_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory stays flat: however long the corpus, only a few chunks are alive at once."""
    import megatron_glm.data.preprocess as module

    live = {"now": 0, "max": 0, "total": 0}
    real_iter = module.iter_chunks

    def counting_iter(*args: object) -> Iterator[object]:
        for chunk in real_iter(*args):  # type: ignore[arg-type]
            live["now"] += 1
            live["total"] += 1
            live["max"] = max(live["max"], live["now"])
            weakref.finalize(chunk, lambda: live.__setitem__("now", live["now"] - 1))
            yield chunk

    monkeypatch.setattr(module, "iter_chunks", counting_iter)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"".join(_demo_lines(demo_corpus_path, 60)) * 4)
    _run(path, tmp_path / "m", tiny_tokenizer_model, split_sentences=True, chunk_bytes=2048)
    assert live["total"] > 50
    assert live["max"] <= 4, live  # 2 submitted per worker (1 worker), one being read, one spare
    assert live["now"] == 0


def test_resolve_inputs_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--input '.*nothing\*\.jsonl' matches no file"):
        resolve_inputs([str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(ValueError, match=r"--input '.*missing\.jsonl': no such file"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.jsonl").write_text("")
    assert resolve_inputs([str(tmp_path / "x.jsonl")] * 2) == [tmp_path / "x.jsonl"]


@pytest.mark.slow
def test_cli_end_to_end_and_merge(
    corpus: dict, tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer, tmp_path: Path
) -> None:
    """The real CLIs: preprocess_data.py prints the summary; merge_datasets.py concatenates."""
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus["path"]),
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer-model",
        str(tiny_tokenizer_model),
        "--workers",
        "2",
        "--append-eod",
        "--split-sentences",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    n_docs = len(corpus["texts"])
    assert res.stdout.startswith(f"documents: {n_docs}  sentences: ")
    assert f"bad lines: {len(BAD_LINES)}\n" in res.stdout
    assert "preprocess" in res.stderr  # the progress bar
    prefix = str(tmp_path / "cli_text_sentence")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "merge_datasets.py"),
            "--input",
            prefix,
            prefix,
            "--output-prefix",
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    merged = IndexedDataset(tmp_path / "merged")
    single = IndexedDataset(prefix)
    assert merged.num_documents == 2 * n_docs
    assert np.array_equal(merged.tokens, np.concatenate([single.tokens, single.tokens]))
    assert f"documents={2 * n_docs}" in res.stdout
    bad = subprocess.run(
        [*cmd[:3], str(tmp_path / "nope.jsonl"), *cmd[4:]], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "nope.jsonl': no such file" in bad.stderr


@pytest.mark.parametrize(
    "line",
    [
        b'{"text": "a"}\n',
        b'{"text": "a"}\r\n',
        b'  {"text": "leading space"}\n',
        b'{"text": "a"}  \t\n',
        b'{"text": "a"}\x0b\n',  # whitespace to str.isspace, not to JSON
        b'"just a string"\n',
        b"17",
        b'{"text": "a"} {"text": "b"}\n',
        b'{"text": "a",}\n',
        b'{"text": "a", "text": "b"}\n',  # duplicate key: the last wins
        b"\n",
        b"",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"text": "bad \\x escape"}',
        b'{"text": "raw\tcontrol"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "pair \\ud83d\\ude00 ok"}',
        b'{"text": "caf\xe9"}',  # latin-1, not UTF-8
        b'\xef\xbb\xbf{"text": "BOM"}',
        b"NaN",
        b'{"n": 1e400}',
        b'{"text": 123456789012345678901234567890}',  # orjson: a float; a non-string either way
        '{"text": "raw \u2028 and \u00e9"}'.encode(),
    ],
)
def test_parse_line_agrees_with_json_loads(line: bytes) -> None:
    """orjson parses first and json decides every line orjson rejects: each error must be
    exactly ``json.loads``'s, each value too except past-64-bit integers (orjson makes them
    floats), where the line's bad-line reason must still be the same."""
    from megatron_glm.data.jsonl import check_text, parse_line

    try:
        expected: object = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        with pytest.raises(type(e)) as info:
            parse_line(line)
        assert str(info.value) == str(e)
    else:
        got = parse_line(line)
        if b"1234567890123456789012" in line:  # same reason; the detail names float, not int
            assert check_text(got, "text")[0] == check_text(expected, "text")[0] == "non_string"
        else:
            assert json.dumps(got) == json.dumps(expected)  # NaN != NaN, "NaN" == "NaN"


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_compiled_flatten_equals_numpy(dtype: type) -> None:
    """The compiled copy of the id lists gives numpy's array, eod handling included."""
    from megatron_glm.data.native import NATIVE
    from megatron_glm.data.preprocess import _flatten

    assert NATIVE is not None, "megatron_glm.data._native was not built (pip install -e .)"
    rng = np.random.default_rng(0)
    top = int(np.iinfo(dtype).max)
    ids = [
        rng.integers(0, top, size=rng.integers(0, 30), endpoint=True).tolist() for _ in range(500)
    ]
    per_doc = np.array([3, 1, 196, 300], dtype=np.int64)
    fast = _flatten([list(x) for x in ids], per_doc, 7, np.dtype(dtype))
    slow = _flatten([list(x) for x in ids], per_doc, 7, np.dtype(dtype), use_native=False)
    assert fast[0].dtype == slow[0].dtype == dtype
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
    assert fast[1].sum() == sum(map(len, ids)) + len(per_doc)
    assert np.array_equal(fast[0][np.cumsum(fast[1]) - 1][np.cumsum(per_doc) - 1], [7] * 4)


@pytest.mark.parametrize("use_native", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("bad_id", [70_000, -1])
def test_flatten_rejects_ids_outside_the_dtype(use_native: bool, bad_id: int) -> None:
    from megatron_glm.data.preprocess import _flatten

    ids = [[1, 2], [3, bad_id, 4]]
    with pytest.raises(OverflowError):
        _flatten(ids, np.array([2]), None, np.dtype(np.uint16), use_native=use_native)


def test_compiled_split_errors() -> None:
    from megatron_glm.data.native import NATIVE

    assert NATIVE is not None
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes, not a str"):
        NATIVE.split_sentences(["ok.", b"x"], np.empty(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"counts must be int64 \[2\]"):
        NATIVE.split_sentences(["a", "b"], np.empty(3, dtype=np.int64))
    with pytest.raises(TypeError):
        NATIVE.split_sentences(("a",), np.empty(1, dtype=np.int64))


def test_compiled_scan_errors() -> None:
    from megatron_glm.data.native import NATIVE

    assert NATIVE is not None
    with pytest.raises(ValueError, match=r"prefixes\[1\] is not a non-empty str"):
        NATIVE.starting_with(["a"], ("a", ""))
    with pytest.raises(TypeError, match=r"texts\[0\] is int, not a str"):
        NATIVE.starting_with([3], ("a",))
    with pytest.raises(ValueError, match=r"lengths must be int64 \[2\]"):
        NATIVE.row_lengths([[1], [2]], np.empty(1, dtype=np.int64))
    lengths = np.empty(3, dtype=np.int64)
    assert NATIVE.row_lengths([[1, 2], [], [3]], lengths) == 3 and lengths.tolist() == [2, 0, 1]


def test_compiled_flatten_errors() -> None:
    from megatron_glm.data.native import NATIVE

    assert NATIVE is not None
    out = np.empty(4, dtype=np.uint16)
    with pytest.raises(TypeError, match=r"ids\[1\] is tuple, not a list"):
        NATIVE.flatten_ids([[1], (2,)], out, 0, 65535)
    with pytest.raises(TypeError, match="token id 'x' is not an int"):
        NATIVE.flatten_ids([[1, "x"]], out, 0, 65535)
    with pytest.raises(ValueError, match=r"out holds 4 ids; ids\[1\] needs more"):
        NATIVE.flatten_ids([[1, 2], [3, 4, 5]], out, 0, 65535)
    with pytest.raises(ValueError, match="itemsize 8"):
        NATIVE.flatten_ids([[1]], np.empty(1, dtype=np.int64), 0, 65535)
    with pytest.raises(OverflowError, match=r"token id 2\*\*70|outside"):
        NATIVE.flatten_ids([[2**70]], out, 0, 65535)
    assert NATIVE.flatten_ids([[5, 6], [], [7]], out, 0, 65535) == 3
    assert out[:3].tolist() == [5, 6, 7]
