"""Zero-shot evaluation (megatron_glm.finetune.evaluate, tools/evaluate.py) on a tiny model.

Every figure is checked against a computation written here with the plain model: one
unbatched, unpadded ``forward`` per scored token (the row cut right after it), the tied head
applied by hand and the cross entropy as ``logsumexp - logit``; greedy words by the same
per-step forward and an argmax.
"""

from __future__ import annotations

import json
import math
import string
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from megatron_glm.config import ModelConfig
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.finetune.evaluate import (
    first_word,
    last_word_accuracy,
    lm_perplexity,
    lm_windows,
    seq2seq_predictions,
    split_last_word,
)
from megatron_glm.generation import GenerationConfig
from megatron_glm.hf.export import export_to_hf
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import evaluate  # noqa: E402

CONTEXTS = [
    "Return the value of the",
    "The module provides functions for working with",
    "Iterate over the lines of the",
    "Raise an error if the list is",
    "This class implements a simple",
    "Open the file and read its",
    "Convert the string to a",
    "The default encoding is",
]


def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=64,
        init_method_std=0.2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


@pytest.fixture(scope="module")
def model(tiny_tokenizer: GLMTokenizer) -> GLMModel:
    # seed 6: most of CONTEXTS get a greedy first word that ends (a space follows it) within a
    # few tokens; an untrained model often glues pieces into one endless word
    return build_model(tiny_cfg(), vocab_size=tiny_tokenizer.padded_vocab_size, seed=6).eval()


@pytest.fixture(scope="module")
def texts(demo_corpus_path: Path) -> list[str]:
    """Short held-out-like texts: the first documents of the demo corpus, cut to ~400 chars."""
    with demo_corpus_path.open() as f:
        return [json.loads(line)["text"][:400] for _, line in zip(range(4), f, strict=False)]


def _hidden_last(model: GLMModel, part_a: list[int], part_b: list[int]) -> torch.Tensor:
    """Final hidden state of the last position of ``part_a | part_b`` (one row, no padding)."""
    a, n = len(part_a), len(part_b)
    tokens = torch.tensor([part_a + part_b])
    pos = torch.zeros(1, 2, a + n, dtype=torch.long)
    pos[0, 0, :a] = torch.arange(a)
    pos[0, 0, a:] = a - 1
    pos[0, 1, a:] = torch.arange(1, n + 1)
    with torch.no_grad():
        hidden = model(tokens, pos, torch.tensor([a]), torch.tensor([a + n]))
    return hidden[0, -1]


def _token_loss(model: GLMModel, part_a: list[int], part_b: list[int], target: int) -> float:
    with torch.no_grad():
        logits = (_hidden_last(model, part_a, part_b) @ model.head_weight.T).double()
    return float(torch.logsumexp(logits, 0) - logits[target])


