"""Greedy GLM decoding on CPU: cached batched decoder vs uncached one-at-a-time vs the HF export.

Columns, all in one run on the same random weights (``configs/model/glm-base.yaml`` by default,
fp32, ``model.kernels: torch``), ``--batch`` prompts of ``--prompt`` tokens, each with one
``[MASK]`` in the middle, ``--new-tokens`` generated greedily with no stop token (so every
decoder produces exactly the same number of tokens):

- ``ours, KV cache, batched``: :func:`megatron_glm.generation.generate` (part A prefilled once,
  one token per row per step, all rows in one batch);
- ``ours, uncached, one at a time``: ``generate(..., use_cache=False)`` row by row, the old
  decoder's method (the whole sequence re-run every step). It is slow, so only
  ``--uncached-rows`` rows are timed: rows are independent and run one after another, so its
  tokens/s does not depend on how many are timed;
- ``HF export, generate()``: the same weights converted by the exporter
  (:func:`megatron_glm.hf.export.convert_state`, :func:`~megatron_glm.hf.export.hf_config`)
  into ``GLMForConditionalGeneration`` and decoded by transformers' ``generate`` (greedy, its KV
  cache, batched). Shown as ``n/a`` when the export's model has no ``generate`` support
  (``--hf off`` skips it).

Tokens/s = generated tokens / wall seconds (prefill included); the two fast columns are the best
of ``--repeats`` interleaved runs (on a shared machine other load only ever slows a run down).
The run also checks that the three decoders produce the same tokens (greedy: they must).
Target: cached >= 10x uncached and >= 1x the HF loop.

    python tools/bench/bench_generate.py [--batch 8 --prompt 256 --new-tokens 64]
        [--model glm-base] [--layers N --hidden H --heads A --vocab V] [--uncached-rows 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_glm.config import ModelConfig, load_config
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.logs import setup_logging
from megatron_glm.model import GLMModel, build_model

REPO = Path(__file__).resolve().parents[2]
SOP, MASK = 5, 2  # GLMTokenizer's reserved ids (the weights are random: any ids would do)


@dataclass
class Result:
    """One column of the table: tokens generated, seconds, and the tokens themselves."""

    name: str
    rows: int
    tokens: int
    seconds: float
    output: list[list[int]] | None

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def model_config(args: argparse.Namespace) -> ModelConfig:
    """``configs/model/<--model>.yaml`` (or BERT-base's shape) with the flags' overrides."""
    path = REPO / "configs" / "model" / f"{args.model}.yaml"
    if path.is_file():
        cfg = load_config(path, cls=ModelConfig)
    else:
        cfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=30592)
    overrides = {
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "num_attention_heads": args.heads,
        "vocab_size": args.vocab,
    }
    changed = {k: v for k, v in overrides.items() if v is not None}
    if "hidden_size" in changed:
        changed["ffn_hidden_size"] = 4 * changed["hidden_size"]
    need = args.prompt + args.new_tokens
    cfg = replace(cfg, **changed, hidden_dropout=0.0, attention_dropout=0.0, kernels="torch")
    if cfg.max_position_embeddings < need:
        raise ValueError(
            f"--prompt {args.prompt} + --new-tokens {args.new_tokens} exceed the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    return cfg


def prompts(cfg: ModelConfig, batch: int, length: int) -> tuple[list[list[int]], list[int]]:
    """Random word ids (above the specials) with a [MASK] in the middle of each row."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(8, cfg.vocab_size, (batch, length), generator=g)
    rows[:, length // 2] = MASK
    return rows.tolist(), [length // 2] * batch


@dataclass
class Case:
    """A column to time: ``fn`` decodes ``rows`` rows, ``tokens`` tokens in all."""

    name: str
    rows: int
    tokens: int
    fn: Callable[[], list[list[int]]]


def measure(cases: list[Case], repeats: int) -> list[Result]:
    """Each case's fastest of ``repeats`` runs, the cases interleaved (A B A B ...).

    The machine may be shared: other load only ever slows a run down, and interleaving exposes
    every column to the same stretches of it.
    """
    best = [float("inf")] * len(cases)
    outputs: list[list[list[int]] | None] = [None] * len(cases)
    for _ in range(repeats):
        for i, case in enumerate(cases):
            start = time.perf_counter()
            outputs[i] = case.fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [
        Result(c.name, c.rows, c.tokens, t, o) for c, t, o in zip(cases, best, outputs, strict=True)
    ]


def ours_cases(model: GLMModel, args: argparse.Namespace) -> tuple[Case, Case]:
    """(cached batched, uncached one at a time over ``--uncached-rows`` rows)."""
    rows, masks = prompts(model.cfg, args.batch, args.prompt)
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    kwargs = dict(eos_ids=(), sop_id=SOP, vocab_size=model.cfg.vocab_size)
    cached = Case(
        "ours, KV cache, batched",
        len(rows),
        len(rows) * args.new_tokens,
        lambda: generate(model, rows, masks, config, **kwargs),  # type: ignore[arg-type]
    )
    n = min(args.uncached_rows, len(rows))
    uncached = Case(
        "ours, uncached, one at a time",
        n,
        n * args.new_tokens,
        lambda: [
            generate(model, [r], [m], config, use_cache=False, **kwargs)[0]  # type: ignore[arg-type]
            for r, m in zip(rows[:n], masks[:n], strict=True)
        ],
    )
    return cached, uncached


def hf_model(model: GLMModel) -> torch.nn.Module | None:
    """The same weights as the HF export's ``GLMForConditionalGeneration``, or None without
    ``generate`` support in the export's model class."""
    from transformers import GenerationMixin

    from megatron_glm.hf.export import convert_state, hf_config
    from megatron_glm.hf.modeling_glm import GLMForConditionalGeneration

    if not issubclass(GLMForConditionalGeneration, GenerationMixin):
        return None
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = hf_config(model.cfg, model.vocab_size, model.cfg.vocab_size)
    hf = GLMForConditionalGeneration(config)
    state = dict(convert_state(full.items(), model.cfg, torch.float32))
    hf.load_state_dict(state)  # strict: every key
    return hf.eval()


def hf_case(model: GLMModel, args: argparse.Namespace) -> Case | None:
    """transformers' greedy ``generate`` over the prompts + [sop] (GLM's 2D positions)."""
    hf = hf_model(model)
    if hf is None:
        return None
    from megatron_glm.hf.modeling_glm import build_inputs_for_generation

    rows, _ = prompts(model.cfg, args.batch, args.prompt)
    inputs = build_inputs_for_generation(
        rows, mask_token_ids=[MASK], sop_token_id=SOP, pad_token_id=0
    )
    b, total = inputs["input_ids"].shape  # [b, L + 1]: part A and [sop]

    def decode() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=None,
                pad_token_id=0,
            )
        return [row[total:].tolist() for row in out]

    return Case("HF export, generate()", b, b * args.new_tokens, decode)


def table(results: list[Result | None], names: list[str]) -> str:
    """The printed table; ``x uncached`` is each column's tokens/s over the uncached one's."""
    base = results[1]
    assert base is not None
    lines = [
        f"{'decoder':<32}{'rows':>6}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'x uncached':>12}"
    ]
    for name, r in zip(names, results, strict=True):
        if r is None:
            lines.append(f"{name:<32}{'n/a':>6}{'n/a':>8}{'n/a':>10}{'n/a':>10}{'n/a':>12}")
            continue
        lines.append(
            f"{r.name:<32}{r.rows:>6}{r.tokens:>8}{r.seconds:>10.4g}{r.rate:>10.1f}"
            f"{r.rate / base.rate:>11.1f}x"
        )
    return "\n".join(lines)


def agreement(cached: Result, uncached: Result, hf: Result | None) -> str:
    assert cached.output is not None and uncached.output is not None
    same = cached.output[: uncached.rows] == uncached.output
    line = f"tokens: cached == uncached ({uncached.rows} rows): {'yes' if same else 'NO'}"
    if hf is not None and hf.output is not None:
        equal = sum(a == b for a, b in zip(hf.output, cached.output, strict=True))
        line += f"; HF == cached: {equal}/{hf.rows} rows"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="glm-base", help="configs/model/<name>.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256, help="part-A tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, help="override the model's num_layers")
    ap.add_argument("--hidden", type=int, help="override hidden_size (ffn = 4x)")
    ap.add_argument("--heads", type=int, help="override num_attention_heads")
    ap.add_argument("--vocab", type=int, help="override vocab_size")
    ap.add_argument("--uncached-rows", type=int, default=1, help="rows timed uncached")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the fast columns (min)")
    ap.add_argument("--hf", choices=("auto", "off"), default="auto")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = model_config(args)
    except ValueError as exc:
        print(f"bench_generate: error: {exc}", file=sys.stderr)
        return 2
    model = build_model(cfg, seed=0).eval()
    cached_case, uncached_case = ours_cases(model, args)
    hf_decode = hf_case(model, args) if args.hf == "auto" else None
    fast = measure([cached_case] if hf_decode is None else [cached_case, hf_decode], args.repeats)
    cached, hf = fast[0], (fast[1] if len(fast) > 1 else None)
    (uncached,) = measure([uncached_case], 1)
    names = [cached.name, uncached.name, "HF export, generate()"]
    print(
        f"{cfg.name or args.model}: {cfg.num_layers} layers, h {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}; batch {args.batch}, prompt "
        f"{args.prompt}, {args.new_tokens} new tokens, greedy, fp32 CPU, "
        f"{torch.get_num_threads()} threads"
    )
    print(table([cached, uncached, hf], names))
    print(agreement(cached, uncached, hf))
    ratio = cached.rate / uncached.rate
    print(f"target: cached >= 10x uncached: {ratio:.1f}x {'met' if ratio >= 10 else 'NOT met'}")
    if hf is not None:
        hf_ratio = cached.rate / hf.rate
        print(f"target: cached >= 1x HF: {hf_ratio:.2f}x {'met' if hf_ratio >= 1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the table
    sys.exit(main())
