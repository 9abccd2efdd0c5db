#!/usr/bin/env python
"""The memory estimator (``megatron_glm.planning.memory``) against measured peaks, as a table.

Each case trains a few real steps (``training.step.build_runner``: DeepSpeed's engine, ZeRO,
tensor / pipeline parallelism, the 1F1B schedule) on synthetic rows where every position is a
loss position (the estimate's bound) and measures the peak of **live tensor bytes** on every
rank: a ``TorchDispatchMode`` (:class:`LiveBytes`) entered before the model is built sees every
tensor any op creates (``torch.empty`` of DeepSpeed's buckets included), follows its storage
(``weakref.finalize`` on the ``UntypedStorage``, which torch keeps alive exactly as long as any
tensor, autograd's saved ones included, uses it) and keeps the running sum and its maximum. Not
RSS: the allocator's caching and untouched pages do not count, as
``torch.cuda.max_memory_allocated`` does not count them on a GPU. The peak is taken over the
steps after the first (the optimizer's state exists from the first update on), on the rank with
the largest peak, and compared with ``estimate_memory(..., device="cpu").total`` (offloaded
states added: on CPU they are the same memory). ``static`` is what is alive right before a
steady step's first forward (weights, optimizer, persistent buffers), ``rest`` the peak without
DeepSpeed's fixed-size reduction buckets (whole ``reduce_bucket_size`` elements, which would
otherwise dominate a small model's figure).

    python tools/bench/bench_memory.py [--cases tiny-1,base-tp2] [--check] [--cuda]

``--check`` exits 1 unless every total and every ``rest`` is within 10%. Cases of one world
size run in one launch (one process per rank, gloo, free port). ``BENCH_MEMORY_DEBUG=1``
prints, per rank, where each peak happened (op, frames, the largest live storages).
``--cuda``: measure on one GPU with ``torch.cuda.max_memory_allocated`` instead (world-1 cases
only; the estimate then counts the GPU kernels; not yet run: no GPU was lent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_glm.config import RunConfig, load_config  # noqa: E402
from megatron_glm.planning.memory import (  # noqa: E402
    DS_REDUCE_BUCKET_ELEMENTS,
    estimate_memory,
)

TOLERANCE = 0.10
DEBUG = bool(os.environ.get("BENCH_MEMORY_DEBUG"))
STEPS = 3
"""Steps per case; the peak is over steps 2..STEPS (state allocated by step 1 included)."""

TINY = [
    "model.name=glm-tiny",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.vocab_size=512",
    "model.max_position_embeddings=128",
    "data.seq_length=128",
    "train.micro_batch_size=4",
]
BASE = [
    "model.name=glm-base(2 layers)",
    "model.num_layers=2",
    "model.hidden_size=768",
    "model.num_attention_heads=12",
    "model.vocab_size=30592",
    "model.max_position_embeddings=512",
    "data.seq_length=256",
    "train.micro_batch_size=2",
]


@dataclass(frozen=True)
class Case:
    name: str
    world: int
    overrides: tuple[str, ...]

    def config(self) -> RunConfig:
        return load_config(None, list(self.overrides))


def _case(name: str, model: list[str], world: int, *layout: str, accum: int = 2) -> Case:
    """A case: ``layout`` overrides; the global batch gives ``accum`` micro-batches per rank."""
    cfg = load_config(None, [*model, *layout])
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    batch = cfg.train.micro_batch_size * dp * accum
    return Case(name, world, (*model, *layout, f"train.global_batch_size={batch}"))


CASES = [
    _case("tiny-1", TINY, 1),
    _case("tiny-1-ckpt", TINY, 1, "model.activation_checkpointing=true"),
    _case("tiny-1-z1", TINY, 1, "train.zero_stage=1"),
    _case("tiny-1-z1-bf16", TINY, 1, "train.zero_stage=1", "train.precision=bf16"),
    _case("tiny-1-z2-offload", TINY, 1, "train.zero_stage=2", "train.cpu_offload=true"),
    _case("tiny-dp2-z2", TINY, 2, "train.zero_stage=2"),
    _case("tiny-dp2-z3", TINY, 2, "train.zero_stage=3"),
    _case("tiny-tp2", TINY, 2, "parallel.tp=2"),
    _case("tiny-tp2-sp", TINY, 2, "parallel.tp=2", "parallel.sequence_parallel=true"),
    _case("tiny-pp2", TINY, 2, "parallel.pp=2", accum=4),
    _case("base-1", BASE, 1),
    _case("base-1-z1", BASE, 1, "train.zero_stage=1"),
    _case("base-1-z1-ckpt", BASE, 1, "train.zero_stage=1", "model.activation_checkpointing=true"),
    _case("base-dp2-z1", BASE, 2, "train.zero_stage=1"),
    _case("base-dp2-z2", BASE, 2, "train.zero_stage=2"),
    _case("base-dp2-z3", BASE, 2, "train.zero_stage=3"),
    _case("base-tp2", BASE, 2, "parallel.tp=2"),
    _case("base-tp2-sp", BASE, 2, "parallel.tp=2", "parallel.sequence_parallel=true",
          "train.zero_stage=1"),
    _case("base-tp2-sp-ckpt", BASE, 2, "parallel.tp=2", "parallel.sequence_parallel=true",
          "train.zero_stage=1", "model.activation_checkpointing=true"),
    _case("base-pp2", BASE, 2, "parallel.pp=2", accum=4),
    _case("base-pp2-z1-ckpt", BASE, 2, "parallel.pp=2", "train.zero_stage=1",
          "model.activation_checkpointing=true", accum=4),
]  # fmt: skip


# ----------------------------------------------------------------------------- measuring


class LiveBytes(TorchDispatchMode):
    """Running sum and peak of the bytes of live tensor storages created inside the mode.

    Storages are keyed by their C++ object; a storage seen again (a view, an in-place op, a
    ``resize_``) updates its size. ``weakref.finalize`` on the storage's Python object fires when
    the storage itself is freed: torch preserves that object while any tensor uses the storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.op, self.where, self.top = "", "", list[int]()
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _track(self, tensor: torch.Tensor, func: Any = None) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        old = self.sizes.get(key)
        if old is None:
            weakref.finalize(storage, self._free, key)
        self.sizes[key] = size
        self.current += size - (old or 0)
        if self.current > self.peak:
            self.peak = self.current
            if DEBUG:
                self._record_site(func)

    def _record_site(self, func: Any) -> None:
        """``BENCH_MEMORY_DEBUG=1``: the op, the Python frames and the 12 largest storages of
        the latest peak (printed per rank; how each term of the estimate was located)."""
        import traceback

        frames = [
            f
            for f in traceback.extract_stack()[:-4]
            if "megatron_glm" in f.filename or "deepspeed" in f.filename
        ]
        self.op = str(func)
        self.top = sorted(self.sizes.values(), reverse=True)[:12]
        self.where = " <- ".join(
            f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[::-1][:6]
        )

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out


