"""``model.generate`` on an HF export: our greedy tokens, cached logits equal to uncached ones.

The reference is :func:`~megatron_glm.generation.blank_fill.fill_blank` over the trained
model (ours, no cache, one text at a time). The export (``export_to_hf`` of a checkpoint, as
in ``test_hf_export``) decodes left-padded batches of prompts of different lengths with
transformers' own ``generate`` (GenerationMixin, DynamicCache).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_glm.config import ModelConfig
from megatron_glm.generation.blank_fill import encode_blanks, fill_blank
from megatron_glm.hf.export import export_to_hf
from megatron_glm.hf.modeling_glm import build_inputs_for_generation
from megatron_glm.model import GLMModel, build_model
from tests.unit.test_hf_export import IDS, VOCAB, _cfg, _checkpoint

transformers = pytest.importorskip("transformers")

NEW = 12  # new tokens per prompt
LENGTHS = (9, 23, 14, 31)  # part A lengths of the 4 rows of a batch
MASKS = {"span": IDS.mask, "sentence": IDS.smask, "document": IDS.gmask}


@dataclass
class IntTokenizer:
    """fill_blank's tokenizer over texts that are space-separated ids (no vocabulary)."""

    eop_id: int = IDS.eop
    eos_id: int = IDS.eos  # fill_blank also stops at it after [gMASK]
    mask_id: int = IDS.mask
    smask_id: int = IDS.smask
    gmask_id: int = IDS.gmask
    sop_id: int = IDS.sop
    vocab_size: int = VOCAB

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _perturbed(model: GLMModel) -> GLMModel:
    """Weights far from init (std 0.02 gives one repeated token): greedy output varies. The
    final LayerNorm's affine is scaled down so logits stay ~3 (argmax unchanged): fp32 rounding
    grows with their size."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            if "final_layernorm" in name:
                p.mul_(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GLMModel:
    return _perturbed(build_model(_cfg(), seed=11))


@pytest.fixture(scope="module")
def hf(model: GLMModel, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    root = tmp_path_factory.mktemp("hfgen")
    export_to_hf(_checkpoint(root / "ckpt", model), root / "hf")
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(
        root / "hf", trust_remote_code=True
    ).eval()


def _prompts(task: str) -> list[list[int]]:
    """Part A of 4 rows: random ids, the task's mask inside (span, sentence) or at the end."""
    gen = torch.Generator().manual_seed(len(task))
    rows = []
    for n in LENGTHS:
        ids = torch.randint(10, VOCAB, (n,), generator=gen).tolist()
        ids[n - 1 if task == "document" else n // 3] = MASKS[task]
        rows.append(ids)
    return rows


def _generate(hf: torch.nn.Module, prompts: list[list[int]], **kwargs: object) -> object:
    inputs = build_inputs_for_generation(
        prompts, mask_token_ids=list(MASKS.values()), sop_token_id=IDS.sop, pad_token_id=IDS.pad
    )
    with torch.no_grad():
        return hf.generate(
            **inputs,
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=IDS.pad,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def _fills(sequences: torch.Tensor, prompts: list[list[int]], eop: int) -> list[list[int]]:
    """The generated ids of each row (after part A, [sop] and the left padding), up to its
    first ``eop``."""
    width = max(len(p) for p in prompts) + 1
    out = []
    for row in sequences[:, width:].tolist():
        out.append(row[: row.index(eop)] if eop in row else row)
    return out


@pytest.mark.parametrize("task", list(MASKS))
def test_greedy_tokens_equal_fill_blank(model: GLMModel, hf: torch.nn.Module, task: str) -> None:
    """A left-padded batch of 4 rows gives fill_blank's tokens per row, stopping at [eop]."""
    prompts = _prompts(task)
    free = _fills(_generate(hf, prompts, eos_token_id=IDS.eop).sequences, prompts, IDS.eop)
    assert len({t for row in free for t in row}) > 8  # varied output, not one repeated id
    eop = free[0][4]  # an id the model emits: its first occurrence ends row 0 early
    tok = IntTokenizer(eop_id=eop, eos_id=eop)  # one stop id, the one generate() is given
    want = [tok.encode(fill_blank(model, tok, tok.decode(p), max_new_tokens=NEW)) for p in prompts]
    got = _fills(_generate(hf, prompts, eos_token_id=eop).sequences, prompts, eop)
    assert got == want
    assert len(want[0]) < 5  # stopped at the chosen [eop]
    print(f"{task}: fills {[len(w) for w in want]} tokens, equal to fill_blank")


def _reference_step_logits(model: GLMModel, sequences: torch.Tensor, prompts: list) -> list:
    """Our model's logits for each generated step, from one uncached forward per row."""
    out = []
    width = sequences.shape[1] - NEW
    for i, part_a in enumerate(prompts):
        n = len(part_a)
        tokens = sequences[i, width - n - 1 :][None]  # part A, [sop], the new tokens
        length = tokens.shape[1]
        mask_pos = next(j for j, t in enumerate(part_a) if t in MASKS.values())
        positions = [*range(n), *[mask_pos] * (length - n)]
        blocks = [0] * n + list(range(1, length - n + 1))
        with torch.no_grad():
            hidden = model(
                tokens,
                torch.tensor([[positions, blocks]]),
                torch.tensor([n]),
                torch.tensor([length]),
            )
            out.append(model.logits(hidden)[0, n : n + NEW])  # [NEW, vocab]
    return out


@pytest.mark.parametrize("task", list(MASKS))
def test_cached_logits_equal_uncached_at_every_step(
    model: GLMModel, hf: torch.nn.Module, task: str
) -> None:
    """With the cache, without it (use_cache=False) and our full forward: the same logits."""
    prompts = _prompts(task)
    cached = _generate(hf, prompts, eos_token_id=None)
    uncached = _generate(hf, prompts, eos_token_id=None, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == len(uncached.logits) == NEW
    with_cache = torch.stack(cached.logits, dim=1)  # [b, NEW, vocab]
    diff = (with_cache - torch.stack(uncached.logits, dim=1)).abs().max().item()
    ours = torch.stack(_reference_step_logits(model, cached.sequences, prompts))
    diff_ours = (with_cache - ours).abs().max().item()
    scale = with_cache.abs().max().item()
    print(
        f"{task}: max |logit| {scale:.3g}; cached vs uncached {diff:.3g}, vs ours {diff_ours:.3g}"
    )
    assert scale > 1.0
    assert diff < 1e-5
    assert diff_ours < 1e-5  # another implementation (per-head QKV rows, fused ops)


def test_batched_equals_one_at_a_time(hf: torch.nn.Module) -> None:
    """Left padding changes nothing: each row alone gives the batch's tokens and logits."""
    prompts = _prompts("span")
    batch = _generate(hf, prompts, eos_token_id=None)
    width = batch.sequences.shape[1]
    for i, prompt in enumerate(prompts):
        alone = _generate(hf, [prompt], eos_token_id=None)
        n = alone.sequences.shape[1]
        assert torch.equal(alone.sequences[0], batch.sequences[i, width - n :])
        diff = max(
            (a[0] - b[i]).abs().max().item()
            for a, b in zip(alone.logits, batch.logits, strict=True)
        )
        assert diff < 1e-5


def test_beam_search_expands_the_2d_positions(hf: torch.nn.Module) -> None:
    """Beams repeat ``position_ids [b, 2, L]`` on the batch dim (transformers' own expansion
    takes a 3D one for multimodal ``[3, b, L]``): cached beams equal uncached ones, and the
    best beam of a row in the batch equals that row's alone."""
    prompts = _prompts("sentence")
    beams = {"num_beams": 3, "eos_token_id": None}
    cached = _generate(hf, prompts, **beams).sequences
    assert torch.equal(cached, _generate(hf, prompts, use_cache=False, **beams).sequences)
    alone = _generate(hf, prompts[1:2], **beams).sequences[0]
    assert torch.equal(alone, cached[1, cached.shape[1] - alone.shape[0] :])


def test_thudm_inputs_give_the_same_tokens(hf: torch.nn.Module) -> None:
    """THUDM's generate inputs (positions for the whole generation, generation_attention_mask
    ``[b, 1, L + n, L + n]``, as their tokenizer's build_inputs_for_generation makes them)."""
    part_a = _prompts("sentence")[1]
    n, mask_pos = len(part_a), part_a.index(IDS.smask)
    positions = torch.tensor([[[*range(n), *[mask_pos] * NEW], [0] * n + list(range(1, NEW + 1))]])
    part_b = torch.cat([torch.zeros(n, NEW), torch.ones(NEW, NEW).tril()])  # causal keys
    mask = torch.cat([torch.ones(n + NEW, n), part_b], 1)  # part A keys: seen by every row
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=torch.tensor([[*part_a, IDS.sop]]),
            position_ids=positions,
            generation_attention_mask=mask[None, None],
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
        )
    assert torch.equal(theirs, _generate(hf, [part_a], eos_token_id=None).sequences)


@contextmanager
def _transformers_warnings() -> Iterator[list[str]]:
    """Python warnings and transformers' logged warnings raised inside the block."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(logging.WARNING)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(handler)


def test_tokenizer_helper_and_generation_config(tmp_path: Path, tiny_tokenizer_model: Path) -> None:
    """The exported folder alone: AutoTokenizer's build_inputs_for_generation, generate with the
    folder's generation config (stops at [eop], never a padding row), fill_blank's text, and
    not one warning from transformers (no deprecated path)."""
    from megatron_glm.data.tokenizer import GLMTokenizer

    tok = GLMTokenizer(tiny_tokenizer_model)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=tok.padded_vocab_size,
        max_position_embeddings=64,
    )
    assert cfg.vocab_size > tok.vocab_size  # padding rows exist, so suppressing them matters
    model = _perturbed(build_model(cfg, seed=5))
    data = {"tokenizer_model": str(tiny_tokenizer_model)}
    export_to_hf(_checkpoint(tmp_path / "ckpt", model, data=data), tmp_path / "hf")
    generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(tok.vocab_size, cfg.vocab_size))
    texts = [
        "Return a [MASK] of the list.",  # the space before [MASK] is part of the blank
        "The [sMASK] Open the file and read it back.",
        "Read the lines of a file [gMASK]",
    ]
    with _transformers_warnings() as seen:
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            tmp_path / "hf", trust_remote_code=True
        ).eval()
        inputs = hf_tok.build_inputs_for_generation(texts)
        with torch.no_grad():
            out = hf.generate(  # the folder's generation config: stops at [eop]
                **inputs,
                max_new_tokens=NEW,
                return_dict_in_generate=True,
                output_scores=True,
            )
    assert seen == []
    assert all(torch.isneginf(step[:, tok.vocab_size :]).all() for step in out.scores)
    assert generation["eos_token_id"] == tok.eop_id
    want = build_inputs_for_generation(
        [encode_blanks(tok, t, i) for i, t in enumerate(texts)],  # our decoder's part A
        mask_token_ids=[tok.mask_id, tok.smask_id, tok.gmask_id],
        sop_token_id=tok.sop_id,
        pad_token_id=tok.pad_id,
    )
    assert all(torch.equal(inputs[k], want[k]) for k in want)
    width = inputs["input_ids"].shape[1]
    for i, text in enumerate(texts):
        row = out.sequences[i, width:].tolist()
        row = row[: row.index(tok.eop_id)] if tok.eop_id in row else row
        assert tok.decode(row) == fill_blank(model, tok, text, max_new_tokens=NEW)
    first = out.sequences[0, width:].tolist()
    first = first[: first.index(tok.eop_id) if tok.eop_id in first else NEW]
    want_text = hf_tok.decode(first, skip_special_tokens=True)
    print(f"card snippet fill: {want_text!r}")
    assert _run_card_snippet(tmp_path / "hf", texts[0], max_new=NEW) == want_text


def _run_card_snippet(folder: Path, text: str, max_new: int) -> object:
    """The model card's generate() code run on the folder (stops at [eop], the folder's
    generation config): the text its last line decodes."""
    card = (folder / "README.md").read_text()
    code = card.split("## Generate (fill a blank)\n```python\n")[1].split("```")[0]
    code = code.replace('"PATH"', repr(str(folder))).replace("Return a [MASK] of the list.", text)
    code = code.replace("max_new_tokens=32", f"max_new_tokens={max_new}")
    *lines, last = code.strip().splitlines()
    scope: dict[str, object] = {}
    exec("\n".join([*lines, f"fill = {last}"]), scope)
    return scope["fill"]


def test_errors(hf: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"^prompt 1 holds no mask token \(ids \[3, 4, 5\]\)"):
        build_inputs_for_generation(
            [[10, 3, 11], [10, 11]], mask_token_ids=[3, 4, 5], sop_token_id=6, pad_token_id=2
        )
    ids = torch.tensor([[10, 3, 11, IDS.sop]])
    with pytest.raises(ValueError, match=r"GLM's generate needs position_ids \[batch, 2, prompt"):
        hf.generate(input_ids=ids, max_new_tokens=2)
    long = build_inputs_for_generation(
        [[*range(10, 80), IDS.mask]], mask_token_ids=[IDS.mask], sop_token_id=6, pad_token_id=2
    )
    with pytest.raises(
        ValueError, match=r"past the model's position table \(64 rows, max_sequence_length 63\)"
    ):
        hf.generate(**long, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
