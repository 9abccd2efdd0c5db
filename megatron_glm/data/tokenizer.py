"""GLM tokenizer: a SentencePiece model with GLM's special tokens, ``<|endoftext|>`` its eos.

Design decisions (the trainer, :func:`megatron_glm.data.tokenizer_training.train_tokenizer`,
and the reader, :class:`GLMTokenizer`, agree on them; any SentencePiece model holding the
specials as below loads):

* **Special tokens** (:data:`SPECIAL_TOKENS`): training reserves them at ids 1..7, right after
  ``<unk>`` = 0, so every model trained here shares the same special ids, and
  :class:`GLMTokenizer` encodes each one inside a text as exactly one id. All but the last are
  SentencePiece *user-defined symbols*, which SentencePiece itself matches in raw text before
  segmentation. The last, ``<|endoftext|>`` (:data:`EOS_TOKEN`), GLM's end of text, is
  SentencePiece's **eos** (``eos_id`` 7, ``eos_piece``), so every tool that reads the model
  finds it: Megatron-LM's SentencePiece tokenizers take ``eod = eos_id()`` (with ``-1`` there,
  ``--append-eod`` wrote id -1). SentencePiece requires its eos to be a *control* symbol, which
  it never produces from text and decodes to ``""``; :class:`GLMTokenizer` restores the
  user-defined behaviour around it: the text ``<|endoftext|>`` inside a text encodes to the eos
  id (the parts around it encoded as SentencePiece does around a user-defined symbol) and the
  eos id decodes to ``<|endoftext|>``. Plain SentencePiece (Megatron-LM) encodes that text as
  characters, so a corpus cannot plant an eos there. Models trained before, with the token
  user-defined and ``eos_id = -1``, load and behave the same. ``<s>`` and ``<pad>`` are disabled
  (``bos_id = pad_id = -1``; SentencePiece refuses a pad sharing eos's id): our pad is eos
  (pad positions are never attended and never in the loss, so sharing is safe).
* **Exact round trip**: ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``
  and ``byte_fallback=True``, so ``decode(encode(text)) == text`` for every string. NFKC (the
  SentencePiece default) would rewrite ligatures, full-width forms and collapse runs of spaces,
  which breaks code examples in docstrings and any alignment between generated text and source
  characters. Byte fallback maps characters outside the learned vocabulary to their UTF-8 bytes
  (pieces ``<0x00>``..``<0xFF>``, 256 ids) instead of ``<unk>``, so newlines, tabs and rare
  symbols survive. Cost: 256 ids of the vocabulary, and no Unicode folding of variants. The
  trainer feeds SentencePiece one line at a time, so a newline inside a document encodes as the
  byte piece ``<0x0A>``: still exactly one id.
* **Dummy prefix**: SentencePiece prepends a ``▁`` (space) to every text so a word at the start
  looks like the same word after a space, and ``decode`` drops the leading ``▁`` again. When a
  text *starts with* a special token the dummy ``▁`` precedes nothing but the special token and
  carries no information, and it would make ``encode("[MASK]")`` two ids, so
  :meth:`GLMTokenizer.encode` drops it in exactly that case; ``decode`` gives back the same text
  either way. A document given in pieces (preprocess with ``--split-sentences``: sentences that
  keep the whitespace before them) must get the dummy ``▁`` only on its first piece, or every
  later piece would gain a space: :meth:`GLMTokenizer.encode_pieces` encodes the later pieces
  with a copy of the model whose dummy prefix is switched off, so the ids of the pieces, put
  together, decode to the document exactly.
* **Padded vocabulary**: the embedding has ``padded_vocab_size`` rows, a multiple of
  ``make_vocab_size_divisible_by * tp`` (every tensor-parallel shard gets an equal, aligned
  slice). Rows ``>= vocab_size`` are never produced by ``encode``; ``decode`` renders such an id
  as ``<pad:ID>`` (a model may still sample one before it learns not to), and raises
  :class:`TokenizerError` for ids outside ``[0, padded_vocab_size)``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from megatron_glm.data.native import NATIVE

SPECIAL_TOKENS: tuple[str, ...] = (
    "[CLS]",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "<|startofpiece|>",
    "<|endofpiece|>",
    "<|endoftext|>",
)
"""GLM's special tokens, in the order the trainer reserves them (ids 1..7)."""
EOS_TOKEN = SPECIAL_TOKENS[-1]
"""``<|endoftext|>``: end of text, eos = pad; SentencePiece's eos in models trained here."""
_SPECIAL_FIRST_CHARS = frozenset(token[0] for token in SPECIAL_TOKENS)

