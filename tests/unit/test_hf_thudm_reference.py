"""A folder in THUDM's exact GLM layout imports, and our model computes THUDM's logits.

Nothing here is built with our model code: the folder is a dict of random tensors under THUDM's
key table, a ``config.json`` with THUDM's fields (glm-large's, scaled down) and a WordPiece
``tokenizer.json`` (BERT uncased, as glm-large's) trained in the test; the reference is a forward
written from THUDM's Hugging Face ``modeling_glm.py`` (``GLMModel`` / ``GLMStack``): word +
position + block-position embeddings, pre-LN blocks, the fused QKV split as all Q rows, all K,
all V, scores ``q @ (k^T / sqrt(d))`` multiplied by the 0/1 mask built from ``sep`` (lower
triangle plus every column before ``sep``) and filled with -65504, GeLU, a final LayerNorm and
logits against the word embeddings. Its position tables have ``max_sequence_length + 1`` rows,
as THUDM's ``GLMStack`` builds them with ``block_position_encoding``.

GeLU: THUDM's HF code applies ``transformers.activations.gelu`` (erf); the folder's config has no
``gelu_approximate``, so the import sets ``model.gelu: erf`` and the equality is asserted against
the reference exactly as THUDM computes it. The same model with the tanh GeLU (our training
default) is visibly off (asserted), so the test tells the forms apart. The weights are scaled up
from GLM's 0.02 init so that pre-activations are O(1): a wrong GeLU form, QKV order or mask shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.data.hf_tokenizer import HFTokenizer
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.hf.import_hf import ImportResult, import_from_hf
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import read_full_state
from tests.unit.test_hf_tokenizer import _demo_texts, _train_hf_folder

LAYERS, HIDDEN, HEADS, MAX_SEQ = 2, 32, 4, 64
S = 48  # row length (<= MAX_SEQ)
TASKS = ("span", "sentence", "document")
LAYER_KEYS = {
    "input_layernorm": (HIDDEN,),
    "attention.query_key_value": (3 * HIDDEN, HIDDEN),
    "attention.dense": (HIDDEN, HIDDEN),
    "post_attention_layernorm": (HIDDEN,),
    "mlp.dense_h_to_4h": (4 * HIDDEN, HIDDEN),
    "mlp.dense_4h_to_h": (HIDDEN, 4 * HIDDEN),
}


def thudm_config(vocab_size: int) -> dict[str, object]:
    """glm-large's ``config.json`` fields (THUDM's names and defaults), tiny sizes."""
    return {
        "architectures": ["GLMModel"],
        "attention_dropout_prob": 0.1,
        "attention_scale": 1.0,
        "block_position_encoding": True,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "embedding_dropout_prob": 0.1,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "max_sequence_length": MAX_SEQ,
        "model_type": "glm",
        "num_attention_heads": HEADS,
        "num_layers": LAYERS,
        "output_dropout_prob": 0.1,
        "output_predict": True,
        "parallel_output": True,
        "pool_token": "cls",
        "relative_encoding": False,
        "spell_func": "lstm",
        "spell_length": None,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    }


def thudm_weights(vocab_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under THUDM's keys and shapes (``GLMForConditionalGeneration``: ``glm.``)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=g) * std + mean

    rows = MAX_SEQ + 1  # THUDM's GLMStack: Embedding(max_sequence_length + 1, hidden)
    w = {
        "glm.word_embeddings.weight": randn(vocab_size, HIDDEN, std=0.2),
        "glm.transformer.position_embeddings.weight": randn(rows, HIDDEN, std=0.5),
        "glm.transformer.block_position_embeddings.weight": randn(rows, HIDDEN, std=0.5),
    }
    for i in range(LAYERS):
        for name, shape in LAYER_KEYS.items():
            key = f"glm.transformer.layers.{i}.{name}"
            is_norm = name.endswith("layernorm")
            w[f"{key}.weight"] = randn(*shape, std=0.1 if is_norm else 0.25, mean=float(is_norm))
            w[f"{key}.bias"] = randn(shape[0], std=0.1)
    w["glm.transformer.final_layernorm.weight"] = randn(HIDDEN, std=0.1, mean=1.0)
    w["glm.transformer.final_layernorm.bias"] = randn(HIDDEN, std=0.1)
    return w


def gelu_erf(x: Tensor) -> Tensor:
    """``transformers.activations.gelu``, which THUDM's MLP applies."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Tensor) -> Tensor:
    """Megatron's ``gelu_impl`` (OpenAI's): the form our trainer computes."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def split_thudm(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``split_tensor_along_last_dim(mixed_x_layer, 3)``: all Q, then all K, then all V."""
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def split_per_head(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A wrong order (Megatron's per-head ``[heads, 3, d]``), to show the test can fail."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, HEADS, 3, HIDDEN // HEADS).unbind(3)
    return q.reshape(b, s, HIDDEN), k.reshape(b, s, HIDDEN), v.reshape(b, s, HIDDEN)


def sep_mask(sep: Tensor, length: int) -> Tensor:
    """THUDM's ``build_mask_matrix``: ``tril(ones)`` with every column ``< sep`` set to 1."""
    m = torch.ones(1, length, length).tril().expand(sep.numel(), -1, -1)
    before_sep = torch.arange(length).view(1, -1) < sep.view(-1, 1)
    return m.masked_fill(before_sep.unsqueeze(1).expand_as(m), 1.0).unsqueeze(1)  # [b, 1, s, s]


def reference_logits(
    w: dict[str, Tensor],
    input_ids: Tensor,
    position_ids: Tensor,
    sep: Tensor,
    *,
    gelu: Callable[[Tensor], Tensor] = gelu_erf,
    split: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] = split_thudm,
) -> Tensor:
    """THUDM's ``GLMForConditionalGeneration`` forward (eval mode), from its formulas."""
    b, s = input_ids.shape
    d = HIDDEN // HEADS
    t = "glm.transformer."
    h = w["glm.word_embeddings.weight"][input_ids]
    h = h + w[t + "position_embeddings.weight"][position_ids[:, 0]]
    h = h + w[t + "block_position_embeddings.weight"][position_ids[:, 1]]
    mask = sep_mask(sep, s)

    def ln(x: Tensor, key: str) -> Tensor:
        return F.layer_norm(x, (HIDDEN,), w[key + ".weight"], w[key + ".bias"], 1e-5)

    def linear(x: Tensor, key: str) -> Tensor:
        return x @ w[key + ".weight"].T + w[key + ".bias"]

    def heads(x: Tensor) -> Tensor:  # [b, s, h] -> [b, n, s, d]
        return x.view(b, s, HEADS, d).permute(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"{t}layers.{i}."
        q, k, v = map(
            heads, split(linear(ln(h, p + "input_layernorm"), p + "attention.query_key_value"))
        )
        scores = torch.matmul(q, k.transpose(-1, -2) / math.sqrt(d))
        scores = scores * mask + (-65504.0) * (1.0 - mask)
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.permute(0, 2, 1, 3).reshape(b, s, HIDDEN)
        h = h + linear(context, p + "attention.dense")
        inner = gelu(linear(ln(h, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h"))
        h = h + linear(inner, p + "mlp.dense_4h_to_h")
    out = ln(h, t + "final_layernorm")
    return F.linear(out, w["glm.word_embeddings.weight"])  # output_predict: tied head


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, demo_corpus_path: Path) -> Path:
    out = tmp_path_factory.mktemp("wordpiece") / "tokenizer"
    return _train_hf_folder("wordpiece", _demo_texts(demo_corpus_path), out)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> HFTokenizer:
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="module")
def thudm_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: HFTokenizer, tokenizer_dir: Path
) -> Path:
    """The folder as THUDM publishes one: config, safetensors, the tokenizer beside them."""
    folder = tmp_path_factory.mktemp("thudm") / "glm-tiny"
    folder.mkdir()
    vocab = tokenizer.padded_vocab_size  # glm-large: 30522 + specials padded to 30592
    (folder / "config.json").write_text(json.dumps(thudm_config(vocab), indent=2))
    save_file(thudm_weights(vocab), str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="module")
def imported(thudm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ImportResult:
    return import_from_hf(thudm_dir, tmp_path_factory.mktemp("ck") / "tp1")


@pytest.fixture(scope="module")
def ours(imported: ImportResult) -> GLMModel:
    model = build_model(imported.model, seed=0)  # random init, then every tensor loaded
    model.load_state_dict(read_full_state(imported.tag_dir, None))
    return model.eval()


def _rows(tok: HFTokenizer, texts: list[str], task: str, n: int = 2) -> dict[str, Tensor]:
    """Blank-infilling rows of ``task`` over the demo text, encoded by the WordPiece tokenizer."""
    bi = BlankInfilling(ObjectiveConfig(), seq_length=S, ids=SpecialIds.from_tokenizer(tok), seed=3)
    stream = [i for text in texts for i in (*tok.encode(text), tok.eos_id)]

    class Window:
        def __init__(self, index: int) -> None:
            start = index * bi.window_length
            self.tokens = np.asarray(stream[start : start + bi.window_length], dtype=np.int64)
            self.sentence_starts = np.array([0, 9, 20, 31])
            self.epoch, self.index = 0, index

    rows = bi.batch([Window(i) for i in range(n)], [task] * n)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in rows.items()}


def _our_logits(model: GLMModel, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        hidden = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
        return model.logits(hidden)


def _valid(batch: dict[str, Tensor]) -> Tensor:
    return torch.arange(S)[None] < batch["valid_len"][:, None]


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("task", TASKS)
def test_logits_equal_thudm_reference(
    thudm_dir: Path,
    ours: GLMModel,
    imported: ImportResult,
    tokenizer: HFTokenizer,
    demo_corpus_path: Path,
    task: str,
) -> None:
    """Every valid position of real rows: our imported model's logits equal THUDM's forward
    (erf GeLU, as the folder says) within 1e-5; the tanh form gives a visible gap, and a per-head
    QKV split would be far off."""
    from safetensors.torch import load_file

    w = load_file(str(thudm_dir / "model.safetensors"))
    batch = _rows(tokenizer, _demo_texts(demo_corpus_path), task)
    assert (batch["sep"] < batch["valid_len"]).all() and batch[
        "tokens"
    ].max() < tokenizer.vocab_size
    args = (w, batch["tokens"], batch["position_ids"], batch["sep"])
    valid = _valid(batch)
    got = _our_logits(ours, batch)[valid]
    diff = (got - reference_logits(*args)[valid]).abs().max().item()
    tanh_gap = (got - reference_logits(*args, gelu=gelu_tanh)[valid]).abs().max().item()
    wrong_qkv = (got - reference_logits(*args, split=split_per_head)[valid]).abs()
    print(
        f"{task}: max abs diff {diff:.3g} (logits up to {got.abs().max():.3g}); "
        f"vs tanh GeLU {tanh_gap:.3g}; per-head QKV {wrong_qkv.max():.3g}"
    )
    assert imported.model.gelu == "erf" and imported.warnings == []
    assert diff < 1e-5
    assert got.abs().max() > 1.0  # not a trivially equal pair
    assert 1e-4 < tanh_gap < 0.1  # the GeLU form is visible, and the only difference
    assert wrong_qkv.max() > 0.1


def test_tanh_model_misses_the_reference(
    thudm_dir: Path, imported: ImportResult, tokenizer: HFTokenizer, demo_corpus_path: Path
) -> None:
    """The imported weights in a ``model.gelu: tanh`` model (what the trainer computed before
    the field existed) are off THUDM's logits by more than the 1e-5 asserted above: the field,
    not luck, makes the equality."""
    from safetensors.torch import load_file

    model = build_model(replace(imported.model, gelu="tanh"), seed=0)
    model.load_state_dict(read_full_state(imported.tag_dir, None))
    batch = _rows(tokenizer, _demo_texts(demo_corpus_path), "span")
    w = load_file(str(thudm_dir / "model.safetensors"))
    want = reference_logits(w, batch["tokens"], batch["position_ids"], batch["sep"])
    valid = _valid(batch)
    gap = (_our_logits(model.eval(), batch)[valid] - want[valid]).abs().max().item()
    print(f"tanh model vs THUDM reference (erf): max abs diff {gap:.3g}")
    assert gap > 1e-4


def test_tp2_pp2_import_merges_to_tp1(
    thudm_dir: Path, imported: ImportResult, tmp_path: Path
) -> None:
    result = import_from_hf(thudm_dir, tmp_path / "tp2pp2", tp=2, pp=2)
    assert sorted(p.name for p in result.tag_dir.glob("mp_rank_*")) == [
        f"mp_rank_0{i}_model_states.pt" for i in range(4)
    ]
    layout = tensor_parallel_layout(imported.model)
    merged = read_full_state(result.tag_dir, layout)
    tp1 = read_full_state(imported.tag_dir, layout)
    assert sorted(merged) == sorted(tp1)
    for name, tensor in tp1.items():
        assert torch.equal(merged[name], tensor), name


# ------------------------------------------------------------- the folder's tokenizer travels


def _run_config(tmp_path: Path, tokenizer_model: Path) -> Path:
    path = tmp_path / "run.yaml"
    data = {"tokenizer_model": str(tokenizer_model), "seq_length": S}
    path.write_text(json.dumps({"data": data}))
    return path  # JSON is YAML


def test_import_copies_the_folders_tokenizer(
    imported: ImportResult, tokenizer_dir: Path, demo_corpus_path: Path
) -> None:
    """``CKPT_DIR/tokenizer/`` holds the folder's tokenizer.json, the snapshot's
    ``data.tokenizer_model`` names it, and it encodes as the folder's does, specials included."""
    from megatron_glm.training.checkpoint import saved_config

    copied = imported.tokenizer
    assert copied == imported.tag_dir.parent.resolve() / "tokenizer"
    assert (copied / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()
    saved = saved_config(imported.tag_dir)
    assert saved is not None and saved["data"]["tokenizer_model"] == str(copied)
    ours, theirs = load_tokenizer(copied), load_tokenizer(tokenizer_dir)
    text = _demo_texts(demo_corpus_path)[0][:200] + " [MASK] x [gMASK]"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.special_ids() == theirs.special_ids()
    assert ours.padded_vocab_size == imported.model.vocab_size


def test_config_tokenizer_must_match_the_folders(
    thudm_dir: Path, tokenizer_dir: Path, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    """A ``--config`` naming another vocabulary is refused, naming both; the same vocabulary
    (another copy of it) is accepted and the snapshot names the checkpoint's copy."""
    other = _run_config(tmp_path, tiny_tokenizer_model)
    with pytest.raises(ValueError, match="is not the vocabulary") as err:
        import_from_hf(thudm_dir, tmp_path / "refused", run_config=other)
    assert str(tiny_tokenizer_model) in str(err.value) and str(thudm_dir) in str(err.value)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    same = _run_config(tmp_path, tokenizer_dir)
    result = import_from_hf(thudm_dir, tmp_path / "ok", run_config=same)
    assert result.tokenizer == (tmp_path / "ok" / "tokenizer").resolve()


def test_tokenizer_outside_the_embedding_refused(
    tokenizer: HFTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    rows = 1024  # fewer embedding rows than the tokenizer has tokens
    (folder / "config.json").write_text(json.dumps(thudm_config(rows)))
    save_file(thudm_weights(rows), str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(
        ValueError, match=rf"tokenizer of {tokenizer.vocab_size} tokens but the weights have only"
    ):
        import_from_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_sentencepiece_of_an_export_is_copied(tiny_tokenizer_model: Path, tmp_path: Path) -> None:
    """Our own export carries ``tokenizer.model`` (SentencePiece): the import takes that file."""
    from megatron_glm.hf.export import export_to_hf
    from tests.unit.test_hf_export import _cfg, _checkpoint

    vocab = load_tokenizer(tiny_tokenizer_model).padded_vocab_size
    model = build_model(replace(_cfg(), vocab_size=vocab), seed=1)
    _checkpoint(tmp_path / "src", model, data={"tokenizer_model": str(tiny_tokenizer_model)})
    export_to_hf(tmp_path / "src", tmp_path / "hf")
    result = import_from_hf(tmp_path / "hf", tmp_path / "ck")
    assert result.tokenizer == (tmp_path / "ck" / "tokenizer" / "tokenizer.model").resolve()
    assert result.tokenizer.read_bytes() == tiny_tokenizer_model.read_bytes()


def test_modeling_file_loads_the_folder_with_thudms_logits(
    thudm_dir: Path, tokenizer: HFTokenizer, demo_corpus_path: Path
) -> None:
    """Our remote code (``hf/modeling_glm.py``) reads the THUDM folder as published (no
    ``gelu_approximate``: erf) and computes the reference forward's logits, erf GeLU included."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from megatron_glm.hf.modeling_glm import GLMForConditionalGeneration

    hf = GLMForConditionalGeneration.from_pretrained(thudm_dir).eval()
    w = load_file(str(thudm_dir / "model.safetensors"))
    for task in TASKS:
        batch = _rows(tokenizer, _demo_texts(demo_corpus_path), task)
        with torch.no_grad():
            got = hf(
                batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["sep"]
            )
        want = reference_logits(w, batch["tokens"], batch["position_ids"], batch["sep"])
        valid = _valid(batch)
        diff = (got.logits[valid] - want[valid]).abs().max().item()
        print(f"{task}: modeling_glm.py vs THUDM reference (erf) max abs diff {diff:.3g}")
        assert diff < 1e-5


def test_export_of_the_import_keeps_erf(
    thudm_dir: Path,
    imported: ImportResult,
    tokenizer: HFTokenizer,
    demo_corpus_path: Path,
    tmp_path: Path,
) -> None:
    """``to-hf`` of the imported checkpoint writes ``gelu_approximate: "none"`` (from
    ``model.gelu: erf``), and the exported folder loaded by ``transformers`` still computes
    THUDM's logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from megatron_glm.hf.export import export_to_hf

    export_to_hf(imported.tag_dir.parent, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["gelu_approximate"] == "none"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True
    ).eval()
    w = load_file(str(thudm_dir / "model.safetensors"))
    batch = _rows(tokenizer, _demo_texts(demo_corpus_path), "sentence")
    with torch.no_grad():
        got = hf(batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["sep"])
    want = reference_logits(w, batch["tokens"], batch["position_ids"], batch["sep"])
    valid = _valid(batch)
    diff = (got.logits[valid] - want[valid]).abs().max().item()
    print(f"export of the import vs THUDM reference (erf): max abs diff {diff:.3g}")
    assert diff < 1e-5
