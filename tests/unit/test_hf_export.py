"""Export to the Hugging Face format: ``transformers`` loads it and computes our logits.

The checkpoints are written with :func:`~megatron_glm.training.checkpoint.write_checkpoint`
(the files a (tp, pp) training run writes, client state included), from a model built by
``build_model``; the reference is that model's own forward and tied head. Rows come from
:class:`~megatron_glm.data.blank_infilling.BlankInfilling`, one batch per task.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from megatron_glm.config import ModelConfig, ObjectiveConfig
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.hf.export import export_to_hf, parse_size, qkv_to_thudm
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import write_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 256  # padded rows (explicit vocabulary)
S = 64
IDS = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=2, eos=2)
TASKS = ("span", "sentence", "document")


def _cfg() -> ModelConfig:
    return ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=S,
    )


def _checkpoint(
    root: Path, model: GLMModel, *, tp: int = 1, pp: int = 1, data: dict | None = None
) -> Path:
    """``root/global_step7`` + ``latest``, as a (tp, pp) run writes it."""
    tag = root / "global_step7"
    tag.mkdir(parents=True)
    config = {"model": asdict(model.cfg), "data": data or {}}
    base = {"iteration": 7, "consumed_samples": 56, "config": config}
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = tensor_parallel_layout(model.cfg)
    write_checkpoint(full, layout, tag, tp=tp, pp=pp, base=base, marker={})
    (root / "latest").write_text("global_step7")
    return root


@pytest.fixture(scope="module")
def model() -> GLMModel:
    m = build_model(_cfg(), seed=11)
    with torch.no_grad():  # non-trivial biases and norms, so a swapped bias or norm shows
        for name, p in m.named_parameters():
            if not name.endswith("embeddings.weight") and p.dim() == 1:
                p.add_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
                )
    return m.eval()


@pytest.fixture(scope="module")
def exported(model: GLMModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    _checkpoint(root / "ckpt", model)
    export_to_hf(root / "ckpt", root / "hf")
    return root / "hf"


def _rows(task: str, n: int = 3) -> dict[str, torch.Tensor]:
    """A batch of blank-infilling rows of ``task`` from synthetic windows with sentences."""
    bi = BlankInfilling(ObjectiveConfig(), seq_length=S, ids=IDS, seed=5)
    rng = np.random.default_rng(7)

    class Window:
        def __init__(self, index: int) -> None:
            tokens = rng.integers(10, VOCAB - 60, size=bi.window_length)
            tokens[rng.integers(0, bi.window_length, size=3)] = IDS.eos
            self.tokens = tokens
            self.sentence_starts = np.array([0, 11, 23, 40])
            self.epoch, self.index = 0, index

    rows = bi.batch([Window(i) for i in range(n)], [task] * n)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in rows.items()}


def _ours(model: GLMModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
        return model.logits(hidden)


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True).eval()


def _theirs(
    hf: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        out = hf(batch["tokens"], position_ids=batch["position_ids"], attention_mask=mask)
    return out.logits


def _valid(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.arange(S)[None] < batch["valid_len"][:, None]  # [b, s]


@pytest.mark.parametrize("task", TASKS)
def test_logits_equal_ours_on_each_task(exported: Path, model: GLMModel, task: str) -> None:
    """THUDM's inputs (``attention_mask`` = sep): our logits at every non-padding position."""
    batch = _rows(task)
    assert batch["objective"].tolist() == [TASKS.index(task)] * 3
    assert (batch["sep"] < batch["valid_len"]).all()  # every row has a part B
    ours = _ours(model, batch)
    theirs = _theirs(_load(exported), batch, batch["sep"])
    diff = (ours - theirs)[_valid(batch)].abs().max().item()
    print(f"max abs diff, {task}: {diff:.3g}")
    assert diff < 1e-5
    assert ours.abs().max() > 0.1  # not a trivially equal pair


def test_padded_batch_with_full_mask(exported: Path, model: GLMModel) -> None:
    """Rows of mixed tasks and lengths padded to S; the full (sep, valid_len) mask gives our
    logits at every position, padding included; the sep form at the valid ones."""
    from megatron_glm.kernels.attention import glm_attention_mask

    batch = {k: torch.cat([_rows(t, 1)[k] for t in TASKS]) for k in _rows("span", 1)}
    batch["valid_len"] = torch.tensor([S - 20, S - 9, S])
    batch["sep"] = torch.minimum(batch["sep"], batch["valid_len"] - 3)
    ours = _ours(model, batch)
    hf = _load(exported)
    full = glm_attention_mask(batch["sep"], batch["valid_len"], S)  # [b, 1, s, s]
    diff = (ours - _theirs(hf, batch, full)).abs().max().item()
    print(f"max abs diff, padded batch (full mask): {diff:.3g}")
    assert diff < 1e-5
    sep_diff = (ours - _theirs(hf, batch, batch["sep"]))[_valid(batch)].abs().max().item()
    assert sep_diff < 1e-5
    padded = ~_valid(batch)
    assert (ours - _theirs(hf, batch, batch["sep"]))[padded].abs().max() > 1e-4  # mask matters