def synthetic_batch(cfg: RunConfig, index: int) -> dict[str, torch.Tensor]:
    """A micro-batch of the batch contract with a loss on every position (the estimate's bound)."""
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    g = torch.Generator().manual_seed(index)
    sep = torch.randint(s // 4, s // 2, (b,), generator=g)
    positions = torch.zeros(b, 2, s, dtype=torch.long)
    for r in range(b):
        positions[r, 0] = torch.arange(s).clamp(max=int(sep[r]) - 1)
        positions[r, 1, int(sep[r]) :] = torch.arange(1, s - int(sep[r]) + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=g)
    return {
        "tokens": tokens,
        "targets": (tokens * 7 + 3) % cfg.model.vocab_size,
        "loss_mask": torch.ones(b, s),
        "position_ids": positions,
        "sep": sep,
        "valid_len": torch.full((b,), s),
        "objective": torch.arange(b) % 3,
    }


def measure_case(cfg: RunConfig, device: torch.device) -> dict[str, int]:
    """Peak and static live bytes of this rank over steps 2..STEPS (collective)."""
    import torch.distributed as dist

    from megatron_glm.parallel.dims import ParallelDims
    from megatron_glm.training.step import build_runner

    dims = ParallelDims.build(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, sequence_parallel=cfg.parallel.sequence_parallel
    )
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp_size)
    batches = [synthetic_batch(cfg, 1000 * dims.dp_rank + i) for i in range(accum * STEPS)]
    cuda = device.type == "cuda"
    live = LiveBytes()
    with live if not cuda else _NoMode():
        runner = build_runner(cfg, vocab_size=cfg.model.vocab_size, dims=dims, device=device)
        runner.train_step(batches[:accum])
        static = torch.cuda.memory_allocated() if cuda else live.current
        live.reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for step in range(1, STEPS):
            runner.train_step(batches[step * accum : (step + 1) * accum])
        peak = torch.cuda.max_memory_allocated() if cuda else live.peak
    if DEBUG:
        print(
            "PEAK",
            dims.rank,
            peak,
            "static",
            static,
            getattr(live, "op", ""),
            getattr(live, "where", ""),
            [round(x / 1e6, 1) for x in getattr(live, "top", [])],
            flush=True,
        )
    del runner
    out = torch.tensor([peak, static], dtype=torch.float64)
    gathered = [torch.zeros_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out)
    worst = max(gathered, key=lambda t: float(t[0]))
    return {"peak": int(worst[0]), "static": int(worst[1])}


class _NoMode:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def worker(spec_file: str) -> None:
    """One rank of a launch: every case of the spec in turn; rank 0 writes the results."""
    from megatron_glm.training.distributed import (
        destroy_distributed,
        init_distributed,
        read_dist_env,
    )

    spec = json.loads(Path(spec_file).read_text())
    env = read_dist_env()
    device = init_distributed(env)
    results = {}
    try:
        for name, overrides in spec["cases"]:
            torch.manual_seed(1234)
            results[name] = measure_case(load_config(None, overrides), device)
            if env.rank == 0:
                Path(spec["out"]).write_text(json.dumps(results))
    finally:
        destroy_distributed()