_SPECIAL_ATTRS: tuple[str, ...] = (
    "cls_id",
    "mask_id",
    "smask_id",
    "gmask_id",
    "sop_id",
    "eop_id",
    "eos_id",
)


class TokenizerError(ValueError):
    """A tokenizer model or tokenizer-training input is unusable; the message names the file."""


class SpecialIdsMixin:
    """GLM's special-token ids as attributes (``cls_id`` .. ``eos_id``, ``pad_id`` = eos),
    :meth:`special_ids` and the id range check: one definition for every tokenizer backend,
    which only looks the :data:`SPECIAL_TOKENS` up in its vocabulary and calls
    :meth:`_set_special_ids`."""

    padded_vocab_size: int
    model_path: Path

    cls_id: int
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    eos_id: int
    pad_id: int
    _special_ids: dict[str, int]

    def _set_special_ids(self, ids: dict[str, int]) -> None:
        for attr, token in zip(_SPECIAL_ATTRS, SPECIAL_TOKENS, strict=True):
            setattr(self, attr, int(ids[token]))
        self.pad_id = self.eos_id
        self._special_ids = {token: int(ids[token]) for token in SPECIAL_TOKENS}

    def special_ids(self) -> dict[str, int]:
        """``{token text: id}`` for the 7 :data:`SPECIAL_TOKENS` (pad is eos)."""
        return dict(self._special_ids)

    def _check_id(self, i: int, where: str) -> None:
        if not 0 <= i < self.padded_vocab_size:
            raise TokenizerError(
                f"token id {i}{where} is outside [0, {self.padded_vocab_size}) "
                f"(padded vocab of {self.model_path})"
            )


