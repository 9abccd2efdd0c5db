"""GLM's SentencePiece tokenizer for ``transformers`` (``AutoTokenizer``, ``trust_remote_code``).

This file is copied into every Hugging Face export, next to ``tokenizer.model`` (the
SentencePiece model the checkpoint was trained with), so it imports nothing from
``megatron_glm``: only ``sentencepiece`` and ``transformers``. It encodes and decodes exactly as
``megatron_glm.data.tokenizer.GLMTokenizer`` does (that module's docstring explains the rules):
the special tokens inside a text are one id each, the dummy ``▁`` is dropped before a text that
starts with a special token, ``<|endoftext|>`` (SentencePiece's eos, a control symbol) is
matched in text and decoded back, and ids of the padded embedding rows decode as ``<pad:ID>``.

Why not a fast ``tokenizer.json``: the ``tokenizers`` library's Unigram model breaks ties
between equally scored segmentations (runs of spaces: ``▁▁▁▁▁▁▁▁`` + 15 vs 15 + 8) the other
way round from SentencePiece, and sums scores in float64 where SentencePiece uses float32, so a
converted tokenizer gave different ids on about 2% of the demo corpus's documents. Wrapping
the SentencePiece model itself is exact by construction.

Special tokens are not added around a text (``add_special_tokens`` adds nothing): the models
trained here see documents without ``[CLS]`` and blank filling prompts as ``text, [sop]``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPECIAL_TOKENS = (
    "[CLS]",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "<|startofpiece|>",
    "<|endofpiece|>",
    "<|endoftext|>",
)
EOS_TOKEN = SPECIAL_TOKENS[-1]


class GLMTokenizer(PreTrainedTokenizer):
    """A SentencePiece model with GLM's special tokens; ids equal the trainer's ``GLMTokenizer``."""

    vocab_files_names = VOCAB_FILES_NAMES

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self._sp_continuing = _without_dummy_prefix(self.sp_model)
        missing = [
            t
            for t in SPECIAL_TOKENS
            if self.sp_model.id_to_piece(self.sp_model.piece_to_id(t)) != t
        ]
        if missing:
            raise ValueError(f"{vocab_file} lacks GLM special token(s) {', '.join(missing)}")
        self._eos = self.sp_model.piece_to_id(EOS_TOKEN)
        self._eos_is_control = self.sp_model.is_control(self._eos)
        self._dummy_prefix = list(self.sp_model.encode(SPECIAL_TOKENS[0])[:-1])
        kwargs.setdefault("cls_token", "[CLS]")
        kwargs.setdefault("mask_token", "[MASK]")
        kwargs.setdefault("eos_token", EOS_TOKEN)
        kwargs.setdefault("pad_token", EOS_TOKEN)
        kwargs.setdefault("unk_token", self.sp_model.id_to_piece(self.sp_model.unk_id()))
        kwargs.setdefault("extra_special_tokens", list(SPECIAL_TOKENS[2:6]))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("model_input_names", ["input_ids", "attention_mask"])
        super().__init__(**kwargs)

    # ids of GLM's special tokens, under the names THUDM's tokenizer uses
    @property
    def smask_token_id(self) -> int:
        return int(self.sp_model.piece_to_id("[sMASK]"))

    @property
    def gmask_token_id(self) -> int:
        return int(self.sp_model.piece_to_id("[gMASK]"))

    @property
    def sop_token_id(self) -> int:
        return int(self.sp_model.piece_to_id("<|startofpiece|>"))

    @property
    def eop_token_id(self) -> int:
        return int(self.sp_model.piece_to_id("<|endofpiece|>"))

    @property
    def vocab_size(self) -> int:
        return int(self.sp_model.get_piece_size())

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def encode_ids(self, text: str) -> list[int]:
        """Ids of ``text`` exactly as the trainer's ``GLMTokenizer.encode``."""
        if not (self._eos_is_control and EOS_TOKEN in text):
            return self._drop_dummy_prefix(text, self.sp_model.encode(text))
        first, *rest = text.split(EOS_TOKEN)
        ids = self._drop_dummy_prefix(first, self.sp_model.encode(first))
        for part in rest:
            ids.append(self._eos)
            ids += self._sp_continuing.encode(part)
        return ids

    def _drop_dummy_prefix(self, text: str, ids: list[int]) -> list[int]:
        k = len(self._dummy_prefix)
        if k and text.startswith(SPECIAL_TOKENS) and ids[:k] == self._dummy_prefix:
            return ids[k:]
        return ids

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """Pieces of the whole text at once (specials included): SentencePiece matches them
        itself, and the dummy prefix depends on where a part sits in the text. No special
        tokens are added (see the module docstring); a ``pair`` follows as its own text."""
        ids = self.encode_ids(text) + (self.encode_ids(pair) if pair is not None else [])
        return [self.sp_model.id_to_piece(i) for i in ids]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return int(self.sp_model.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.vocab_size:
            return str(self.sp_model.id_to_piece(index))
        return f"<pad:{index}>"

    def build_inputs_for_generation(self, texts: str | list[str]) -> BatchEncoding:
        """``model.generate`` inputs for texts with a blank each (THUDM's method, same purpose).

        Each text (with ``[MASK]``, ``[sMASK]`` or ``[gMASK]``; the first is filled) becomes
        part A, then ``[sop]``, rows left-padded: ``input_ids [b, L]``, ``position_ids
        [b, 2, L]`` (part A 0..n-1 with block 0; [sop] at the mask's index with block 1) and
        the padding ``attention_mask [b, L]``, as torch tensors. modeling_glm's
        ``build_inputs_for_generation`` builds the same from ids (this file cannot import it:
        a tokenizer folder travels without the model's code). Unlike THUDM's, it takes the
        texts, not a ``BatchEncoding``, and no ``max_gen_length``: the model extends the
        positions itself while generating.
        """
        rows = [self._generation_row(t, i) for i, t in enumerate(_as_list(texts))]
        width = max(len(ids) for ids, _, _ in rows)
        batch: dict[str, list[Any]] = {"input_ids": [], "position_ids": [], "attention_mask": []}
        for ids, positions, blocks in rows:
            pad = width - len(ids)
            batch["input_ids"].append([self.pad_token_id] * pad + ids)
            batch["position_ids"].append([[0] * pad + positions, [0] * pad + blocks])
            batch["attention_mask"].append([0] * pad + [1] * len(ids))
        return BatchEncoding(batch, tensor_type="pt")

    def _generation_row(self, text: str, row: int) -> tuple[list[int], list[int], list[int]]:
        """(ids, positions, block positions) of one prompt: part A, then [sop]."""
        ids = self.encode_ids(text)
        masks = {int(self.sp_model.piece_to_id(m)) for m in SPECIAL_TOKENS[1:4]}
        found = [i for i, t in enumerate(ids) if t in masks]
        if not found:
            raise ValueError(f"text {row} holds no [MASK]/[sMASK]/[gMASK]: nothing to fill")
        # a lone space piece before a mask belongs to the blank, as in pretraining's spans (the
        # trainer's blank filling drops it too: megatron_glm.generation.blank_fill)
        drop = {i - 1 for i in found if i > 0 and ids[i - 1] not in masks}
        drop = {i for i in drop if self.decode_ids([ids[i]]) == ""}
        ids = [t for i, t in enumerate(ids) if i not in drop]
        found = [i for i, t in enumerate(ids) if t in masks]
        n = len(ids)
        return [*ids, self.sop_token_id], [*range(n), found[0]], [0] * n + [1]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return token_ids_0 + (token_ids_1 or [])

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Text of ``token_ids`` exactly as the trainer's ``GLMTokenizer.decode``: specials as
        their text (eos too), ids past the vocabulary (padding rows) as ``<pad:ID>``."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        text = self.decode_ids(ids)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def decode_ids(self, ids: Sequence[int]) -> str:
        eos = self._eos if self._eos_is_control else -1  # an id SentencePiece decodes to ""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < 0:
                raise ValueError(f"token id {i} is negative")
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
        """SentencePiece drops the leading space (the dummy prefix) of a decoded sequence; only
        the start of the text has one, so later runs decode with the model that keeps it."""
        sp = self.sp_model if at_start else self._sp_continuing
        return str(sp.decode(run))

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str, ...]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _without_dummy_prefix(sp: spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """The same model with the dummy prefix switched off: it encodes a text as it reads after
    other text and decodes a leading ``▁`` as a space."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