def test_auto_model_and_labels(exported: Path, model: GLMModel) -> None:
    """AutoModel is THUDM's GLMModel (hidden states and logits); ``labels`` give the mean CE."""
    batch = _rows("span")
    base = transformers.AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
        out = base(batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["sep"])
    valid = _valid(batch)
    assert (hidden - out.last_hidden_states)[valid].abs().max() < 1e-5
    labels = torch.where(batch["loss_mask"] > 0, batch["targets"], -100)
    with torch.no_grad():
        loss = _load(exported)(
            batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=batch["sep"],
            labels=labels,
        ).loss
    want = torch.nn.functional.cross_entropy(
        _ours(model, batch)[labels != -100], labels[labels != -100]
    )
    assert abs(loss.item() - want.item()) < 1e-5


def test_gelu_form_is_honoured(exported: Path, model: GLMModel) -> None:
    """The export says tanh; forcing THUDM's erf changes the logits (the field is read)."""
    batch = _rows("document", 1)
    erf = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        exported, trust_remote_code=True, gelu_approximate="none"
    ).eval()
    diff = (_ours(model, batch) - _theirs(erf, batch, batch["sep"])).abs().max()
    assert diff > 1e-5


def test_folder_config_keys_and_card(exported: Path, model: GLMModel) -> None:
    config = json.loads((exported / "config.json").read_text())
    want = {
        "model_type": "glm",
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_sequence_length": S - 1,  # THUDM's convention: the tables have S rows
        "block_position_encoding": True,
        "output_predict": True,
        "gelu_approximate": "tanh",
        "layernorm_epsilon": 1e-5,
        "intermediate_size": 256,
        "embedding_dropout_prob": 0.1,
        "attention_dropout_prob": 0.1,
        "output_dropout_prob": 0.1,
    }
    assert {k: config[k] for k in want} == want
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}
    layer = [
        f"glm.transformer.layers.{i}.{m}.{p}"
        for i in range(4)
        for p in ("weight", "bias")
        for m in (
            "input_layernorm",
            "attention.query_key_value",
            "attention.dense",
            "post_attention_layernorm",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        )
    ]
    keys = {
        "glm.word_embeddings.weight",
        "glm.transformer.position_embeddings.weight",
        "glm.transformer.block_position_embeddings.weight",
        "glm.transformer.final_layernorm.weight",
        "glm.transformer.final_layernorm.bias",
        *layer,
    }
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert set(f.keys()) == keys
        qkv = f.get_tensor("glm.transformer.layers.2.attention.query_key_value.weight")
        qkv_bias = f.get_tensor("glm.transformer.layers.2.attention.query_key_value.bias")
    ours = model.state_dict()["layers.3.attention.query_key_value.weight"]  # [heads*3*d, h]
    d = 16
    for head in range(4):  # THUDM: Q of head 1 is rows d..2d; ours: rows of [head 1, q]
        for j in range(3):
            assert torch.equal(
                qkv[(j * 4 + head) * d : (j * 4 + head + 1) * d],
                ours[(head * 3 + j) * d : (head * 3 + j + 1) * d],
            )
    ours_bias = model.state_dict()["layers.3.attention.query_key_value.bias"]
    assert torch.equal(qkv_bias, qkv_to_thudm(ours_bias, 4))
    card = (exported / "README.md").read_text()
    n = sum(p.numel() for p in model.parameters())
    for text in (
        f"| parameters | {n:,} |",
        "| training iterations | 7 |",
        "| consumed samples | 56 |",
        f"{VOCAB} rows (padded",
    ):
        assert text in card
    assert (
        json.loads((exported / "generation_config.json").read_text())["_from_model_config"] is False
    )


def _max_diff(path: Path, model: GLMModel) -> float:
    batch = _rows("span")
    theirs = _theirs(_load(path), batch, batch["sep"])
    return (_ours(model, batch) - theirs)[_valid(batch)].abs().max().item()


