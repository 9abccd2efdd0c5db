"""Fill blanks with a trained GLM: a JSONL file of texts, or texts typed at the terminal.

    python tools/generate.py --load CKPT_DIR --input prompts.jsonl --output out.jsonl [flags]
    python tools/generate.py --hf HF_DIR --interactive
    torchrun --nproc_per_node N tools/generate.py --tp N --load CKPT_DIR ...
    deepspeed --num_gpus N tools/generate.py --tp N --load CKPT_DIR ...

``--load`` reads a checkpoint of ours at any layout (tp, pp, ZeRO 0-3; pipeline stages are
merged), ``--hf`` a Hugging Face export (:mod:`megatron_glm.inference`). Each input line is a
JSON object whose ``"text"`` (``--key``) holds one or more ``[MASK]``/``[sMASK]``/``[gMASK]``;
each output line is that object plus ``"filled"`` (the completed text) and ``"fills"`` (one
string per blank, in order). A bad line is an error naming ``file:line`` (the JSONL reader's
reasons, :mod:`megatron_glm.data.jsonl`, read strictly: every input row must get its output
row). The strategy flags are :class:`megatron_glm.generation.GenerationConfig`'s fields.

Under ``--tp N`` (N processes) every rank holds its tensor-parallel shard and decodes the same
batches; rank 0 reads the terminal, shows the progress bar and writes the output. The output
file is written whole (a temporary file renamed), so a failed run leaves no half file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_glm.data.jsonl import BadLines, check_text, iter_chunks, parse_line
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.generation import GenerationConfig, fill_blanks
from megatron_glm.inference import LoadedModel, fill_texts, load_for_inference
from megatron_glm.logs import setup_logging
from megatron_glm.model import GLMModel
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.distributed import destroy_distributed, init_distributed, read_dist_env

STRATEGY_HELP = {
    "max_new_tokens": "most tokens generated per blank",
    "min_new_tokens": "no [eop] before this many tokens in a blank",
    "do_sample": "sample instead of greedy",
    "temperature": "divide the logits by this before sampling",
    "top_k": "sample among the k most likely tokens (0: off)",
    "top_p": "sample in the smallest set of tokens holding this probability (1: off)",
    "repetition_penalty": "CTRL's penalty on tokens already in the fill (1: off)",
    "no_repeat_ngram_size": "forbid repeating an n-gram of this size in a fill (0: off)",
    "num_beams": "beam search with this many beams (1: off)",
    "length_penalty": "beam score = log-prob / length ** this",
    "seed": "seed of the sampling streams (same seed, same text)",
}


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerationConfig field, with its default (the dataclass is the one source)."""
    group = parser.add_argument_group("decoding strategy (GenerationConfig)")
    default = GenerationConfig()
    for field in fields(GenerationConfig):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(default, field.name)
        if isinstance(value, bool):
            group.add_argument(flag, action="store_true", help=STRATEGY_HELP[field.name])
        else:
            kind = int if field.name == "seed" else type(value)
            group.add_argument(flag, type=kind, default=value, help=STRATEGY_HELP[field.name])


