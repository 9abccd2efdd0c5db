"""A Hugging Face tokenizer folder (``tokenizer.json``) with GLM's special tokens.

Why: THUDM's published GLM models do not use SentencePiece: glm-large has BERT's uncased
WordPiece vocabulary and glm-10b / glm-roberta GPT-2's byte-level BPE. A model imported from
them must train, preprocess and fill blanks on its own vocabulary, so ``data.tokenizer_model``
may name a folder holding a ``tokenizer.json`` (the ``tokenizers`` library's format, which
``transformers`` writes for every fast tokenizer), and :class:`HFTokenizer` gives it the
interface of :class:`megatron_glm.data.tokenizer.GLMTokenizer`
(:func:`megatron_glm.data.tokenizer.load_tokenizer` picks the class by file vs folder).

Special tokens get the ids THUDM's own tokenizers give them (THUDM/GLM
``data_utils/tokenization.py``, ``BertWordPieceTokenizer`` and ``GPT2BPETokenizer`` with
``add_block_symbols`` and ``add_task_mask``), so an imported glm-large / glm-10b /
glm-roberta model reads and writes the ids its embedding rows were trained on. The vocabulary's
own specials tell which tokenizer it is (:data:`THUDM_SCHEMES`):

* BERT WordPiece (``[PAD]``, ``[CLS]``, ``[MASK]``): cls ``[CLS]`` and mask ``[MASK]`` keep their
  ids, eos (= pad) is ``[PAD]`` (THUDM's ``eos`` command token), then ``<|startofpiece|>``,
  ``<|endofpiece|>``, ``[gMASK]``, ``[sMASK]`` are appended: 30522..30525 for glm-large.
* RoBERTa BPE (``<s>``, ``</s>``, ``<mask>``): cls ``<s>``, eos ``</s>``, mask ``<mask>``; then
  sop, eop, gMASK, sMASK appended.
* GPT-2 BPE (``<|endoftext|>``): eos keeps its id, then sop, eop, ``[CLS]``, ``[MASK]``,
  ``[SEP]``, ``[UNK]``, ``[gMASK]``, ``[sMASK]`` appended (50257..50264 for glm-10b; ``[SEP]``
  and ``[UNK]`` only hold their places).
* Any other vocabulary: the GLM specials it lacks are appended in :data:`SPECIAL_TOKENS` order.

:meth:`HFTokenizer.special_tokens` names each GLM special's spelling in the vocabulary (eos is
``[PAD]`` for BERT). All spellings are registered as special tokens that the normaliser does
not touch, so ``[sMASK]`` stays one id under BERT's lower-casing and ``[MASK]`` is not split by
its punctuation rule. The appended rows usually fall inside the padded vocabulary (glm-large's
30522 -> 30592).

Encoding adds no template tokens (no BERT ``[CLS] ... [SEP]``): GLM's data pipeline places its
own. The round trip is as exact as the vocabulary allows: byte-level BPE gives back the text;
BERT's uncased WordPiece gives lower-cased text with its spacing rules, which is what THUDM's
models saw in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from megatron_glm.data.tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    SpecialIdsMixin,
    TokenizerError,
)

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
        self.scheme = _scheme(self._tok)
        self._spelled = {t: self.scheme.spelled.get(t, t) for t in SPECIAL_TOKENS}
        appended = self.scheme.appended or tuple(
            t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None
        )
        self._tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in appended]
            + [AddedToken(t, special=True, normalized=False) for t in self._spelled.values()]
        )
        _check_appended_order(self._tok, appended, self.model_path)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.base_vocab_size: int = (
            _token_id(self._tok, appended[0]) if appended else self.vocab_size
        )
        """The vocabulary's own size: GLM's appended specials start at this id (also when the
        file already holds them, as a converted or exported ``tokenizer.json`` does)."""
        multiple = make_vocab_size_divisible_by * tp
        self.padded_vocab_size: int = -(-self.vocab_size // multiple) * multiple
        self._set_special_ids({t: _token_id(self._tok, v) for t, v in self._spelled.items()})
        self.unk_id: int = next(
            (i for t in _UNK_TOKENS if (i := self._tok.token_to_id(t)) is not None), self.eos_id
        )

    def special_tokens(self) -> dict[str, str]:
        """``{GLM special: its spelling in this vocabulary}``, e.g. ``<|endoftext|>: [PAD]`` for
        BERT's (the text that encodes to ``special_ids()[GLM special]``)."""
        return dict(self._spelled)

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