def test_tensor_and_pipeline_parallel_checkpoint(model: GLMModel, tmp_path: Path) -> None:
    """A (tp 2, pp 2) checkpoint (DeepSpeed's pipeline layer files) exports the same model."""
    _checkpoint(tmp_path / "ckpt", model, tp=2, pp=2)
    assert (tmp_path / "ckpt/global_step7/layer_01-model_01-model_states.pt").is_file()
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert _max_diff(tmp_path / "hf", model) < 1e-5


def test_bf16_halves_the_weights_and_sharding_writes_an_index(
    exported: Path, model: GLMModel, tmp_path: Path
) -> None:
    ckpt = exported.parent / "ckpt"
    export_to_hf(ckpt, tmp_path / "bf16", dtype="bf16", tag="global_step7")
    fp32 = (exported / "model.safetensors").stat().st_size
    bf16 = (tmp_path / "bf16/model.safetensors").stat().st_size
    assert abs(bf16 / fp32 - 0.5) < 0.01
    with safe_open(tmp_path / "bf16/model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}

    limit = parse_size("100KB")
    result = export_to_hf(ckpt, tmp_path / "sharded", max_shard_bytes=limit)
    index = json.loads((tmp_path / "sharded/model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert files == sorted(p.name for p in result.weight_files) and len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "sharded/model.safetensors").exists()
    held: dict[str, str] = {}
    total = 0
    for name in files:
        with safe_open(tmp_path / "sharded" / name, "pt") as f:
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(sizes) <= limit or len(sizes) == 1  # one oversized tensor gets its own file
        held.update(dict.fromkeys(tensors, name))
        total += sum(sizes)
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert set(held) == set(f.keys())
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == total
    assert _max_diff(tmp_path / "sharded", model) < 1e-5


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError, match="--max-shard-size 'five': expected a size"):
        parse_size("five")


def test_errors_name_what_is_wrong(model: GLMModel, exported: Path, tmp_path: Path) -> None:
    ckpt = exported.parent / "ckpt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^{empty}: no 'latest' file; pass the checkpoint tag"):
        export_to_hf(empty, tmp_path / "out")
    with pytest.raises(ValueError, match=r"no checkpoint tag 'global_step9' \(no directory "):
        export_to_hf(ckpt, tmp_path / "out", tag="global_step9")
    with pytest.raises(ValueError, match=f"^{exported} already exists and is not empty"):
        export_to_hf(ckpt, exported)
    with pytest.raises(ValueError, match=r"--dtype 'fp8': expected one of \['bf16', 'fp16'"):
        export_to_hf(ckpt, tmp_path / "out", dtype="fp8")
    zero3 = tmp_path / "zero3"
    _checkpoint(zero3, model)
    tag = zero3 / "global_step7"
    (tag / "mp_rank_00_model_states.pt").rename(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(
        ValueError, match=r"ZeRO-3 model-parallel rank 0 has 1 model-states and 0 optimizer-state"
    ):  # ZeRO-3's weights live in the optimizer-state partitions: without them, incomplete
        export_to_hf(zero3, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a refused checkpoint


def test_cli_and_tokenizer_export(
    model: GLMModel, tmp_path: Path, tiny_tokenizer_model: Path, capsys: pytest.CaptureFixture
) -> None:
    """The tool's output line; the checkpoint's SentencePiece model travels with the folder as a
    transformers tokenizer (AutoTokenizer from the model folder gives GLMTokenizer's ids) and sets
    ``real_vocab_size`` and the generation config's special ids."""
    from megatron_glm.data.tokenizer import GLMTokenizer
    from tools.convert_checkpoint import main

    _checkpoint(tmp_path / "ckpt", model, data={"tokenizer_model": str(tiny_tokenizer_model)})
    main(
        [
            "to-hf",
            "--load",
            str(tmp_path / "ckpt"),
            "--save",
            str(tmp_path / "hf"),
            "--dtype",
            "fp16",
        ]
    )
    tok = GLMTokenizer(tiny_tokenizer_model)
    n = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'hf'}: {n:,} parameters (fp16) in model.safetensors; vocabulary {VOCAB} "
        f"rows ({tok.vocab_size} real); tokenizer exported"
    ]  # the result line only: library INFO goes to stderr under the tool's logging set-up
    assert (tmp_path / "hf/tokenizer.model").read_bytes() == tiny_tokenizer_model.read_bytes()
    assert (
        json.loads((tmp_path / "hf/config.json").read_text())["real_vocab_size"] == tok.vocab_size
    )
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"] == ["tokenization_glm.GLMTokenizer", None]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    text = "Return a [MASK] of the list.<|endoftext|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eop_id  # [gMASK]: the card says pass eos too
    with pytest.raises(SystemExit) as exc:
        main(["to-hf", "--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "error: " in capsys.readouterr().err