class GLMTokenizer(SpecialIdsMixin):
    """Encode/decode with GLM's special ids over a SentencePiece model (see module docstring).

    Instances are picklable (SentencePiece serialises its model proto), so worker processes can
    receive one.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        make_vocab_size_divisible_by: int = 128,
        tp: int = 1,
    ) -> None:
        if make_vocab_size_divisible_by < 1:
            raise ValueError(
                f"make_vocab_size_divisible_by must be >= 1, got {make_vocab_size_divisible_by}"
            )
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TokenizerError(f"tokenizer model {self.model_path} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"tokenizer model {self.model_path} is not a SentencePiece model: {e}"
            ) from e
        self.vocab_size: int = self._sp.get_piece_size()
        multiple = make_vocab_size_divisible_by * tp
        self.padded_vocab_size: int = -(-self.vocab_size // multiple) * multiple
        self.unk_id: int = self._sp.unk_id()
        ids = self._find_special_ids()
        self._set_special_ids(ids)
        self._eos_is_control: bool = self._sp.is_control(self.eos_id)
        self._dummy_prefix = self._check_specials_encode_alone(ids)
        self._sp_continuing: spm.SentencePieceProcessor | None = None  # see _continuing()

    def _find_special_ids(self) -> dict[str, int]:
        """Look every special token up; one error listing all that are missing."""
        ids: dict[str, int] = {}
        missing: list[str] = []
        for token in SPECIAL_TOKENS:
            i = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(i) != token:  # piece_to_id answers unk_id when absent
                missing.append(token)
            ids[token] = i
        if missing:
            raise TokenizerError(
                f"tokenizer model {self.model_path} lacks GLM special token(s) "
                f"{', '.join(missing)}; train it with tools/train_tokenizer.py, which reserves "
                f"them at ids 1..{len(SPECIAL_TOKENS)}"
            )
        return ids

    def _check_specials_encode_alone(self, ids: dict[str, int]) -> tuple[int, ...]:
        """Return the model's dummy-prefix ids; verify each special alone encodes to one id.

        A special token stored as a normal or control piece (not user-defined) would be split
        into several pieces when it appears in text, which blank infilling cannot tolerate; the
        one exception is :data:`EOS_TOKEN` as a control symbol (SentencePiece's eos), which
        :meth:`encode` matches itself.
        """
        prefix = tuple(self._sp.encode(SPECIAL_TOKENS[0])[:-1])
        for token in SPECIAL_TOKENS:
            if token == EOS_TOKEN and self._eos_is_control:
                continue
            got = self._sp.encode(token)
            if tuple(got[: len(prefix)]) != prefix or got[len(prefix) :] != [ids[token]]:
                kind = "user-defined symbol"
                if token == EOS_TOKEN:
                    kind += " or a control symbol (SentencePiece's eos)"
                raise TokenizerError(
                    f"tokenizer model {self.model_path}: special token {token} encodes to "
                    f"{self._sp.encode(token, out_type=str)}, not one id; it must be a "
                    f"SentencePiece {kind}"
                )
        return prefix

    @property
    def sentencepiece(self) -> spm.SentencePieceProcessor:
        """The underlying processor (for raw-speed baselines; prefer the methods here)."""
        return self._sp

    def _drop_dummy_prefix(self, text: str, ids: list[int]) -> list[int]:
        k = len(self._dummy_prefix)
        if k and text.startswith(SPECIAL_TOKENS) and tuple(ids[:k]) == self._dummy_prefix:
            return ids[k:]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their single id."""
        if self._eos_is_control and EOS_TOKEN in text:
            return self._encode_around_eos(text, continuing=False)
        return self._drop_dummy_prefix(text, self._sp.encode(text))

    def _encode_around_eos(self, text: str, continuing: bool) -> list[int]:
        """Ids of a text holding :data:`EOS_TOKEN` when the model's eos is a control symbol: the
        parts between its occurrences encoded apart and joined by the eos id, as SentencePiece
        encodes around a user-defined symbol (the first part as the text starts, unless
        ``continuing``; the later ones as continuations, with no dummy prefix)."""
        first, *rest = text.split(EOS_TOKEN)
        if continuing:
            ids = self._continuing().encode(first)
        else:
            ids = self._drop_dummy_prefix(first, self._sp.encode(first))
        for part in rest:
            ids.append(self.eos_id)
            ids += self._continuing().encode(part)
        return ids

    def _eos_texts(self, texts: list[str]) -> Iterable[int]:
        """Indices of the texts that hold :data:`EOS_TOKEN`, if the model's eos is a control
        symbol (else none: SentencePiece matches it). A C-level scan: no Python call per text."""
        if not self._eos_is_control:
            return ()
        return compress(range(len(texts)), map(operator.contains, texts, repeat(EOS_TOKEN)))

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``[encode(t) for t in texts]`` computed by SentencePiece's C++ thread pool.

        ``num_threads=-1`` lets SentencePiece use all hardware threads.
        """
        texts = texts if isinstance(texts, list) else list(texts)
        out = self._sp.encode(texts, num_threads=num_threads)
        if self._dummy_prefix:
            for i in self._special_starts(texts):
                out[i] = self._drop_dummy_prefix(texts[i], out[i])
        for i in self._eos_texts(texts):
            out[i] = self._encode_around_eos(texts[i], continuing=False)
        return out

    def encode_pieces(
        self, pieces: list[str], per_doc: np.ndarray, num_threads: int = -1
    ) -> list[list[int]]:
        """Ids of documents given in consecutive pieces: ``per_doc[d]`` (int [D]) pieces make
        document ``d``, in order; one id list per piece.

        The first piece of a document is encoded as :meth:`encode` does, every later one as
        the text it continues (no dummy prefix), so the ids of a document's pieces, concatenated,
        decode to its pieces concatenated, exactly. Pieces that begin with the whitespace before
        them (as :func:`megatron_glm.data.sentence_split.split_sentences` cuts) also start where
        SentencePiece's segmentation of the whole document starts a piece anyway (``▁word``), so
        their ids are almost always the whole document's ids (docs/benchmarks.md).

        One model encodes all: the continuing copy, with a space put before each first piece in
        place of the dummy one (a first piece starting with a special token gets none, as in
        :meth:`encode`), by SentencePiece's C++ thread pool (``num_threads`` as
        :meth:`encode_batch`); the Python work is per document, not per piece.
        """
        texts = list(pieces)
        if self._dummy_prefix:
            counts = np.asarray(per_doc, dtype=np.int64)
            for i in (np.cumsum(counts) - counts)[counts > 0].tolist():
                if not texts[i].startswith(SPECIAL_TOKENS):
                    texts[i] = " " + texts[i]
        out = self._continuing().encode(texts, num_threads=num_threads)
        for i in self._eos_texts(texts):
            out[i] = self._encode_around_eos(texts[i], continuing=True)
        return out

    def _continuing(self) -> spm.SentencePieceProcessor:
        """The model with SentencePiece's dummy prefix switched off (built on first use): it
        encodes a text as it reads after other text (no ``▁`` put in front; ``encode(" " + t)``
        is the dummy-prefixed encoding of ``t``) and decodes a leading ``▁`` as a space.
        The flag is set in the model proto with SentencePiece's own schema module (transformers
        does the same to its SentencePiece tokenizers)."""
        if self._sp_continuing is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated
            proto.ParseFromString(self._sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_continuing = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._sp_continuing

    @staticmethod
    def _special_starts(texts: list[str]) -> Iterable[int]:
        """Indices of the texts that may start with a special token (exactly those, compiled).

        A scan in C (:mod:`megatron_glm.data.native`), else a C-level map over first characters
        (a superset; :meth:`_drop_dummy_prefix` checks each): a Python call per text cost a
        noticeable share of SentencePiece's own encode of short sentences (docs/benchmarks.md).
        """
        if NATIVE is not None:
            return NATIVE.starting_with(texts, SPECIAL_TOKENS)
        first = map(itemgetter(slice(0, 1)), texts)
        return compress(range(len(texts)), map(_SPECIAL_FIRST_CHARS.__contains__, first))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``: special tokens as their text (eos too, though SentencePiece decodes
        a control symbol to ``""``), padding rows as ``<pad:ID>``.

        ``<unk>`` renders as SentencePiece's ``" ⁇ "``. Raises :class:`TokenizerError` for an id
        outside ``[0, padded_vocab_size)``.
        """
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise TokenizerError(f"decode expects a 1-D array of ids, got shape {ids.shape}")
            ids = ids.tolist()
        id_list = [int(i) for i in ids]
        if not id_list:
            return ""
        eos = self.eos_id if self._eos_is_control else -1  # an id SentencePiece drops
        if min(id_list) >= 0 and max(id_list) < self.vocab_size and eos not in id_list:
            return self._sp.decode(id_list)
        parts: list[str] = []
        run: list[int] = []
        for pos, i in enumerate(id_list):
            self._check_id(i, f" at position {pos}")
            if i < self.vocab_size and i != eos:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_run(run, at_start=not parts))
                run = []
            parts.append(EOS_TOKEN if i == eos else f"<pad:{i}>")
        if run:
            parts.append(self._decode_run(run, at_start=not parts))
        return "".join(parts)

    def _decode_run(self, run: list[int], at_start: bool) -> str:
        """Decode ids at the start of the text, or ids that follow other text (after an eos or
        a ``<pad:ID>``): SentencePiece drops the leading space of a decoded sequence (the dummy
        prefix), which only the start has; the continuing model keeps it."""
        return self._sp.decode(run) if at_start else self._continuing().decode(run)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id ``i`` (``▁`` marks a space); ``<pad:ID>`` for padding rows."""
        self._check_id(i, "")
        return self._sp.id_to_piece(i) if i < self.vocab_size else f"<pad:{i}>"


class Tokenizer(Protocol):
    """What preprocessing, training and blank filling use of a tokenizer: :class:`GLMTokenizer`
    (a SentencePiece model) and :class:`megatron_glm.data.hf_tokenizer.HFTokenizer` (a Hugging
    Face ``tokenizer.json`` folder) both provide it; :func:`load_tokenizer` picks one."""

    model_path: Path
    vocab_size: int
    padded_vocab_size: int
    unk_id: int
    cls_id: int
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    eos_id: int
    pad_id: int

    def special_ids(self) -> dict[str, int]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]: ...

    def encode_pieces(
        self, pieces: list[str], per_doc: np.ndarray, num_threads: int = -1
    ) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def id_to_piece(self, i: int) -> str: ...


def load_tokenizer(
    path: str | os.PathLike[str], *, make_vocab_size_divisible_by: int = 128, tp: int = 1
) -> Tokenizer:
    """The tokenizer at ``path``: a folder is a Hugging Face tokenizer (``tokenizer.json``, as
    THUDM's WordPiece and BPE models need), anything else a SentencePiece ``.model``. The one
    entry point for preprocessing, training and blank filling, so all three read a vocabulary
    the same way."""
    if Path(path).is_dir():
        from megatron_glm.data.hf_tokenizer import HFTokenizer  # imports this module

        return HFTokenizer(path, make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp)
    return GLMTokenizer(path, make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp)