@dataclass(frozen=True)
class SpecialScheme:
    """How one of THUDM's tokenizers places GLM's special tokens (module docstring)."""

    name: str
    needs: tuple[str, ...]
    """Vocabulary tokens that identify the tokenizer (all must be present)."""
    spelled: dict[str, str]
    """GLM special -> the vocabulary token THUDM uses for it (keeps that token's id)."""
    appended: tuple[str, ...]
    """Tokens appended after the vocabulary, in THUDM's order; empty: the GLM specials the
    vocabulary lacks, in :data:`SPECIAL_TOKENS` order (not one of THUDM's tokenizers)."""


_SOP, _EOP = "<|startofpiece|>", "<|endofpiece|>"
THUDM_SCHEMES: tuple[SpecialScheme, ...] = (
    # THUDM/GLM data_utils/tokenization.py, BertWordPieceTokenizer: eos and pad are '[PAD]',
    # then sop, eop at len(vocab), +1 and (add_task_mask) gMASK, sMASK at +2, +3.
    SpecialScheme(
        "bert",
        ("[PAD]", "[CLS]", "[MASK]"),
        {EOS_TOKEN: "[PAD]"},
        (_SOP, _EOP, "[gMASK]", "[sMASK]"),
    ),
    # GPT2BPETokenizer for 'roberta': ENC '<s>', eos '</s>', MASK '<mask>'; sop, eop, gMASK, sMASK.
    SpecialScheme(
        "roberta",
        ("<s>", "</s>", "<mask>"),
        {"[CLS]": "<s>", "[MASK]": "<mask>", EOS_TOKEN: "</s>"},
        (_SOP, _EOP, "[gMASK]", "[sMASK]"),
    ),
    # GPT2BPETokenizer for 'gpt2': eos '<|endoftext|>'; sop, eop, ENC '[CLS]', MASK, sep '[SEP]',
    # unk '[UNK]' at len(encoder) + 0..5, then gMASK, sMASK at + 6, 7.
    SpecialScheme(
        "gpt2",
        (EOS_TOKEN,),
        {},
        (_SOP, _EOP, "[CLS]", "[MASK]", "[SEP]", "[UNK]", "[gMASK]", "[sMASK]"),
    ),
)
_OTHER = SpecialScheme("glm", (), {}, ())


def _scheme(tok: Tokenizer) -> SpecialScheme:
    """The first of :data:`THUDM_SCHEMES` whose tokens the vocabulary holds, else GLM's own."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return next((s for s in THUDM_SCHEMES if all(t in vocab for t in s.needs)), _OTHER)


def _check_appended_order(tok: Tokenizer, appended: tuple[str, ...], folder: Path) -> None:
    """The appended tokens hold consecutive ids in their order (true when they were new, and
    when a converted folder already holds them as THUDM placed them): anything else would give
    the model other rows than it was trained with."""
    ids = [_token_id(tok, t) for t in appended]
    if ids and ids != list(range(ids[0], ids[0] + len(ids))):
        found = ", ".join(f"{t} {i}" for t, i in zip(appended, ids, strict=True))
        raise TokenizerError(
            f"{folder / TOKENIZER_FILE} holds GLM's special tokens out of THUDM's order "
            f"({found}; expected consecutive ids in this order)"
        )


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
