"""The memory estimator's parts against what they model: DeepSpeed's stage partition, the
model's parameter count, a real block's saved tensors, the loss's peak; and the CLI.

The whole estimate against measured training peaks (DeepSpeed, ZeRO, tp, pp) is
``tests/distributed/test_memory_measured.py`` and ``tools/bench/bench_memory.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron_glm.config import ConfigError, load_config
from megatron_glm.model import build_model, glm_loss, num_parameters
from megatron_glm.planning.memory import (
    MemoryEstimate,
    block_activation_bytes,
    estimate_memory,
    final_layernorm_bytes,
    layer_parameters,
    layer_tensors,
    pipeline_layer_names,
    zero2_gradient_elements,
)

REPO = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_memory", REPO / "tools/bench/bench_memory.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    spec.loader.exec_module(module)
    return module


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.hidden_size=80",
            "model.num_attention_heads=4",
            "model.vocab_size=384",
            "model.max_position_embeddings=64",
            "data.seq_length=48",
            "train.micro_batch_size=3",
            "train.global_batch_size=6",
            *overrides,
        ],
    )


def test_pipeline_layer_names_are_the_pipelines() -> None:
    """The estimator's layer list (it may not import ``training``) is the pipeline's."""
    from megatron_glm.training.pipeline import pipeline_layer_names as built

    for layers in (1, 2, 24):
        assert pipeline_layer_names(layers) == built(layers)


def test_layer_parameters_sum_to_the_model() -> None:
    cfg = _cfg()
    vocab = cfg.model.vocab_size
    assert sum(layer_parameters(cfg.model, vocab, 1, 1)) == num_parameters(cfg.model)
    model = build_model(cfg.model, vocab_size=vocab, device=torch.device("meta"), seed=0)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    assert layer_parameters(cfg.model, vocab, 1, 1) == sizes
    shapes = [[(p.numel(), p.ndim) for p in layer.parameters()] for layer in model.layers]
    assert layer_tensors(cfg.model, vocab, 1, 1) == shapes  # DeepSpeed's flattening order
    # tp 2: every split tensor halves, the replicated ones (biases of row layers, LayerNorms,
    # position tables) do not; with a pipeline the last stage adds the tied head copy.
    tp2 = layer_parameters(cfg.model, vocab, 2, 2)
    h = cfg.model.hidden_size
    assert tp2[-1] == vocab // 2 * h and len(tp2) == len(sizes) + 1
    assert tp2[1] == (sizes[1] - 4 * h - 2 * h) // 2 + 4 * h + 2 * h


def test_zero2_gradient_buffer_counts_whole_overlapping_parameters() -> None:
    """Rank 1's half of ``[10, 2, 2] + [1, 1]`` starts inside the 10: it holds all of it."""
    tensors = [(10, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert zero2_gradient_elements(tensors, 2) == 10 + 2 + 2 + 1
    assert zero2_gradient_elements(tensors, 1) == 16
    assert zero2_gradient_elements([(4, 2), (4, 2)], 2) == 4  # boundaries on tensor edges


def _saved_bytes(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct non-parameter storages ``module``'s forward saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(inputs)
    return sum(seen.values())


@pytest.mark.parametrize(
    "dropouts", [(0.1, 0.1), (0.0, 0.1), (0.0, 0.0)], ids=["math", "flash", "flash-nodrop"]
)
def test_block_activations_are_what_a_block_saves(dropouts: tuple[float, float]) -> None:
    """Attention dropout on CPU takes SDPA's math path (three [b, a, s, s] tensors saved),
    without it the flash path; residual dropout adds its masks. Exact up to the bytes of
    int64 index tensors."""
    attention, hidden = dropouts
    cfg = _cfg(f"model.attention_dropout={attention}", f"model.hidden_dropout={hidden}")
    model = build_model(cfg.model, vocab_size=384, device=torch.device("cpu"), seed=0)
    model.train()
    b, s, h = 3, 48, 80
    x = torch.randn(b, s, h, requires_grad=True)
    sep, valid = torch.tensor([10, 20, 30]), torch.tensor([40, 48, 45])
    measured = _saved_bytes(model.layers[1], (x, sep, valid))
    estimated = block_activation_bytes(cfg, "cpu")
    assert abs(estimated - measured) <= 0.01 * measured, (estimated, measured)


def test_model_and_loss_peak_match_live_bytes() -> None:
    """The forward's saved activations and the fused loss's working set, measured with the
    bench's live-bytes mode on a real model (every position a loss position)."""
    bench = _bench()
    cfg = _cfg("model.vocab_size=4096")
    live = bench.LiveBytes()
    with live:
        model = build_model(cfg.model, vocab_size=4096, device=torch.device("cpu"), seed=0)
        model.train()
        batch = bench.synthetic_batch(cfg, 0)
        before = live.current
        hidden = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
        saved = live.current - before
        live.reset_peak()
        glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
        loss_peak = live.peak - before - saved
    from megatron_glm.planning import memory

    blocks = cfg.model.num_layers * block_activation_bytes(cfg, "cpu")
    expected = blocks + memory.embedding_activation_bytes(cfg) + final_layernorm_bytes(cfg)
    assert abs(saved - expected) <= 0.03 * saved, (saved, expected)
    loss = memory._loss(cfg, 4096).working
    assert abs(loss_peak - loss) <= 0.03 * loss_peak, (loss_peak, loss)


def test_estimate_fields_and_errors() -> None:
    cfg = _cfg("train.zero_stage=1")
    est = estimate_memory(cfg, 2, device="cpu")
    assert isinstance(est, MemoryEstimate)
    parts = [est.params, est.grads, est.optimizer, est.master, est.activations, est.comm_buffers]
    assert est.total == sum(parts) and min(parts) > 0
    psi = num_parameters(cfg.model)
    assert est.params == 4 * psi and est.optimizer == 8 * (-(-psi // 2))
    lines = est.lines()
    assert lines[-1].split()[0] == "total" and f"{est.total:,d}" in lines[-1]
    offload = estimate_memory(_cfg("train.zero_stage=2", "train.cpu_offload=true"), 2)
    assert offload.optimizer == offload.master == 0 and offload.host > 0
    with pytest.raises(ConfigError, match="tp x pp = 2 must divide the world size 3"):
        estimate_memory(_cfg("parallel.tp=2"), 3)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        estimate_memory(_cfg("model.vocab_size=0"), 1)


def test_checkpointing_and_sequence_parallel_shrink_activations() -> None:
    """Each memory-saving switch lowers the activation term, on the GPU kernels too."""
    plain = estimate_memory(_cfg("parallel.tp=2", "train.zero_stage=1"), 2)
    sp = estimate_memory(_cfg("parallel.tp=2", "parallel.sequence_parallel=true",
                              "train.zero_stage=1"), 2)  # fmt: skip
    ckpt = estimate_memory(_cfg("parallel.tp=2", "model.activation_checkpointing=true",
                                "train.zero_stage=1"), 2)  # fmt: skip
    assert sp.activations < plain.activations and ckpt.activations < plain.activations
    assert sp.params == plain.params == ckpt.params


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    import estimate_memory as tool

    tool.main(["--config", str(REPO / "configs/pretrain_glm_410m.yaml"), "--world-size", "8",
               "--vocab-size", "30592", "model.vocab_size=0"])  # fmt: skip
    out = capsys.readouterr().out
    cfg = load_config(REPO / "configs/pretrain_glm_410m.yaml")
    est = estimate_memory(cfg, 8, vocab_size=30592)
    assert f"{est.total:,d}" in out and "ZeRO-1" in out and "dp 8" in out
