"""One rank of the tensor-parallel test world (4 gloo processes, launched by the test).

Every check runs in the same world, one after the other, so the suite pays the process start-up
(torch + DeepSpeed imports) once. Each check returns a JSON-able dict of measured numbers; the
result (or the traceback) is written per rank to ``$TP_TEST_OUT/rank{r}.json`` and asserted by
``test_tensor_parallel.py``. Checks compare against independent references computed in this file:
the tp = 1 model (plain layers, no collectives), torch's cross entropy, explicit per-rank tensors.

Run by hand: RANK=r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 TP_TEST_OUT=/tmp/x
python tests/distributed/_tp_worker.py (for r in 0..3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.config import ModelConfig
from megatron_glm.model import (
    GLMModel,
    build_model,
    glm_loss,
    tensor_parallel_bytes_per_layer,
    tensor_parallel_layout,
)
from megatron_glm.parallel import mappings as M
from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import grad_norm, partition_dims
from megatron_glm.training.distributed import init_distributed, read_dist_env

WORLD = 4
VOCAB = 96
B, S = 2, 16
SEED = 7


def tiny(**overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return ModelConfig(**{**base, **overrides})


def make_batch(seed: int, b: int = B) -> dict[str, torch.Tensor]:
    """Rows ``[part A | part B | padding]`` with GLM 2D positions (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    sep = torch.randint(2, S // 2, (b,), generator=g)
    valid = torch.randint(S // 2 + 2, S + 1, (b,), generator=g)
    tokens = torch.randint(0, VOCAB, (b, S), generator=g)
    position_ids = torch.zeros(b, 2, S, dtype=torch.long)
    loss_mask = torch.zeros(b, S)
    for r in range(b):
        p, n = int(sep[r]), int(valid[r])
        position_ids[r, 0, :p] = torch.arange(p)
        position_ids[r, 0, p:n] = p - 1
        position_ids[r, 1, p:n] = torch.arange(1, n - p + 1)
        loss_mask[r, p:n] = 1.0
    return dict(
        tokens=tokens,
        position_ids=position_ids,
        sep=sep,
        valid_len=valid,
        targets=torch.randint(0, VOCAB, (b, S), generator=g),
        loss_mask=loss_mask,
        objective=torch.randint(0, 3, (b,), generator=g),
    )


def forward_loss(model: GLMModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
    out = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
    return out.sum_loss / out.num_tokens


def gather_full(tensor: torch.Tensor, dim: int | None, dims: ParallelDims) -> torch.Tensor:
    """Concatenate a TP-split tensor over the TP group (replicated: returned as is)."""
    if dim is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dims.tp)]
    dist.all_gather(parts, tensor.contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=dim)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (a norm-relative error; 0 for identical tensors)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def full_grads(model: GLMModel, dims: ParallelDims) -> dict[str, torch.Tensor]:
    layout = partition_dims(model)
    return {
        name: gather_full(p.grad, layout[name], dims)
        for name, p in model.named_parameters()
        if p.grad is not None
    }


# ----------------------------------------------------------------------------- checks


def check_layout(ctx: dict[str, Any]) -> dict[str, Any]:
    """Our groups vs DeepSpeed's own PipelineParallelGrid on the same topology."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    out: dict[str, Any] = {}
    for tp in (1, 2, 4):
        dims = ctx["dims"][tp]
        grid = PipelineParallelGrid(topology=dims.topology())
        ours = {
            "tp_rank": dims.get_tensor_model_parallel_rank(),
            "tp_size": dims.get_tensor_model_parallel_world_size(),
            "dp_rank": dims.get_data_parallel_rank(),
            "dp_size": dims.get_data_parallel_world_size(),
            "dp_ranks": dims.get_data_parallel_group_ranks(),
            "pp_rank": dims.get_pipeline_model_parallel_rank(),
            "mp_rank": dims.get_model_parallel_rank(),
            "mp_size": dims.get_model_parallel_world_size(),
        }
        theirs = {
            "tp_rank": grid.get_tensor_model_parallel_rank(),
            "tp_size": grid.get_tensor_model_parallel_world_size(),
            "dp_rank": grid.get_data_parallel_rank(),
            "dp_size": grid.get_data_parallel_world_size(),
            "dp_ranks": grid.get_data_parallel_group_ranks(),
            "pp_rank": grid.get_pipeline_model_parallel_rank(),
            "mp_rank": grid.get_model_parallel_rank(),
            "mp_size": grid.get_model_parallel_world_size(),
        }
        # The groups really connect the ranks we claim: sum of global ranks over each group.
        sums = []
        for group, ranks in ((dims.tp_group, dims.tp_ranks), (dims.dp_group, dims.dp_ranks)):
            t = torch.tensor([float(dims.rank)])
            dist.all_reduce(t, group=group)
            sums.append([t.item(), float(sum(ranks))])
        out[f"tp{tp}"] = {"ours": ours, "deepspeed": theirs, "group_sums": sums}
    return out


def _per_rank(seed: int, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100 + rank))


def check_mappings(ctx: dict[str, Any]) -> dict[str, Any]:
    """Each collective's forward and backward against tensors computed explicitly per rank."""
    dims: ParallelDims = ctx["dims"][4]
    g, r, t = dims.tp_group, dims.tp_rank, dims.tp
    shape = (2, 8, 4)  # [b, s, h]

    def xs(seed: int) -> list[torch.Tensor]:
        return [_per_rank(seed, k, shape) for k in range(t)]

    def run(fn: Callable[[torch.Tensor], torch.Tensor], seed: int, out_shape: tuple[int, ...]):
        x = xs(seed)[r].clone().requires_grad_()
        y = fn(x)
        gy = [_per_rank(seed + 1, k, out_shape) for k in range(t)]
        y.backward(gy[r])
        return y.detach(), x.grad, xs(seed), gy

    errors: dict[str, float] = {}

    def err(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        errors[name] = max(errors.get(name, 0.0), (got - want).abs().max().item())

    y, gx, x, gy = run(lambda v: M.copy_to_tensor_parallel_region(v, g), 1, shape)
    err("copy_to.fwd", y, x[r])
    err("copy_to.bwd", gx, sum(gy))
    y, gx, x, gy = run(lambda v: M.reduce_from_tensor_parallel_region(v, g), 3, shape)
    err("reduce_from.fwd", y, sum(x))
    err("reduce_from.bwd", gx, gy[r])
    y, gx, x, gy = run(lambda v: M.scatter_to_tensor_parallel_region(v, g), 5, (2, 8, 1))
    err("scatter_tp.fwd", y, x[r].chunk(t, -1)[r])
    err("scatter_tp.bwd", gx, torch.cat(gy, -1))
    y, gx, x, gy = run(lambda v: M.gather_from_tensor_parallel_region(v, g), 7, (2, 8, 16))
    err("gather_tp.fwd", y, torch.cat(x, -1))
    err("gather_tp.bwd", gx, gy[r].chunk(t, -1)[r])
    y, gx, x, gy = run(lambda v: M.scatter_to_sequence_parallel_region(v, g), 9, (2, 2, 4))
    err("scatter_sp.fwd", y, x[r].chunk(t, 1)[r])
    err("scatter_sp.bwd", gx, torch.cat(gy, 1))
    y, gx, x, gy = run(lambda v: M.gather_from_sequence_parallel_region(v, g), 11, (2, 32, 4))
    err("gather_sp.fwd", y, torch.cat(x, 1))
    err("gather_sp.bwd_reduce_scatter", gx, sum(gy).chunk(t, 1)[r])
    y, gx, x, gy = run(
        lambda v: M.gather_from_sequence_parallel_region(v, g, grad_is_partial=False),
        13,
        (2, 32, 4),
    )
    err("gather_sp_replicated.bwd_split", gx, gy[r].chunk(t, 1)[r])
    y, gx, x, gy = run(lambda v: M.reduce_scatter_to_sequence_parallel_region(v, g), 15, (2, 2, 4))
    err("reduce_scatter_sp.fwd", y, sum(x).chunk(t, 1)[r])
    err("reduce_scatter_sp.bwd", gx, torch.cat(gy, 1))
    return {"max_abs_error": errors}


def check_equality(ctx: dict[str, Any]) -> dict[str, Any]:
    """tp in {2, 4} x SP: loss, logits and every gradient (gathered) vs the tp = 1 model."""
    cfg = tiny()
    batch = make_batch(11)
    ref = build_model(cfg, vocab_size=VOCAB, seed=SEED)
    ref_loss = forward_loss(ref, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    with torch.no_grad():
        ref.eval()
        hidden = ref(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
        ref_logits = ref.logits(hidden)
    results: dict[str, Any] = {}
    for tp in (2, 4):
        for sp in (False, True):
            dims = ctx["sp_dims" if sp else "dims"][tp]
            model = build_model(cfg, vocab_size=VOCAB, seed=SEED, dims=dims)
            layout = partition_dims(model)
            weights = max(
                rel_diff(gather_full(p.detach(), layout[n], dims), dict(ref.named_parameters())[n])
                for n, p in model.named_parameters()
            )
            loss = forward_loss(model, batch)
            loss.backward()
            grads = full_grads(model, dims)
            with torch.no_grad():
                model.eval()
                h = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])
                logits = model.logits(h)
            grad_rel = {n: rel_diff(grads[n], ref_grads[n]) for n in ref_grads}
            ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
            norm = grad_norm(model.parameters(), dims)
            results[f"tp{tp}_sp{int(sp)}"] = {
                "weights": weights,
                "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                "logits": rel_diff(logits, ref_logits),
                "grad_max": max(grad_rel.values()),
                "grad_worst": max(grad_rel, key=grad_rel.__getitem__),
                "grad_norm": abs(norm.item() - ref_norm.item()) / ref_norm.item(),
                "num_grads": len(grads),
                "num_params": len(ref_grads),
            }
    return results


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record (op, payload bytes) of every all-reduce / all-gather / reduce-scatter."""
    log: list[tuple[str, int]] = []
    originals = (dist.all_reduce, dist.all_gather_single, dist.reduce_scatter_single)

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        log.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return originals[0](tensor, *args, **kwargs)

    def all_gather_single(out: torch.Tensor, inp: torch.Tensor, *args: Any, **kw: Any) -> Any:
        log.append(("all_gather", out.numel() * out.element_size()))
        return originals[1](out, inp, *args, **kw)

    def reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, *args: Any, **kw: Any) -> Any:
        log.append(("reduce_scatter", inp.numel() * inp.element_size()))
        return originals[2](out, inp, *args, **kw)

    patched = {
        "all_reduce": all_reduce,
        "all_gather_single": all_gather_single,
        "reduce_scatter_single": reduce_scatter_single,
    }
    saved = {name: getattr(dist, name) for name in patched}
    for name, fn in patched.items():
        setattr(dist, name, fn)
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def check_traffic(ctx: dict[str, Any]) -> dict[str, Any]:
    """Collectives of one transformer block (fwd + bwd) counted vs the docstring formula."""
    results: dict[str, Any] = {}
    for tp in (2, 4):
        for sp in (False, True):
            for ckpt, dropout in ((False, 0.0), (True, 0.0), (True, 0.1)):
                cfg = tiny(activation_checkpointing=ckpt, hidden_dropout=dropout)
                dims = ctx["sp_dims" if sp else "dims"][tp]
                model = build_model(cfg, vocab_size=VOCAB, seed=SEED, dims=dims)
                block = model.layers[1]
                s_local = S // tp if sp else S
                x = torch.randn(B, s_local, cfg.hidden_size, requires_grad=True)
                batch = make_batch(3)
                with count_collectives() as log:
                    (out, *_) = block((x, batch["sep"], batch["valid_len"]))
                    out.backward(torch.ones_like(out))
                counted = {
                    op: sum(n for o, n in log if o == op)
                    for op in ("all_reduce", "all_gather", "reduce_scatter")
                }
                want = tensor_parallel_bytes_per_layer(
                    cfg,
                    micro_batch_size=B,
                    seq_length=S,
                    tp=tp,
                    sequence_parallel=sp,
                    bytes_per_element=4,
                )
                results[f"tp{tp}_sp{int(sp)}_ckpt{int(ckpt)}_dropout{dropout}"] = {
                    "counted": counted,
                    "formula": {
                        "all_reduce": want.all_reduce_bytes,
                        "all_gather": want.all_gather_bytes,
                        "reduce_scatter": want.reduce_scatter_bytes,
                    },
                    "wire_bytes_per_rank": want.wire_bytes_per_rank,
                    "collectives": len(log),
                }
    return results


def check_cross_entropy(ctx: dict[str, Any]) -> dict[str, Any]:
    """Vocab-parallel CE vs torch CE, forward and backward, with and without padding rows."""
    dims: ParallelDims = ctx["dims"][4]
    n, vocab = 10, 64  # shards of 16 ids; valid 37 leaves rank 2 partly, rank 3 wholly padding
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=g) * 3
    out: dict[str, Any] = {}
    for valid in (None, 37):
        limit = vocab if valid is None else valid
        target = torch.randint(0, limit, (n,), generator=g)
        target[0] = limit - 1  # the last valid id
        weights = torch.rand(n, generator=g)
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full[:, :limit], target, reduction="none")
        (ref * weights).sum().backward()
        local = logits.chunk(dims.tp, -1)[dims.tp_rank].clone().requires_grad_()
        got = vocab_parallel_cross_entropy(
            local,
            target,
            dims.tp_group,
            vocab_start=dims.tp_rank * (vocab // dims.tp),
            vocab_size=vocab,
            valid_vocab_size=valid,
        )
        (got * weights).sum().backward()
        assert full.grad is not None and local.grad is not None
        want_grad = full.grad.chunk(dims.tp, -1)[dims.tp_rank]
        out[f"valid{valid}"] = {
            "loss": rel_diff(got.detach(), ref.detach()),
            "grad": rel_diff(local.grad, want_grad),
        }
    try:
        bad = torch.full((n,), 40)
        vocab_parallel_cross_entropy(
            logits.chunk(4, -1)[dims.tp_rank],
            bad,
            dims.tp_group,
            vocab_start=dims.tp_rank * 16,
            vocab_size=vocab,
            valid_vocab_size=37,
        )
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    return out


def _state_hash() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def record_dropout_states(model: GLMModel) -> Iterator[dict[str, list[str]]]:
    """Hash of the CPU generator state at every hidden-dropout and attention-dropout draw."""
    seen: dict[str, list[str]] = {"hidden": [], "attention": []}
    hooks = [
        m.register_forward_pre_hook(lambda *_: seen["hidden"].append(_state_hash()))
        for m in model.modules()
        if isinstance(m, torch.nn.Dropout)
    ]
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["attention"].append(_state_hash())
        return sdpa(*args, **kwargs)

    setattr(F, "scaled_dot_product_attention", recording_sdpa)  # noqa: B010
    try:
        yield seen
    finally:
        setattr(F, "scaled_dot_product_attention", sdpa)  # noqa: B010
        for h in hooks:
            h.remove()


def check_rng(ctx: dict[str, Any]) -> dict[str, Any]:
    """The tracker's contract, on the generator states each dropout draws from."""
    out: dict[str, Any] = {}
    batch = make_batch(5)
    cfg = tiny(hidden_dropout=0.2, attention_dropout=0.2)
    for tp in (2, 4):
        for sp in (False, True):
            dims = ctx["sp_dims" if sp else "dims"][tp]
            model = build_model(cfg, vocab_size=VOCAB, seed=SEED, dims=dims)
            torch.manual_seed(123)  # the loop seeds the default stream equally on every rank
            with record_dropout_states(model) as seen:
                forward_loss(model, batch)
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, seen)
            peers = [everyone[r] for r in dims.tp_ranks]
            dp_peer = everyone[dims.dp_ranks[(dims.dp_rank + 1) % dims.dp_size]]
            out[f"tp{tp}_sp{int(sp)}"] = {
                kind: {
                    "draws": len(seen[kind]),
                    "same_across_tp": all(p[kind] == seen[kind] for p in peers),
                    "distinct_across_tp": len({tuple(p[kind]) for p in peers}) == len(peers),
                    "same_across_dp": dp_peer[kind] == seen[kind],
                }
                for kind in ("hidden", "attention")
            }
    # Activation checkpointing replays both streams: identical gradients (tp = 2, dropout on).
    dims = ctx["dims"][2]
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, ckpt, tracker_seed in (
        ("plain", False, SEED),
        ("ckpt", True, SEED),
        ("other_tp_stream", False, SEED + 1),
    ):
        model = build_model(
            tiny(hidden_dropout=0.2, attention_dropout=0.2, activation_checkpointing=ckpt),
            vocab_size=VOCAB,
            seed=SEED,
            dims=dims,
        )
        model.rng.manual_seed(tracker_seed)
        torch.manual_seed(99)
        forward_loss(model, batch).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out["checkpoint_max_abs_diff"] = max(
        (grads["ckpt"][n] - grads["plain"][n]).abs().max().item() for n in grads["plain"]
    )
    out["other_tp_stream_max_abs_diff"] = max(
        (grads["other_tp_stream"][n] - grads["plain"][n]).abs().max().item() for n in grads["plain"]
    )
    return out


# ----------------------------------------------------------------------------- DeepSpeed


def _run_config(steps: int) -> Any:
    from megatron_glm.config import (
        DataConfig,
        OptimizerConfig,
        ParallelConfig,
        RunConfig,
        TrainConfig,
    )

    return RunConfig(
        model=tiny(),
        data=DataConfig(seq_length=S),
        parallel=ParallelConfig(tp=2),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, clip_grad=1.0, warmup_iters=0),
        train=TrainConfig(
            micro_batch_size=1, global_batch_size=4, train_iters=steps, zero_stage=1, seed=SEED
        ),
    )


def global_batch(step: int) -> list[dict[str, torch.Tensor]]:
    """The 4 rows of optimizer step ``step``, one dict per row (two batches, alternating, so
    the loss really falls)."""
    rows = make_batch(1000 + step % 2, b=4)
    return [{k: v[i : i + 1] for k, v in rows.items()} for i in range(4)]


def reference_curve(steps: int) -> list[float]:
    """One process, plain torch: AdamW on the global-batch mean loss, clipped like DeepSpeed."""
    from megatron_glm.training.engine import param_groups

    cfg = _run_config(steps)
    model = build_model(cfg.model, vocab_size=VOCAB, seed=SEED)
    o = cfg.optimizer
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
    )
    losses = []
    for step in range(steps):
        rows = global_batch(step)
        total = sum(r["loss_mask"].sum() for r in rows)
        loss = torch.zeros(())
        for r in rows:
            hidden = model(r["tokens"], r["position_ids"], r["sep"], r["valid_len"])
            loss = (
                loss
                + glm_loss(model, hidden, r["targets"], r["loss_mask"], r["objective"]).sum_loss
            )
        loss = loss / total
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        losses.append(loss.item())
    return losses


