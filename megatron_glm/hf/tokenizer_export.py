"""Write a Hugging Face tokenizer folder for a SentencePiece model trained here.

The folder holds ``tokenizer.model`` (the SentencePiece model, byte for byte),
``tokenization_glm.py`` (a copy of :mod:`megatron_glm.hf.tokenization_glm`, so the export needs
no ``megatron_glm`` installed), ``tokenizer_config.json`` (its ``auto_map`` points
``AutoTokenizer`` at that class) and ``special_tokens_map.json``. Load it with
``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``; it encodes and decodes
exactly as :class:`megatron_glm.data.tokenizer.GLMTokenizer` (tokenization_glm's docstring says
why this is remote code and not a converted ``tokenizer.json``).

A Hugging Face tokenizer folder (``data.tokenizer_model`` naming one) is exported as a plain
fast tokenizer (``tokenizer.json``, no remote code) with GLM's special tokens added.

A model export writes the tokenizer into the same folder; the AutoTokenizer entry of its
``config.json`` ``auto_map`` must match: :data:`AUTO_MAP` for a SentencePiece model, none for a
folder (``transformers`` would otherwise look for ``tokenization_glm.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megatron_glm.data.hf_tokenizer import HFTokenizer
from megatron_glm.data.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, GLMTokenizer
from megatron_glm.hf import tokenization_glm

AUTO_MAP: list[str | None] = ["tokenization_glm.GLMTokenizer", None]
"""``auto_map["AutoTokenizer"]`` of an export: the slow class in the copied module, no fast one."""


def _tokenizer_config(tok: GLMTokenizer) -> dict[str, Any]:
    """``tokenizer_config.json``: the class, the specials and their ids (as ``transformers``
    writes ``added_tokens_decoder``), and no clean-up of spaces (it would change the text)."""
    unk = tok.sentencepiece.id_to_piece(tok.unk_id)
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted([(unk, tok.unk_id), *tok.special_ids().items()], key=lambda x: x[1])
    }
    return {
        "tokenizer_class": "GLMTokenizer",
        "auto_map": {"AutoTokenizer": AUTO_MAP},
        "vocab_file": "tokenizer.model",
        "added_tokens_decoder": added,
        **_special_tokens_map(unk),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
    }


def _special_tokens_map(unk: str) -> dict[str, Any]:
    return {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": unk,
        "extra_special_tokens": list(SPECIAL_TOKENS[2:6]),
    }


def export_tokenizer(
    tokenizer_model_path: str | os.PathLike[str], hf_dir: str | os.PathLike[str]
) -> None:
    """Write the tokenizer files of ``tokenizer_model_path`` into ``hf_dir`` (created if absent).

    A SentencePiece model is validated first by :class:`GLMTokenizer` (it must hold GLM's
    special tokens), so a model the trainer would refuse is never exported. A Hugging Face
    tokenizer folder (a model imported from THUDM's WordPiece or BPE) is written as a plain
    fast tokenizer, GLM's special tokens added as the trainer adds them: no remote code.
    """
    if Path(tokenizer_model_path).is_dir():
        _export_folder(Path(tokenizer_model_path), Path(hf_dir))
        return
    tok = GLMTokenizer(tokenizer_model_path)
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.model_path, out / "tokenizer.model")
    module = Path(tokenization_glm.__file__)
    shutil.copyfile(module, out / module.name)
    config = _tokenizer_config(tok)
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", _special_tokens_map(config["unk_token"]))


def _export_folder(folder: Path, out: Path) -> None:
    """``tokenizer.json`` with GLM's specials (ids as :class:`HFTokenizer` gives them) and a
    ``tokenizer_config.json`` naming the library's fast class and the specials' roles."""
    tok = HFTokenizer(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    spelled = tok.special_tokens()  # e.g. eos is BERT's [PAD] (THUDM's convention)
    specials = {
        **_special_tokens_map(str(tok.tokenizer.id_to_token(tok.unk_id))),
        "cls_token": spelled["[CLS]"],
        "mask_token": spelled["[MASK]"],
        "eos_token": spelled[EOS_TOKEN],
        "pad_token": spelled[EOS_TOKEN],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