def strategy(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the parsed flags (ValueError naming a bad field)."""
    return GenerationConfig(**{f.name: getattr(args, f.name) for f in fields(GenerationConfig)})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint directory of ours (holds 'latest')")
    source.add_argument("--hf", help="Hugging Face model folder (an export)")
    parser.add_argument("--tag", help="checkpoint tag (default: from 'latest')")
    parser.add_argument("--tokenizer", help="tokenizer, if not the one the model names")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", help="JSONL file of texts with blanks")
    mode.add_argument("--interactive", action="store_true", help="read texts from stdin")
    parser.add_argument("--output", help="JSONL output (with --input)")
    parser.add_argument("--key", default="text", help="JSON key of the text (default: text)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts decoded together")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default: world size)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    add_strategy_arguments(parser)
    return parser


@dataclass(frozen=True)
class Prompt:
    """One input row: where it is (``file:line``), the whole JSON object and its text."""

    where: str
    row: dict[str, Any]
    text: str


def read_prompts(path: Path, key: str) -> list[Prompt]:
    """Every row of a JSONL file; the first bad line is an error naming ``file:line``."""
    if not path.is_file():
        raise ValueError(f"--input {path}: no such file")
    bad = BadLines(strict=True)  # raises BadLineError ("file:line: reason: detail")
    prompts = []
    for chunk in iter_chunks([path], 1 << 20):
        for i, raw in enumerate(chunk.lines()):
            where = f"{chunk.path}:{chunk.first_lineno + i}"
            try:
                obj = parse_line(raw)
            except UnicodeDecodeError as e:
                bad.add("invalid_utf8", chunk.path, chunk.first_lineno + i, str(e))
                continue
            except (ValueError, RecursionError) as e:
                bad.add("invalid_json", chunk.path, chunk.first_lineno + i, str(e))
                continue
            text = check_text(obj, key)
            if isinstance(text, tuple):
                bad.add(text[0], chunk.path, chunk.first_lineno + i, text[1])
                continue
            prompts.append(Prompt(where, obj, text))
        if chunk.cut_short:
            bad.add_cut_short(chunk.cut_short)
    return prompts


def _start(args: argparse.Namespace) -> tuple[ParallelDims | None, torch.device]:
    """This process's place: one process (tp 1), or one rank of a tp = world-size job."""
    env = read_dist_env()
    tp = args.tp if args.tp is not None else env.world_size
    if tp != env.world_size:
        raise ValueError(
            f"--tp {tp} needs {tp} processes (one per shard), this job has {env.world_size}: "
            f"launch with torchrun --nproc_per_node {tp} or deepspeed --num_gpus {tp}"
        )
    if env.world_size == 1:
        return None, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = init_distributed(env)
    return ParallelDims.build(tp=tp), device


def _agreed_seed(config: GenerationConfig, dims: ParallelDims | None) -> GenerationConfig:
    """Sampling under tp > 1 needs the same draws on every rank: rank 0 picks the seed."""
    if dims is None or not config.do_sample or config.seed is not None:
        return config
    seed = [int(torch.randint(0, 2**31 - 1, ()).item())]
    dist.broadcast_object_list(seed, src=0)
    return replace(config, seed=seed[0])


def run_file(
    loaded: LoadedModel,
    args: argparse.Namespace,
    config: GenerationConfig,
    *,
    rank0: bool,
) -> str:
    """Fill every row of ``--input`` into ``--output``; returns the summary line."""
    prompts = read_prompts(Path(args.input), args.key)
    bars: list[tqdm] = []  # opened after the first batch: the kernels' log lines come first
    tokens = 0
    started = time.perf_counter()

    def advance(rows: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        if not bars:
            disable = not rank0 or args.no_progress
            bars.append(tqdm(total=len(prompts), unit="row", file=sys.stderr, disable=disable))
        bars[0].update(rows)
        bars[0].set_postfix_str(f"{tokens / (time.perf_counter() - started):.1f} tokens/s")

    results = fill_texts(
        loaded.model,
        loaded.tokenizer,
        [p.text for p in prompts],
        config,
        batch_size=args.batch_size,
        labels=[p.where for p in prompts],
        on_batch=advance,
    )
    for bar in bars:
        bar.close()
    seconds = time.perf_counter() - started
    if rank0:
        _write_rows(Path(args.output), prompts, results)
    return (
        f"{args.output}: {len(prompts)} rows, {tokens} new tokens in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s)"
    )


def _write_rows(path: Path, prompts: list[Prompt], results: list[Any]) -> None:
    """The output rows, written whole: a temporary file in the same folder, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for prompt, result in zip(prompts, results, strict=True):
            row = {**prompt.row, "filled": result.text, "fills": result.fills}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _lines(stream: TextIO, dims: ParallelDims | None, rank0: bool) -> Iterator[str]:
    """Texts typed on rank 0's stdin (prompt ``> `` on a terminal), the same on every rank."""
    while True:
        line: list[str | None] = [None]
        if rank0:
            if stream.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            read = stream.readline()
            line[0] = read.rstrip("\n") if read else None
        if dims is not None:
            dist.broadcast_object_list(line, src=0)
        if line[0] is None:
            return
        if line[0].strip():
            yield line[0]


def run_interactive(
    model: GLMModel,
    tok: Tokenizer,
    config: GenerationConfig,
    dims: ParallelDims | None,
    *,
    rank0: bool,
) -> None:
    """Fill each text typed on stdin; print the completed text and each fill (rank 0)."""
    for text in _lines(sys.stdin, dims, rank0):
        try:
            [result] = fill_blanks(model, tok, [text], config, batch_size=1)
        except ValueError as e:  # a text without a blank must not end the session
            if rank0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if rank0:
            print(result.text)
            for i, fill in enumerate(result.fills, start=1):
                print(f"  [{i}] {fill!r}")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.input is not None and args.output is None:
        parser.error("--input needs --output")
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")
    try:
        config = strategy(args)
        dims, device = _start(args)
    except ValueError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    rank0 = dims is None or dims.rank == 0
    try:
        config = _agreed_seed(config, dims)
        loaded = load_for_inference(
            load=args.load,
            hf=args.hf,
            tag=args.tag,
            tokenizer=args.tokenizer,
            dims=dims,
            device=device,
        )
        if args.interactive:
            run_interactive(loaded.model, loaded.tokenizer, config, dims, rank0=rank0)
        else:
            summary = run_file(loaded, args, config, rank0=rank0)
            if rank0:
                print(summary)
    except ValueError as e:  # BadLineError, ConfigError and CheckpointFileError included
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    env = read_dist_env()
    setup_logging(env.rank, info_stream="stderr")  # stdout is the result
    sys.exit(main())