def check_deepspeed(ctx: dict[str, Any]) -> dict[str, Any]:
    """dp=2 x tp=2, ZeRO-1, 20 steps vs one process; then save, reshard 2 -> 1 -> 4, reload."""
    import deepspeed

    from megatron_glm.training.checkpoint import reshard_checkpoint
    from megatron_glm.training.engine import (
        GLMPretrainModule,
        build_optimizer,
        deepspeed_config,
    )

    steps = 20
    cfg = _run_config(steps)
    dims: ParallelDims = ctx["dims"][2]
    glm = build_model(cfg.model, vocab_size=VOCAB, seed=SEED, dims=dims)
    module = GLMPretrainModule(glm)
    optimizer = build_optimizer(
        module, cfg.optimizer, device=torch.device("cpu"), cpu_offload=False
    )
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=deepspeed_config(cfg, dims.dp_size),
        mpu=dims,
        dist_init_required=False,
    )
    init_s = time.perf_counter() - t0
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp_size)
    losses: list[float] = []
    for step in range(steps):
        rows = global_batch(step)
        mine = rows[dims.dp_rank * accum : (dims.dp_rank + 1) * accum]
        count = torch.tensor([float(sum(r["loss_mask"].sum() for r in mine))])
        dist.all_reduce(count, group=dims.dp_group)
        total = torch.zeros(1)
        for r in mine:
            out = engine(r)
            engine.backward(out.sum_loss * accum * dims.dp_size / count[0])
            total += out.sum_loss.detach()
            engine.step()
        dist.all_reduce(total, group=dims.dp_group)
        losses.append((total / count).item())
    result: dict[str, Any] = {"losses": losses, "init_s": init_s}
    if dims.rank == 0:
        ref = reference_curve(steps)
        result["reference"] = ref
        result["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True))

    # Save (DeepSpeed's mp_rank files), reshard 2 -> 1 -> 4, compare logits.
    root = Path(ctx["out_dir"]) / "ckpt"
    engine.save_checkpoint(
        str(root / "tp2"),
        tag="global_step20",
        client_state={"config": {"model": dataclasses.asdict(cfg.model)}},
    )
    probe = make_batch(77)
    glm.eval()
    with torch.no_grad():
        h = glm(probe["tokens"], probe["position_ids"], probe["sep"], probe["valid_len"])
        logits_tp2 = glm.logits(h)
    layout = tensor_parallel_layout(cfg.model)
    dist.barrier()
    if dims.rank == 0:
        r1 = reshard_checkpoint(root / "tp2", root / "tp1", 1, layout)
        r4 = reshard_checkpoint(root / "tp1", root / "tp4", 4, layout)
        r2 = reshard_checkpoint(root / "tp4", root / "tp2_again", 2, layout)
        result["reshard"] = {
            "tp1": [p.name for p in r1.files],
            "tp4": [p.name for p in r4.files],
            "tp2_again": [p.name for p in r2.files],
            "dropped_from_tp2": r1.dropped,
        }
    dist.barrier()
    d4: ParallelDims = ctx["dims"][4]
    for name, d, directory in (("tp1", None, "tp1"), ("tp4", d4, "tp4")):
        rank = 0 if d is None else d.tp_rank
        blob = torch.load(
            root / directory / "global_step20" / f"mp_rank_{rank:02d}_model_states.pt",
            map_location="cpu",
            weights_only=True,
        )
        model = build_model(cfg.model, vocab_size=VOCAB, seed=0, dims=d).eval()
        model.layers.load_state_dict(
            {k.removeprefix("layers."): v for k, v in blob["module"].items()}
        )
        with torch.no_grad():
            h = model(probe["tokens"], probe["position_ids"], probe["sep"], probe["valid_len"])
            result[f"logits_{name}_vs_tp2"] = rel_diff(model.logits(h), logits_tp2)

    # DeepSpeed itself loads the resharded (tp 2 -> 1 -> 4 -> 2) files into the running engine:
    # scramble the weights, load without optimizer state, and the logits are back.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    path, _ = engine.load_checkpoint(str(root / "tp2_again"), load_optimizer_states=False)
    result["deepspeed_loaded"] = path
    with torch.no_grad():
        h = glm(probe["tokens"], probe["position_ids"], probe["sep"], probe["valid_len"])
        result["logits_deepspeed_reloaded_vs_tp2"] = rel_diff(glm.logits(h), logits_tp2)
    return result


# ----------------------------------------------------------------------------- main

CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "layout": check_layout,
    "mappings": check_mappings,
    "equality": check_equality,
    "traffic": check_traffic,
    "cross_entropy": check_cross_entropy,
    "rng": check_rng,
    "deepspeed": check_deepspeed,
}


def main() -> None:
    rank = int(os.environ["RANK"])
    out_dir = Path(os.environ["TP_TEST_OUT"])
    only = os.environ.get("TP_TEST_ONLY")
    torch.set_num_threads(1)
    init_distributed(read_dist_env(), timeout_minutes=2.0)  # gloo, DeepSpeed's comm too
    ctx: dict[str, Any] = {"out_dir": str(out_dir)}
    ctx["dims"] = {tp: ParallelDims.build(tp=tp) for tp in (1, 2, 4)}
    ctx["sp_dims"] = {
        tp: dataclasses.replace(ctx["dims"][tp], sequence_parallel=True) for tp in (2, 4)
    }
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        if only and name not in only.split(","):
            continue
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "value": check(ctx)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
