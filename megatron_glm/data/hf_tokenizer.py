"""A Hugging Face tokenizer folder (``tokenizer.json``) with GLM's special tokens.

Why: THUDM's published GLM models do not use SentencePiece: glm-large has BERT's uncased
WordPiece vocabulary and glm-10b / glm-roberta GPT-2's byte-level BPE. A model imported from
them must train, preprocess and fill blanks on its own vocabulary, so ``data.tokenizer_model``
may name a folder holding a ``tokenizer.json`` (the ``tokenizers`` library's format, which
``transformers`` writes for every fast tokenizer), and :class:`HFTokenizer` gives it the
interface of :class:`megatron_glm.data.tokenizer.GLMTokenizer`
(:func:`megatron_glm.data.tokenizer.load_tokenizer` picks the class by file vs folder).

Special tokens follow THUDM's convention: a GLM special token the vocabulary already holds keeps
its id (BERT's ``[CLS]`` and ``[MASK]``, GPT-2's ``<|endoftext|>``), and the others are
appended after the vocabulary in :data:`SPECIAL_TOKENS` order, so the embedding grows by a few
rows (the padded vocabulary usually absorbs them, as glm-large's 30522 -> 30592 did). All are
registered as special tokens that the normaliser does not touch, so ``[sMASK]`` stays one id
under BERT's lower-casing and ``[MASK]`` is not split by its punctuation rule. Padding is eos,
as for SentencePiece models.

Encoding adds no template tokens (no BERT ``[CLS] ... [SEP]``): GLM's data pipeline places its
own. The round trip is as exact as the vocabulary allows: byte-level BPE gives back the text;
BERT's uncased WordPiece gives lower-cased text with its spacing rules, which is what THUDM's
models saw in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from megatron_glm.data.tokenizer import SPECIAL_TOKENS, SpecialIdsMixin, TokenizerError

TOKENIZER_FILE = "tokenizer.json"
_UNK_TOKENS = ("[UNK]", "<unk>")
"""Unknown-token spellings looked up for ``unk_id``; byte-level BPE has none (eos stands in)."""


class HFTokenizer(SpecialIdsMixin):
    """GLM's tokenizer interface over a ``tokenizer.json`` (see module docstring).

    Picklable (``tokenizers`` serialises its model), so preprocessing workers can receive one.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        make_vocab_size_divisible_by: int = 128,
        tp: int = 1,
    ) -> None:
        if make_vocab_size_divisible_by < 1 or tp < 1:
            raise ValueError(
                f"make_vocab_size_divisible_by and tp must be >= 1, got "
                f"{make_vocab_size_divisible_by} and {tp}"
            )
        self.model_path = Path(folder)
        self._tok = _read(self.model_path)
        self.base_vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self._tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        multiple = make_vocab_size_divisible_by * tp
        self.padded_vocab_size: int = -(-self.vocab_size // multiple) * multiple
        self._set_special_ids({t: _token_id(self._tok, t) for t in SPECIAL_TOKENS})
        self.unk_id: int = next(
            (i for t in _UNK_TOKENS if (i := self._tok.token_to_id(t)) is not None), self.eos_id
        )

    @property
    def tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (GLM's specials added)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their single id."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``[encode(t) for t in texts]`` by the library's Rust thread pool (its size is set by
        ``RAYON_NUM_THREADS``; ``num_threads`` is accepted for GLMTokenizer's signature)."""
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encoded]

    def encode_pieces(
        self, pieces: list[str], per_doc: np.ndarray, num_threads: int = -1
    ) -> list[list[int]]:
        """Ids of documents given in pieces (``per_doc`` pieces each): every piece is encoded
        alone. WordPiece and byte-level BPE have no dummy prefix to drop: a piece that keeps
        the whitespace before it encodes that whitespace as the whole document would."""
        assert int(np.sum(per_doc)) == len(pieces), "per_doc must count every piece"
        return self.encode_batch(pieces, num_threads)

    def _check_id(self, i: int, where: str) -> None:
        if not 0 <= i < self.padded_vocab_size:
            raise TokenizerError(
                f"token id {i}{where} is outside [0, {self.padded_vocab_size}) "
                f"(padded vocab of {self.model_path})"
            )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``: special tokens as their text, padding rows as ``<pad:ID>``.

        Raises :class:`TokenizerError` for an id outside ``[0, padded_vocab_size)``.
        """
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise TokenizerError(f"decode expects a 1-D array of ids, got shape {ids.shape}")
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []
        for pos, i in enumerate(int(i) for i in ids):
            self._check_id(i, f" at position {pos}")
            if i < self.vocab_size:
                run.append(i)
                continue
            if run:
                parts.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
            parts.append(f"<pad:{i}>")
        if run:
            parts.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(parts)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary token of id ``i``; ``<pad:ID>`` for padding rows."""
        self._check_id(i, "")
        return str(self._tok.id_to_token(i)) if i < self.vocab_size else f"<pad:{i}>"


def _token_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    assert i is not None, f"{token} was just added"
    return int(i)


def _read(folder: Path) -> Tokenizer:
    """The folder's ``tokenizer.json``; a clear error naming the folder when it is unusable."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer folder {folder} has no {TOKENIZER_FILE} (save a Hugging Face fast "
            f"tokenizer with save_pretrained, or train one with the tokenizers library)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise TokenizerError(f"{path} is not a tokenizers file: {e}") from e
