"""Import from the Hugging Face format (THUDM's GLM layout) back into a checkpoint of ours.

Round trip: a model built by ``build_model`` is written as a checkpoint, exported by ``to-hf``,
imported at (1, 1) and (2, 2); the merged state must equal the original exactly and the
re-imported model's logits must equal the original's. The error cases each name the culprit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file

from megatron_glm.hf.export import export_to_hf, qkv_from_thudm, qkv_to_thudm
from megatron_glm.hf.import_hf import import_from_hf
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import read_full_state, reshard_info, saved_config
from tests.unit.test_hf_export import _cfg, _checkpoint, _ours, _rows

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model() -> GLMModel:
    m = build_model(_cfg(), seed=13)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in m.named_parameters():
            if p.dim() == 1:
                g = torch.Generator().manual_seed(len(name))
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def hf_dir(model: GLMModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("import")
    _checkpoint(root / "ckpt", model)
    export_to_hf(root / "ckpt", root / "hf")
    return root / "hf"


def _original(model: GLMModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_qkv_permutation_inverts() -> None:
    w = torch.randn(3 * 64, 64)
    assert torch.equal(qkv_from_thudm(qkv_to_thudm(w, 4), 4), w)
    assert not torch.equal(qkv_to_thudm(w, 4), w)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_round_trip_state_exact(
    hf_dir: Path, model: GLMModel, tmp_path: Path, tp: int, pp: int
) -> None:
    result = import_from_hf(hf_dir, tmp_path / "ck", tp=tp, pp=pp)
    assert (tmp_path / "ck" / "latest").read_text().strip() == "global_step0"
    back = read_full_state(result.tag_dir, tensor_parallel_layout(model.cfg))
    original = _original(model)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], tensor), name
    info = reshard_info(result.tag_dir)
    assert info is not None and info["optimizer_state"] == "dropped"
    assert info["to_tp"] == tp and info.get("to_pp", 1) == pp
    saved = saved_config(result.tag_dir)
    assert saved is not None and saved["model"]["vocab_size"] == model.cfg.vocab_size
    assert result.warnings == []  # exported with tanh GeLU, vocabulary divisible


def test_round_trip_logits(hf_dir: Path, model: GLMModel, tmp_path: Path) -> None:
    result = import_from_hf(hf_dir, tmp_path / "ck")
    again = build_model(result.model, seed=0)
    again.load_state_dict(read_full_state(result.tag_dir, None))
    again.eval()
    for task in ("span", "sentence", "document"):
        batch = _rows(task)
        diff = (_ours(model, batch) - _ours(again, batch)).abs().max().item()
        print(f"round trip max abs diff, {task}: {diff:.3g}")
        assert diff <= 1e-6


def _copy(hf_dir: Path, dst: Path) -> Path:
    shutil.copytree(hf_dir, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "model.safetensors"
    state = load_safetensors(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key_named(hf_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    key = "glm.transformer.layers.2.mlp.dense_4h_to_h.bias"
    _edit_weights(folder, lambda s: s.pop(key))
    with pytest.raises(ValueError, match=rf"missing key.*{key}"):
        import_from_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_wrong_shape_named(hf_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    key = "glm.transformer.layers.1.attention.dense.weight"
    _edit_weights(folder, lambda s: s.update({key: torch.zeros(64, 32)}))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(64, 32\).*\(64, 64\)"):
        import_from_hf(folder, tmp_path / "ck")


def test_unexpected_key_named(hf_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    _edit_weights(folder, lambda s: s.update({"glm.transformer.layers.4.mlp.x": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected key 'glm.transformer.layers.4.mlp.x'"):
        import_from_hf(folder, tmp_path / "ck")


def test_unknown_model_type_named(hf_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "chatglm"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config.json: model_type 'chatglm' is not 'glm'"):
        import_from_hf(folder, tmp_path / "ck")


def test_unprefixed_bin_fp16_and_erf_gelu(hf_dir: Path, model: GLMModel, tmp_path: Path) -> None:
    """THUDM's ``GLMModel`` layout: no ``glm.`` prefix, ``pytorch_model.bin``, fp16, no
    ``gelu_approximate`` (erf): loads the fp16-rounded weights and the imported model config
    computes the erf GeLU (no warning: nothing differs); an export of it says erf again."""
    folder = _copy(hf_dir, tmp_path / "hf")
    state = load_safetensors(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(
        {k.removeprefix("glm."): v.half() for k, v in state.items()}, folder / "pytorch_model.bin"
    )
    raw = json.loads((folder / "config.json").read_text())
    del raw["gelu_approximate"]
    (folder / "config.json").write_text(json.dumps(raw))
    result = import_from_hf(folder, tmp_path / "ck", tp=2)
    back = read_full_state(result.tag_dir, tensor_parallel_layout(model.cfg))
    for name, tensor in _original(model).items():
        assert torch.equal(back[name], tensor.half().float()), name
    assert result.warnings == [] and result.model.gelu == "erf"
    saved = saved_config(result.tag_dir)
    assert saved is not None and saved["model"]["gelu"] == "erf"
    info = reshard_info(result.tag_dir)
    assert info is not None and "hf_gelu" not in info
    export_to_hf(tmp_path / "ck", tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["gelu_approximate"] == "none"
    raw["gelu_approximate"] = "exact"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config.json: gelu_approximate='exact' is not"):
        import_from_hf(folder, tmp_path / "refused")


def test_vocabulary_padded_by_copying_last_row(hf_dir: Path, tmp_path: Path) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    key = "glm.word_embeddings.weight"
    _edit_weights(folder, lambda s: s.update({key: s[key][:200].clone()}))
    raw = json.loads((folder / "config.json").read_text())
    raw["vocab_size"] = 200
    (folder / "config.json").write_text(json.dumps(raw))
    result = import_from_hf(folder, tmp_path / "ck")
    assert result.vocab_rows == (200, 256)
    emb = read_full_state(result.tag_dir, None)["layers.0.word_embeddings.weight"]
    source = load_safetensors(str(folder / "model.safetensors"))[key]
    assert torch.equal(emb[:200], source)
    assert torch.equal(emb[200:], source[-1:].expand(56, -1))
    assert any("padded to 256" in w for w in result.warnings)


def test_cli_from_hf(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.convert_checkpoint import main

    save = tmp_path / "ck"
    main(["from-hf", "--load", str(hf_dir), "--save", str(save), "--tp", "2", "--pp", "2"])
    out = capsys.readouterr().out
    assert out.startswith(f"{save / 'global_step0'}: ")
    assert "at tp 2 x pp 2; vocabulary 256 rows; iteration 0, optimizer restarts" in out
    assert sorted(p.name for p in (save / "global_step0").glob("mp_rank_*")) == [
        f"mp_rank_0{i}_model_states.pt" for i in range(4)
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["from-hf", "--load", str(tmp_path / "nowhere"), "--save", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert f"error: {tmp_path / 'nowhere'}: no config.json" in capsys.readouterr().err


def test_sharded_safetensors(hf_dir: Path, model: GLMModel, tmp_path: Path) -> None:
    root = tmp_path / "src"
    _checkpoint(root, model)
    export = export_to_hf(root, tmp_path / "hf", max_shard_bytes=100_000, dtype="bf16")
    assert len(export.weight_files) > 2
    result = import_from_hf(tmp_path / "hf", tmp_path / "ck", pp=2)
    back = read_full_state(result.tag_dir, tensor_parallel_layout(model.cfg))
    for name, tensor in _original(model).items():
        assert torch.equal(back[name], tensor.bfloat16().float()), name


def test_planted_pickle_refused(hf_dir: Path, tmp_path: Path) -> None:
    """``pytorch_model.bin`` is user input: a pickle that would run code is refused, naming it."""
    import pickle

    class Planted:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("code ran",))

    folder = _copy(hf_dir, tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"glm.word_embeddings.weight": Planted()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused to load: .*type print"):
        import_from_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.pop("num_layers"), r"config.json: missing field\(s\) \['num_layers'\]"),
        (lambda raw: raw.update(relative_encoding=True), r"config.json: relative_encoding=True"),
        (
            lambda raw: raw.update(block_position_encoding=False),
            r"config.json: block_position_encoding=False is not supported",
        ),
        (lambda raw: raw.update(attention_scale=2.0), r"config.json: attention_scale=2.0"),
    ],
)
def test_config_json_refusals_name_the_field(
    hf_dir: Path, tmp_path: Path, edit: object, message: str
) -> None:
    folder = _copy(hf_dir, tmp_path / "hf")
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)  # type: ignore[operator]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        import_from_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_folder_and_layout_refusals_name_what_is_wrong(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--pp 3 does not divide num_layers 4"):
        import_from_hf(hf_dir, tmp_path / "ck", pp=3)
    folder = _copy(hf_dir, tmp_path / "hf")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{folder / 'config.json'}: invalid JSON"):
        import_from_hf(folder, tmp_path / "ck")
    shutil.copyfile(hf_dir / "config.json", folder / "config.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=rf"^{folder}: no weights \(looked for model.safetensors"):
        import_from_hf(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    import_from_hf(hf_dir, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"global_step0 already exists and is not empty"):
        import_from_hf(hf_dir, tmp_path / "ck")


def test_resume_with_another_gelu_is_refused_before_launch(hf_dir: Path, tmp_path: Path) -> None:
    """An erf model (a THUDM folder) resumed by a run left at the default tanh would train the
    weights as another function without any error: the pre-launch check refuses it, naming the
    field and the override; the checkpoint's own values pass, dropout may differ."""
    from megatron_glm.config import ConfigError, RunConfig
    from megatron_glm.training.checkpoint import check_architecture
    from megatron_glm.training.preflight import validate_for_launch

    folder = _copy(hf_dir, tmp_path / "hf")
    raw = json.loads((folder / "config.json").read_text())
    del raw["gelu_approximate"]
    (folder / "config.json").write_text(json.dumps(raw))
    imported = import_from_hf(folder, tmp_path / "ck").model
    load = str(tmp_path / "ck")
    check_architecture(load, replace(imported, hidden_dropout=0.0, kernels="torch"))
    tanh = replace(imported, gelu="tanh")
    with pytest.raises(
        ConfigError, match=r"model.gelu: checkpoint 'erf', run 'tanh'.*model.gelu=erf"
    ):
        check_architecture(load, tanh)
    wider = replace(imported, ffn_hidden_size=8 * imported.hidden_size)
    with pytest.raises(ConfigError, match=r"^config field 'model.ffn_hidden_size'"):
        check_architecture(load, wider)
    base = RunConfig()
    run = RunConfig(
        model=tanh,
        data=replace(base.data, seq_length=tanh.max_position_embeddings),
        checkpoint=replace(base.checkpoint, load=load),
    )
    with pytest.raises(ConfigError, match=r"^config field 'model.gelu'"):
        validate_for_launch(run, world_size=1, check_data=False)