def hand_sum_loss(model: GLMModel, tok: GLMTokenizer, ids: list[int], length: int, stride: int):
    """Each token's loss with the context the docs promise: the first ``length - 1`` tokens with
    none; token ``k`` after that with the ``length - 1 - stride`` tokens before its window."""
    total, count = 0.0, 0
    for k, target in enumerate(ids):
        if k < length - 1:
            context, start = [], 0
        else:
            start = length - 1 + ((k - (length - 1)) // stride) * stride
            context = ids[max(0, start - (length - 1 - stride)) : start]
        part_a = [*context, tok.gmask_id]
        part_b = [tok.sop_id, *ids[start:k]]
        assert len(part_a) + len(part_b) <= length
        total += _token_loss(model, part_a, part_b, target)
        count += 1
    return total, count


def test_windows_score_every_token_once() -> None:
    ids = list(range(100, 137))  # 37 tokens
    windows = lm_windows(ids, max_length=10, stride=4)
    assert [t for w in windows for t in w.targets] == ids
    assert windows[0].context == [] and len(windows[0].targets) == 9
    for w in windows[1:]:
        assert len(w.context) + 1 + len(w.targets) <= 10
        start = ids.index(w.targets[0])
        assert w.context == ids[max(0, start - 5) : start]  # 10 - 1 - 4 tokens before
    with pytest.raises(ValueError, match=r"stride must be in \[1, max_length - 1 = 9\]"):
        lm_windows(ids, 10, 10)


@pytest.mark.parametrize(("length", "stride"), [(None, None), (24, 8), (17, 16)])
def test_perplexity_is_exp_of_the_hand_computed_mean_loss(
    model: GLMModel,
    tiny_tokenizer: GLMTokenizer,
    texts: list[str],
    length: int | None,
    stride: int | None,
) -> None:
    short = [t[:150] for t in texts[:3]]
    got = lm_perplexity(
        model, tiny_tokenizer, short, max_length=length, stride=stride, batch_size=2
    )
    use_length = length or model.cfg.max_position_embeddings
    use_stride = stride or use_length // 2
    total, count = 0.0, 0
    for text in short:
        s, n = hand_sum_loss(
            model, tiny_tokenizer, tiny_tokenizer.encode(text), use_length, use_stride
        )
        total, count = total + s, count + n
    assert got.texts == 3 and got.tokens == count
    assert count == sum(len(tiny_tokenizer.encode(t)) for t in short)
    assert got.sum_loss == pytest.approx(total, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got.perplexity > 50  # an untrained model: far from 1, the loss is real


def hand_greedy(model: GLMModel, tok: GLMTokenizer, context: str, steps: int = 16) -> list[int]:
    """Greedy part B after ``context [gMASK]`` by plain forwards: argmax over the real
    vocabulary, mask tokens and [sop] never chosen, stopping at [eop] or eos."""
    part_a = [*tok.encode(context), tok.gmask_id]
    banned = [tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id]
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = _hidden_last(model, part_a, [tok.sop_id, *out]) @ model.head_weight.T
        logits = logits[: tok.vocab_size].clone()
        logits[banned] = -math.inf
        token = int(logits.argmax())
        if token in (tok.eop_id, tok.eos_id):
            break
        out.append(token)
    return out


def test_last_word_accuracy_counts_the_models_own_words(
    model: GLMModel, tiny_tokenizer: GLMTokenizer
) -> None:
    tok = tiny_tokenizer
    words = {}
    for context in CONTEXTS:
        ids = hand_greedy(model, tok, context)
        generated = tok.decode(ids).split()
        ended = len(generated) > 1 or len(ids) < 16  # the first word is whole
        if ended and generated and generated[0].strip(string.punctuation) == generated[0]:
            words[context] = generated[0]  # a plain word (no punctuation to strip)
    assert len(words) >= 4, words  # the test needs some contexts to say something
    hits = list(words)[::2]
    texts = []
    for context, word in words.items():  # the model's word (+ punctuation) or another one
        texts.append(f"{context} {word}." if context in hits else f"{context} {word}zq")
    texts += ["Single", "Only punctuation at the end --"]  # skipped: no last word
    got = last_word_accuracy(model, tok, texts, batch_size=3)
    assert got.texts == len(words) + 2 and got.skipped == 2
    assert got.targets == [w if c in hits else w + "zq" for c, w in words.items()]
    assert got.predictions == list(words.values())
    assert got.correct == len(hits)
    assert got.accuracy == pytest.approx(len(hits) / len(words))


def test_a_word_the_model_goes_on_with_is_a_miss(
    model: GLMModel, tiny_tokenizer: GLMTokenizer
) -> None:
    """The target is the first piece of the model's two-piece word ("File" of "FileFile"):
    generating it is not enough, the model must end the word there."""
    tok = tiny_tokenizer
    ids = hand_greedy(model, tok, CONTEXTS[0])
    word = tok.decode(ids).split()[0]
    prefix = tok.decode(ids[:1]).strip()
    assert prefix and word.startswith(prefix) and prefix != word
    got = last_word_accuracy(model, tok, [f"{CONTEXTS[0]} {prefix}"])
    assert got.predictions == [word] and got.correct == 0


def test_split_last_word() -> None:
    item = split_last_word("It returns\n  ``None``.  \n")
    assert item is not None and (item.context, item.word) == ("It returns", "None")
    assert split_last_word("one") is None
    assert split_last_word("two words ...") is None
    assert first_word("\n  \u201cNone,\u201d he said") == "None"
    assert first_word(" \n ") == ""


def test_seq2seq_predictions_decode_after_source_and_gmask(
    model: GLMModel, tiny_tokenizer: GLMTokenizer
) -> None:
    tok = tiny_tokenizer
    sources = CONTEXTS[:3]
    gen = GenerationConfig(max_new_tokens=10)
    got = seq2seq_predictions(model, tok, sources, gen, batch_size=2)
    assert got == [tok.decode(hand_greedy(model, tok, s, steps=10)).strip() for s in sources]
    assert any(got)
    with pytest.raises(ValueError, match=r"source 1: holds a mask token \[MASK\]"):
        seq2seq_predictions(model, tok, ["a", "b [MASK] c"], gen)
    with pytest.raises(ValueError, match="source 0: empty source"):
        seq2seq_predictions(model, tok, ["  "], gen)


# ---------------------------------------------------------------------------- tools/evaluate.py


def write_run(root: Path, model: GLMModel, tokenizer: Path) -> Path:
    """``root/global_step3`` + ``latest`` with the config snapshot, as a run writes them."""
    tag = root / "global_step3"
    tag.mkdir(parents=True)
    config = {"model": asdict(model.cfg), "data": {"tokenizer_model": str(tokenizer)}}
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {"iteration": 3, "consumed_samples": 24, "config": config}
    write_checkpoint(full, tensor_parallel_layout(model.cfg), tag, tp=1, pp=1, base=base, marker={})
    (root / "latest").write_text("global_step3")
    return root


def _table(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()[1:]  # after the "INPUT on SOURCE" line
    return {line[:18].strip(): line[18:].strip() for line in lines}


def test_tool_end_to_end_on_a_checkpoint_and_its_hf_export(
    model: GLMModel,
    tiny_tokenizer: GLMTokenizer,
    tiny_tokenizer_model: Path,
    texts: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = write_run(tmp_path / "ckpt", model, tiny_tokenizer_model)
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    args = ["--input", str(held_out), "--key", "body", "--max-length", "48", "--stride", "16"]
    assert evaluate.main(["--load", str(ckpt), *args]) == 0
    out = capsys.readouterr().out
    table = _table(out)
    ppl = lm_perplexity(model, tiny_tokenizer, texts, max_length=48, stride=16)
    words = last_word_accuracy(model, tiny_tokenizer, texts, max_length=48)
    assert table["texts"] == "4" and table["tokens"] == str(ppl.tokens)
    assert table["loss"] == f"{ppl.loss:.4f}" and table["perplexity"] == f"{ppl.perplexity:.2f}"
    assert table["last-word accuracy"].startswith(f"{words.accuracy:.2%} ({words.correct}/")
    pytest.importorskip("transformers")
    export_to_hf(ckpt, tmp_path / "hf")
    assert evaluate.main(["--hf", str(tmp_path / "hf"), *args]) == 0
    assert _table(capsys.readouterr().out) == table


def test_tool_refuses_a_bad_line_naming_it(
    model: GLMModel,
    tiny_tokenizer_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = write_run(tmp_path / "ckpt", model, tiny_tokenizer_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine text here"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert evaluate.main(["--load", str(ckpt), "--input", str(bad), "--task", "perplexity"]) == 2
    assert f"{bad}:2: " in capsys.readouterr().err
    assert evaluate.main(["--load", str(ckpt), "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
