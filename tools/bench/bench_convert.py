"""Hugging Face conversion: wall time and peak memory of ``to-hf`` and ``from-hf``, streaming
against the old load-everything path, on a randomly initialised checkpoint saved at tp 2 x pp 2.

Set-up (this process): the model shape of ``configs/model/<--model>.yaml`` (a vocabulary of 512
rows when the config takes it from the tokenizer), every tensor drawn N(0, 0.02) on lookup from a
per-name seed and written as a tp 2 x pp 2 checkpoint (DeepSpeed's pipeline layer files) by
:func:`~megatron_glm.training.checkpoint.write_checkpoint`, which builds one file at a time: no
4-process launch, and never the model whole in memory.

Each conversion then runs alone in a fresh Python process (``--child``), which imports what it
needs, notes its resident set (``start``: interpreter, torch, transformers), converts, and reports
the wall time of the conversion and its peak resident set (``VmHWM``: anonymous memory and the
pages of memory-mapped files it touched), so neither this process's set-up nor another
conversion counts. Four runs, in this order:

- ``to-hf old``: the path before streaming, kept here as the baseline: every shard loaded
  (:func:`~megatron_glm.training.checkpoint.read_full_state`), the model merged, converted and
  written with ``safetensors.torch.save_file`` one shard at a time (weights only);
- ``to-hf``: ``tools/convert_checkpoint.py to-hf`` (:func:`megatron_glm.hf.export.export_to_hf`,
  fp32, default 5GB shards);
- ``from-hf old``: every tensor of that folder read and converted into one state dict, split into
  all tp x pp shards (:func:`~megatron_glm.training.checkpoint.split_state`) and saved (the layer
  files only);
- ``from-hf``: ``from-hf --tp 2 --pp 2`` (:func:`megatron_glm.hf.import_hf.import_from_hf`).

The table gives peak RSS against the checkpoint's fp32 size (parameters x 4 bytes); the target is
below 1.3x. Outputs: ``WORKDIR/{ckpt,hf,hf_old,from_hf,from_hf_old}``; removed at the end unless
``--keep`` (glm-410m: ~1.6 GB each, ~5 GB at most on disk at once without ``--keep``).

    python tools/bench/bench_convert.py [--model glm-410m] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from megatron_glm.config import ModelConfig, from_dict, load_yaml

REPO = Path(__file__).resolve().parents[2]
TP, PP = 2, 2
TARGET = 1.3
DEFAULT_VOCAB = 512
"""Vocabulary rows when the model config has ``vocab_size: 0`` (taken from a tokenizer)."""
MODES = ("to-hf-old", "to-hf", "from-hf-old", "from-hf")
OUTPUTS = {"to-hf-old": "hf_old", "to-hf": "hf", "from-hf-old": "from_hf_old", "from-hf": "from_hf"}


# ----------------------------------------------------------------------------- set-up


def model_config(name: str) -> ModelConfig:
    """``ModelConfig`` from a config name (``configs/model/<name>.yaml``) or a YAML path."""
    path = Path(name)
    if not path.is_file():
        path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
        raise ValueError(f"--model: no model config {name!r} (known: {', '.join(known)})")
    cfg = from_dict(ModelConfig, load_yaml(path), prefix="model.")
    if cfg.vocab_size == 0:
        cfg = replace(cfg, vocab_size=DEFAULT_VOCAB)
    return cfg


class RandomState(Mapping[str, Tensor]):
    """A full state dict whose tensors are drawn when looked up (never all in memory)."""

    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.shapes = shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, name: str) -> Tensor:
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.shapes[name], generator=generator) * 0.02


def build_checkpoint(cfg: ModelConfig, root: Path) -> int:
    """``root/global_step0`` + ``latest`` at tp 2 x pp 2; returns the fp32 size in bytes."""
    from megatron_glm.model import GLMModel, tensor_parallel_layout
    from megatron_glm.training.checkpoint import write_checkpoint, write_latest

    with torch.device("meta"):
        meta = GLMModel(cfg, cfg.vocab_size)
    shapes = {name: t.shape for name, t in meta.state_dict().items()}
    tag = root / "global_step0"
    tag.mkdir(parents=True)
    base = {"iteration": 0, "consumed_samples": 0, "config": {"model": asdict(cfg)}}
    write_checkpoint(
        RandomState(shapes), tensor_parallel_layout(cfg), tag, tp=TP, pp=PP, base=base, marker={}
    )
    write_latest(root, "global_step0")
    return sum(s.numel() for s in shapes.values()) * 4


# ----------------------------------------------------------------------------- the children


def _rss_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def old_to_hf(load: Path, save: Path) -> None:
    """The export before streaming (weights only): load and merge all, convert, save shards."""
    from safetensors.torch import save_file

    from megatron_glm.hf.export import Checkpoint, convert_state
    from megatron_glm.model import tensor_parallel_layout
    from megatron_glm.training.checkpoint import read_full_state

    src = Checkpoint.read(load, None)
    full = read_full_state(src.tag_dir, tensor_parallel_layout(src.model))
    save.mkdir(parents=True)
    shard: dict[str, Tensor] = {}
    size, index, limit = 0, 0, 5 * 10**9
    for key, tensor in convert_state(_consume(full), src.model, torch.float32):
        if shard and size + tensor.nbytes > limit:
            save_file(shard, str(save / f"shard-{index:05d}.safetensors"), {"format": "pt"})
            shard, size, index = {}, 0, index + 1
        shard[key] = tensor
        size += tensor.nbytes
    save_file(shard, str(save / "model.safetensors"), {"format": "pt"})


def _consume(full: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    for name in list(full):
        yield name, full.pop(name)


def old_from_hf(load: Path, save: Path) -> None:
    """The import before streaming (layer files only): read and convert every tensor into one
    state dict, split it into all TP shards, save the pipeline layer files."""
    from megatron_glm.hf.hf_weights import HFWeights, plan_weights, scan_weights
    from megatron_glm.hf.import_hf import _read_hf_config, model_config_from_hf
    from megatron_glm.model import tensor_parallel_layout
    from megatron_glm.training.checkpoint import split_state
    from megatron_glm.training.checkpoint.deepspeed_files import layer_file_name, split_layer_name

    cfg, _ = model_config_from_hf(_read_hf_config(load), load)
    weights = HFWeights(plan_weights(scan_weights(load), cfg, load), cfg, cfg.vocab_size)
    full = {name: weights[name] for name in weights}
    shards = split_state(full, tensor_parallel_layout(cfg), TP)
    save.mkdir(parents=True)
    for rank, shard in enumerate(shards):
        by_layer: dict[int, dict[str, Tensor]] = {}
        for name, tensor in shard.items():
            layer, inner = split_layer_name(name)
            by_layer.setdefault(layer, {})[inner] = tensor
        for layer, state in by_layer.items():
            torch.save(state, save / layer_file_name(layer, rank))


def run_child(mode: str, load: Path, save: Path) -> None:
    """One conversion in this (fresh) process; prints its JSON measurement."""
    from megatron_glm.hf.export import export_to_hf
    from megatron_glm.hf.import_hf import import_from_hf

    start = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    if mode == "to-hf":
        export_to_hf(load, save)
    elif mode == "from-hf":
        import_from_hf(load, save, tp=TP, pp=PP)
    elif mode == "to-hf-old":
        old_to_hf(load, save)
    else:
        old_from_hf(load, save)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "peak_kb": _rss_kb("VmHWM"), "start_kb": start}))


@dataclass(frozen=True)
class Result:
    mode: str
    wall_s: float
    peak_gb: float
    start_gb: float


def measure(mode: str, load: Path, save: Path) -> Result:
    """Run ``mode`` in a fresh process importing this worktree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", mode, str(load), str(save)]
    os.sync()  # the previous step's dirty pages are not this run's writeback to wait for
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(mode, out["wall_s"], out["peak_kb"] * 1024 / 1e9, out["start_kb"] * 1024 / 1e9)


