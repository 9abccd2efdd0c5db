"""A ``tokenizer.json`` from THUDM's slow-tokenizer files (``vocab.txt``, ``vocab.json`` +
``merges.txt``), GLM's special tokens at THUDM's ids.

Why: THUDM's published folders hold no ``tokenizer.json``. glm-large ships BERT's uncased
WordPiece ``vocab.txt`` (``GLMBertTokenizer``), glm-10b and glm-roberta GPT-2 byte-level BPE
``vocab.json`` + ``merges.txt`` (``GLMGPT2Tokenizer``), read through their remote code. An
imported model must train and fill blanks on that vocabulary, so ``from-hf`` converts them with
``transformers``' own slow -> fast conversion (the ``tokenizers`` pipeline that reproduces the slow
``BertTokenizer`` / ``GPT2Tokenizer``: BERT's basic tokenizer + WordPiece, GPT-2's byte-level
pre-tokenizer + BPE) and saves the result with GLM's specials added by
:class:`~megatron_glm.data.hf_tokenizer.HFTokenizer`, which places them as THUDM's tokenizers did
(its module docstring). ``do_lower_case`` is the folder's ``tokenizer_config.json`` value when it
names one, else true (glm-large is uncased, as THUDM's ``BertWordPieceTokenizer`` defaults).

If the folder has an ``added_tokens.json`` (a ``transformers`` save of the slow tokenizer's added
tokens), every token it names that the converted tokenizer also holds must have the same id: a
folder whose specials sit elsewhere is refused rather than silently re-numbered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_glm.data.hf_tokenizer import TOKENIZER_FILE, HFTokenizer
from megatron_glm.data.tokenizer import TokenizerError

VOCAB_FILES = {"wordpiece": ("vocab.txt",), "bpe": ("vocab.json", "merges.txt")}
"""THUDM's slow-tokenizer files, by kind."""


def vocab_kind(src: Path) -> str | None:
    """``"wordpiece"`` / ``"bpe"`` when the folder holds that kind's files, else None."""
    for kind, names in VOCAB_FILES.items():
        if all((src / name).is_file() for name in names):
            return kind
    return None


def convert_vocab_files(src: Path, out: Path) -> Path:
    """Write ``out/tokenizer.json`` from the folder's slow-tokenizer files and return ``out``.

    Raises :class:`TokenizerError` naming the file when the files do not load or when the
    folder's ``added_tokens.json`` disagrees with THUDM's ids.
    """
    kind = vocab_kind(src)
    if kind is None:
        raise TokenizerError(f"{src}: no vocab.txt and no vocab.json + merges.txt to convert")
    fast = _fast_tokenizer(src, kind)
    size, converted = _file_vocab_size(src, kind), fast.backend_tokenizer.get_vocab_size(True)
    if converted != size:  # the class added a default special the file lacks: ids would shift
        raise TokenizerError(
            f"{src / VOCAB_FILES[kind][0]}: {size} tokens but the conversion holds {converted}"
        )
    out.mkdir(parents=True, exist_ok=True)
    fast.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    tok = HFTokenizer(out)  # GLM's specials added at THUDM's ids
    tok.tokenizer.save(str(out / TOKENIZER_FILE))
    _check_added_tokens(src, tok)
    return out


def _fast_tokenizer(src: Path, kind: str) -> Any:
    """``transformers``' fast tokenizer converted from the slow files (5.x: ``BertTokenizer`` and
    ``GPT2Tokenizer`` are the ``tokenizers``-backed classes)."""
    from transformers import BertTokenizer, GPT2Tokenizer

    try:
        if kind == "wordpiece":
            lower = _tokenizer_config(src).get("do_lower_case", True)
            return BertTokenizer(vocab=str(src / "vocab.txt"), do_lower_case=bool(lower))
        return GPT2Tokenizer(
            vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), **_bpe_specials(src)
        )
    except Exception as e:  # the library raises several types for a malformed file
        files = " + ".join(str(src / n) for n in VOCAB_FILES[kind])
        raise TokenizerError(f"{files}: not a {kind} vocabulary ({type(e).__name__}: {e})") from e


def _bpe_specials(src: Path) -> dict[str, Any]:
    """GPT2Tokenizer's unk/bos/eos default to ``<|endoftext|>``, which RoBERTa's vocabulary
    lacks (it would be added as a new id): name RoBERTa's own, or none."""
    vocab = _read_json(src / "vocab.json")
    if "<|endoftext|>" in vocab:
        return {}
    roles = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return {role: token if token in vocab else None for role, token in roles.items()}


def _file_vocab_size(src: Path, kind: str) -> int:
    if kind == "wordpiece":
        return len((src / "vocab.txt").read_text(encoding="utf-8").splitlines())
    return len(_read_json(src / "vocab.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: top level must be an object")
    return obj


def _tokenizer_config(src: Path) -> dict[str, Any]:
    path = src / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def _check_added_tokens(src: Path, tok: HFTokenizer) -> None:
    path = src / "added_tokens.json"
    if not path.is_file():
        return
    for token, i in _read_json(path).items():
        ours = tok.tokenizer.token_to_id(str(token))
        if ours is not None and ours != i:
            raise TokenizerError(
                f"{path}: {token!r} has id {i} there but {ours} in THUDM's order "
                f"({tok.scheme.name} vocabulary); not converted"
            )
