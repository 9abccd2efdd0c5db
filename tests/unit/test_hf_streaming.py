"""Streaming conversion: the same bytes as the load-everything path, one tensor alive at a time.

The reference for ``to-hf`` is the path before streaming, written out here: every shard loaded and
merged (:func:`~megatron_glm.training.checkpoint.read_full_state`), converted and saved with
``safetensors.torch.save_file``. Memory is checked by counting, at every write, the converted
tensors still alive (weak references): streaming keeps a handful, a path that materialises the
state dict keeps all of them. (tests/unit/test_bench_convert.py measures the resident set.)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from megatron_glm.hf.export import SAFE_INDEX, convert_state, export_to_hf
from megatron_glm.hf.import_hf import import_from_hf
from megatron_glm.hf.safetensors_stream import ShardWriter, TensorSpec
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import read_full_state
from megatron_glm.training.checkpoint.stream import StreamingState
from tests.unit.test_hf_export import _cfg, _checkpoint


@pytest.fixture(scope="module")
def model() -> GLMModel:
    return build_model(_cfg(), seed=17)


@pytest.fixture(scope="module")
def ckpt(model: GLMModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("stream") / "ckpt", model, tp=2, pp=2)


def _old_export(ckpt: Path, dst: Path, max_shard_bytes: int) -> list[Path]:
    """The export before streaming: the whole model merged, then ``save_file`` per shard."""
    full = read_full_state(ckpt / "global_step7", tensor_parallel_layout(_cfg()))
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in convert_state(full.items(), _cfg(), torch.float32):
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    dst.mkdir()
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(dst / name), metadata={"format": "pt"})
    return [dst / name for name in names]


@pytest.mark.parametrize("max_shard_bytes", [5 * 10**9, 100_000])
def test_tp2_pp2_export_equals_old_path_byte_for_byte(
    ckpt: Path, tmp_path: Path, max_shard_bytes: int
) -> None:
    new = export_to_hf(ckpt, tmp_path / "new", max_shard_bytes=max_shard_bytes).weight_files
    old = _old_export(ckpt, tmp_path / "old", max_shard_bytes)
    assert [p.name for p in new] == [p.name for p in old]
    assert (len(new) > 2) == (max_shard_bytes == 100_000)
    for a, b in zip(new, old, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (tmp_path / "new" / SAFE_INDEX).exists() == (len(new) > 1)


def test_bf16_shard_bytes_equal_save_file(tmp_path: Path) -> None:
    """Mixed names and a bf16 dtype: header order, padding and data equal ``save_file``'s."""
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(3, n, generator=g).bfloat16() for k, n in [("b.x", 5), ("a", 2)]}
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardWriter(tmp_path / "new.safetensors", specs, {"format": "pt"})
    writer.write("b.x", tensors["b.x"])
    with pytest.raises(ValueError, match=r"'a' is torch.float32 \(3, 2\), the header says"):
        writer.write("a", tensors["a"].float())
    assert not writer.complete
    writer.write("a", tensors["a"])
    writer.close()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "new.safetensors").read_bytes() == (
        tmp_path / "old.safetensors"
    ).read_bytes()


def _tracked(monkeypatch: pytest.MonkeyPatch) -> tuple[list[weakref.ref], list[int]]:
    """Weak references to every merged tensor the export reads, and the number alive at each
    tensor written."""
    refs: list[weakref.ref] = []
    alive: list[int] = []
    original = StreamingState.__iter__

    def iterate(self: StreamingState) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in original(self):
            refs.append(weakref.ref(tensor))
            yield name, tensor

    write = ShardWriter.write

    def counting_write(self: ShardWriter, name: str, tensor: Tensor) -> None:
        write(self, name, tensor)
        alive.append(sum(ref() is not None for ref in refs))

    monkeypatch.setattr(StreamingState, "__iter__", iterate)
    monkeypatch.setattr(ShardWriter, "write", counting_write)
    return refs, alive


def test_export_holds_one_tensor_at_a_time(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, alive = _tracked(monkeypatch)
    export_to_hf(ckpt, tmp_path / "hf")  # one 5 GB shard: the whole model in one file
    n = len(tensor_parallel_layout(_cfg()))
    assert len(refs) == len(alive) == n  # every tensor read once and written once
    assert max(alive) <= 2, alive  # the one being written (and its source) only


def test_counter_sees_a_materialised_state(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: the same export fed the whole merged state (as read_full_state
    gives it) is caught holding every tensor."""
    _, alive = _tracked(monkeypatch)
    streaming = StreamingState.__iter__

    def whole(self: StreamingState) -> Iterator[tuple[str, Tensor]]:
        full = dict(streaming(self))  # materialise first, as the old path did
        yield from full.items()

    monkeypatch.setattr(StreamingState, "__iter__", whole)
    export_to_hf(ckpt, tmp_path / "hf")
    assert max(alive) == len(tensor_parallel_layout(_cfg()))


def test_import_holds_one_layer_at_a_time(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """from-hf at tp 2 x pp 2: every tensor read once, and at each file written only that
    layer's tensors are alive."""
    export_to_hf(ckpt, tmp_path / "hf")
    from megatron_glm.hf.hf_weights import HFWeights

    refs: list[tuple[str, weakref.ref]] = []
    alive: list[set[str]] = []
    lookup = HFWeights.__getitem__

    def tracked(self: HFWeights, name: str) -> Tensor:
        tensor = lookup(self, name)
        refs.append((name, weakref.ref(tensor)))
        return tensor

    save = torch.save

    def counting_save(obj: object, path: object) -> None:
        save(obj, path)
        alive.append({name.split(".")[1] for name, ref in refs if ref() is not None})

    monkeypatch.setattr(HFWeights, "__getitem__", tracked)
    monkeypatch.setattr(torch, "save", counting_save)
    import_from_hf(tmp_path / "hf", tmp_path / "ck", tp=2, pp=2)
    assert sorted(name for name, _ in refs) == sorted(tensor_parallel_layout(_cfg()))
    assert max(len(layers) for layers in alive) == 1  # one layer's tensors at most
    monkeypatch.undo()
    back = read_full_state(tmp_path / "ck/global_step0", tensor_parallel_layout(_cfg()))
    original = read_full_state(ckpt / "global_step7", tensor_parallel_layout(_cfg()))
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_replicated_mismatch_leaves_no_folder(ckpt: Path, tmp_path: Path) -> None:
    """A data error found while streaming (replicated TP pieces that differ) removes the
    partial folder."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    path = bad / "global_step7/layer_02-model_01-model_states.pt"
    state = torch.load(path, weights_only=True)
    state["input_layernorm.weight"] = state["input_layernorm.weight"] + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"replicated tensor 'layers.2.input_layernorm.weight' "):
        export_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
