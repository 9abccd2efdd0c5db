"""The one JSONL reader: the preprocessor and the tokenizer trainer drop and report the same lines.

Every verdict of the reader (bad-line reasons, ``.gz`` cut short, strict mode) is checked in
detail through the preprocessor (test_preprocess.py) and the trainer (test_tokenizer.py); here
the two tools meet on one file, and the plain-text mode only the trainer uses is checked.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from megatron_glm.data.jsonl import BadLineError, BadLines, read_texts
from megatron_glm.data.preprocess import preprocess_data
from megatron_glm.data.tokenizer_training import train_tokenizer

BAD = [
    b'{"text": "caf\xe9"}\n',
    b"\n",
    b'{"text": 3}\n',
    b'{"body": "x"}\n',
    b'{"text": ""}\n',
    b'{"text": "a\\ud800b"}\n',
]


def test_trainer_and_preprocessor_drop_the_same_lines(
    tmp_path: Path, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> None:
    good = demo_corpus_path.read_bytes().splitlines(keepends=True)[:100]
    lines = [*good[:7], *BAD[:3], *good[7:50], *BAD[3:], *good[50:]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(lines))
    pre = preprocess_data([path], tmp_path / "out", tiny_tokenizer_model, progress=False)
    trained = train_tokenizer([path], tmp_path / "tok", 400, threads=1)
    assert trained["bad_lines"] == pre.bad
    assert pre.bad.locations == {
        "invalid_utf8": [f"{path}:8", f"{path}:56"],
        "invalid_json": [f"{path}:9"],
        "missing_key": [f"{path}:54"],
        "non_string": [f"{path}:10"],
        "empty_text": [f"{path}:55"],
    }
    assert pre.documents == len(good) == len(list(read_texts(path, "text", BadLines())))


def test_plain_text_lines(tmp_path: Path) -> None:
    """Plain text: one text per line without its line break (CRLF too); a blank line is an
    empty text, not a bad line; only bytes that are not UTF-8 make a line bad."""
    content = b"first line\r\n\nthird \xff line\n  fourth\n\xe2\x80\xa8 fifth"
    for name, data in [("a.txt", content), ("a.txt.gz", gzip.compress(content, mtime=0))]:
        path = tmp_path / name
        path.write_bytes(data)
        bad = BadLines()
        assert list(read_texts(path, None, bad)) == ["first line", "", "  fourth", "\u2028 fifth"]
        assert bad.counts["invalid_utf8"] == 1 and bad.locations["invalid_utf8"] == [f"{path}:3"]
        message = f"{path}:3: invalid UTF-8: byte 6: invalid start byte"
        with pytest.raises(BadLineError, match=f"^{message}$"):
            list(read_texts(path, None, BadLines(strict=True)))