# ----------------------------------------------------------------------------- the table


def table(model: str, results: list[Result], size_gb: float) -> str:
    header = (
        f"{'conversion':<12}{'path':<22}{'wall s':>8}{'peak RSS GB':>13}{'start GB':>10}"
        f"{'fp32 GB':>9}{'peak/size':>11}{'(peak-start)/size':>19}  target"
    )
    lines = [f"== bench_convert: {model}, tp {TP} x pp {PP}, fp32 {size_gb:.3f} GB", header]
    for r in results:
        conversion = r.mode.removesuffix("-old")
        old = r.mode.endswith("-old")
        path = "old (load all)" if old else "streaming"
        ratio = r.peak_gb / size_gb
        verdict = "-" if old else f"< {TARGET}x {'met' if ratio < TARGET else 'MISSED'}"
        lines.append(
            f"{conversion:<12}{path:<22}{r.wall_s:>8.2f}{r.peak_gb:>13.3f}{r.start_gb:>10.3f}"
            f"{size_gb:>9.3f}{ratio:>10.2f}x{(r.peak_gb - r.start_gb) / size_gb:>18.2f}x  {verdict}"
        )
    lines.append(
        "peak RSS: VmHWM of the converting process; start: its RSS after imports (python, torch, "
        "transformers), included in the peak; the target is on peak/size"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glm-410m", help="configs/model/<name>.yaml or a path")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--keep", action="store_true", help="keep what the benchmark wrote")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "LOAD", "SAVE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        mode, load, save = args.child
        run_child(mode, Path(load), Path(save))
        return
    cfg = model_config(args.model)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    made = [work / name for name in ("ckpt", *OUTPUTS.values())]
    if any(p.exists() for p in made):
        sys.exit(f"bench_convert: {work} already holds benchmark output; pass another --workdir")
    try:
        size = build_checkpoint(cfg, work / "ckpt")
        results = []
        for mode in MODES:
            load = work / ("ckpt" if mode.startswith("to-hf") else "hf")
            results.append(measure(mode, load, work / OUTPUTS[mode]))
            if mode.endswith("-old") and not args.keep:
                shutil.rmtree(work / OUTPUTS[mode])  # disk: the baseline's output is not needed
        print(table(cfg.name, results, size / 1e9))
    finally:
        if not args.keep:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