def launch(world: int, cases: list[Case], tmp: Path, *, cuda: bool = False) -> dict[str, Any]:
    """Run ``cases`` (all of world size ``world``) in one launch; their measurements by name."""
    from megatron_glm.training.distributed import free_port

    spec = tmp / f"spec_{world}.json"
    out = tmp / f"out_{world}.json"
    spec.write_text(
        json.dumps({"cases": [[c.name, list(c.overrides)] for c in cases], "out": str(out)})
    )
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        if not cuda:
            env["DS_ACCELERATOR"] = "cpu"
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if DEBUG:
        print("\n".join(ln for log in logs for ln in log.splitlines() if ln.startswith("PEAK")))
    if any(p.returncode for p in procs) or not out.is_file():
        raise RuntimeError(f"memory workers failed (world {world}):\n{logs[0][-4000:]}")
    return dict(json.loads(out.read_text()))


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    case: Case
    estimated: int
    measured: int
    estimated_rest: int
    measured_rest: int
    static: int

    @property
    def error(self) -> float:
        return (self.estimated - self.measured) / self.measured

    @property
    def rest_error(self) -> float:
        return (self.estimated_rest - self.measured_rest) / self.measured_rest


def _buckets(cfg: RunConfig) -> int:
    """Bytes of ZeRO's ``reduce_bucket_size`` buckets at the peak (two at a pipeline's ZeRO-1
    reduction, see ``planning.memory._model_states``)."""
    zero = cfg.train.zero_stage
    if zero == 0:
        return 0
    count = 2 if zero == 1 and cfg.parallel.pp > 1 else 1
    return count * DS_REDUCE_BUCKET_ELEMENTS * (4 if cfg.train.precision == "fp32" else 2)


def make_row(case: Case, measured: dict[str, int], device: str) -> Row:
    """The case's estimate and measurement; ``rest`` leaves out ZeRO's fixed-size buckets
    (whole multiples of ``reduce_bucket_size`` elements, present at every ZeRO >= 1 peak)."""
    cfg = case.config()
    est = estimate_memory(cfg, case.world, device=device)
    total = est.total + est.host
    bucket = _buckets(cfg)
    return Row(case, total, measured["peak"], total - bucket, measured["peak"] - bucket,
               measured["static"])  # fmt: skip


def describe(cfg: RunConfig, world: int) -> tuple[str, str, str]:
    p = cfg.parallel
    layout = f"tp{p.tp} pp{p.pp} dp{world // (p.tp * p.pp)}" + (
        " sp" if p.sequence_parallel else ""
    )
    return layout, str(cfg.train.zero_stage), "on" if cfg.model.activation_checkpointing else "off"


def table(rows: list[Row]) -> list[str]:
    mib = 2**20
    head = (
        f"{'case':<18} {'model':<18} {'layout':<14} {'ZeRO':>4} {'ckpt':>4} "
        f"{'estimated MiB':>14} {'measured MiB':>13} {'error':>7} {'rest est':>9} "
        f"{'rest meas':>9} {'rest err':>8}"
    )
    lines = [head]
    for r in rows:
        cfg = r.case.config()
        layout, zero, ckpt = describe(cfg, r.case.world)
        lines.append(
            f"{r.case.name:<18} {cfg.model.name:<18} {layout:<14} {zero:>4} {ckpt:>4} "
            f"{r.estimated / mib:>14.1f} {r.measured / mib:>13.1f} {100 * r.error:>6.1f}% "
            f"{r.estimated_rest / mib:>9.1f} {r.measured_rest / mib:>9.1f} "
            f"{100 * r.rest_error:>7.1f}%"
        )
    return lines


def run(cases: list[Case], *, cuda: bool = False) -> list[Row]:
    """Measure ``cases`` (one launch per world size) and pair them with their estimates."""
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in sorted({c.world for c in cases}):
            group = [c for c in cases if c.world == world]
            measured.update(launch(world, group, Path(tmp), cuda=cuda))
    device = "cuda" if cuda else "cpu"
    return [make_row(c, measured[c.name], device) for c in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--check", action="store_true", help="exit 1 unless all within 10%%")
    ap.add_argument("--cuda", action="store_true", help="measure on one GPU (world-1 cases)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    names = [n for n in args.cases.split(",") if n]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    cases = [c for c in CASES if not names or c.name in names]
    if args.cuda:
        cases = [c for c in cases if c.world == 1]
    rows = run(cases, cuda=args.cuda)
    print("\n".join(table(rows)))
    bad = [r for r in rows if abs(r.error) > TOLERANCE or abs(r.rest_error) > TOLERANCE]
    if args.check and bad:
        raise SystemExit(f"outside {TOLERANCE:.0%}: {[r.case.name for r in bad]}")


if __name__ == "__main__":
    main()
