"""MB/s of tools/preprocess_data.py against the raw SentencePiece encode limit, same run.

    python tools/bench/bench_preprocess.py [--input X.jsonl] [--tokenizer-model M.model]
        [--min-mb 20] [--workers 1 2] [--repeats 6] [--stages 32] [--keep DIR]

Corpus: ``--input`` or the demo corpus (stdlib docstrings, megatron_glm.data.demo_corpus)
repeated until it holds ``--min-mb`` MB. Tokenizer: ``--tokenizer-model`` or a unigram model of
vocab 8000 trained on the (unrepeated) corpus. For each worker count the tool is run as the real
CLI in a subprocess with ``--append-eod --split-sentences``; MB/s is input JSONL bytes per second
of its processing time (the ``s`` of its summary: starting the encoder processes, reading,
parsing, splitting, encoding, writing; not interpreter start-up and model loading in the main
process, which are in the end-to-end MB/s printed beside it).

Baseline (the limit): ``sp.encode(sentences, num_threads=workers)`` on the raw SentencePiece
processor, one call, Python's garbage collector paused (as the tool pauses it), where
``sentences`` are exactly the sequences the tool encodes: the good lines' texts parsed and
sentence-split *beforehand* (not timed) with the tool's own code, held in memory. The ratio is
limit time / tool time for the same input bytes. Each measurement is the best of ``--repeats``
runs, interleaved (limit, tool, limit, tool...) to share the machine's noise. CPU seconds are
printed too (for the tool: its process and its encoder processes): on a machine shared with
other jobs, wall-clock rates swing by 2x between runs, while the CPU ratio (limit CPU / tool
CPU: the share of the tool's CPU that is SentencePiece's own work) is steadier.

``--stages N`` (default 32) first prints a table of CPU seconds per pipeline stage over the first
N chunks, single-threaded, against SentencePiece's one-thread encode of the same sentences:
parsing (orjson, and the json module it replaced), the splitter (compiled, its vectorised numpy
twin, and a one-regex splitter of the same rules), encode with the garbage collector paused
and on, the tokenizer wrapper, and flattening the id lists (compiled, and the numpy fallback).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_glm.data.demo_corpus import write_demo_corpus
from megatron_glm.data.indexed import best_fitting_dtype
from megatron_glm.data.jsonl import DEFAULT_CHUNK_BYTES, BadLines, iter_chunks, parse_chunk
from megatron_glm.data.native import NATIVE
from megatron_glm.data.preprocess import _flatten, _prepare
from megatron_glm.data.sentence_split import split_sentences_batch
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.data.tokenizer_training import train_tokenizer
from megatron_glm.logs import setup_logging

ROOT = Path(__file__).resolve().parents[2]
_SUMMARY = re.compile(r"([\d.]+) s \(([\d.]+) s CPU\), ([\d.]+) MB/s with")


def build_corpus(workdir: Path, source: Path | None, min_mb: float) -> tuple[Path, Path]:
    """(unrepeated corpus for tokenizer training, corpus repeated to >= min_mb MB)."""
    if source is None:
        source = workdir / "demo.jsonl"
        write_demo_corpus(source)
    data = source.read_bytes()
    if not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, -(-int(min_mb * 1e6) // len(data)))
    big = workdir / "corpus.jsonl"
    with open(big, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return source, big


def load_sentences(corpus: Path) -> tuple[list[str], int]:
    """The sequences the tool encodes with --split-sentences (good lines only), input bytes."""
    sentences: list[str] = []
    nbytes = 0
    bad = BadLines()
    for chunk in iter_chunks([corpus], DEFAULT_CHUNK_BYTES):
        (texts,) = parse_chunk(chunk, ["text"], bad)
        sentences += _prepare(texts, split=True).sequences
        nbytes += chunk.nbytes
    return sentences, nbytes


def time_limit(tok: GLMTokenizer, sentences: list[str], workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one raw ``encode`` call over all sentences, garbage collector
    paused (its fastest setting; what collections cost here: docs/benchmarks.md)."""
    sp = tok.sentencepiece
    gc.disable()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        sp.encode(sentences, num_threads=workers)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        gc.enable()


def time_tool(
    corpus: Path, model: Path, out: Path, workers: int
) -> tuple[float, float, float, str]:
    """(processing wall and CPU seconds reported by the tool, end-to-end seconds, summary)."""
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus),
        "--output-prefix",
        str(out),
        "--tokenizer-model",
        str(model),
        "--workers",
        str(workers),
        "--append-eod",
        "--split-sentences",
        "--no-progress",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = _SUMMARY.search(res.stdout)
    if m is None:
        raise RuntimeError(f"no summary in tool output:\n{res.stdout}\n{res.stderr}")
    return float(m.group(1)), float(m.group(2)), wall, res.stdout


# -- where the CPU goes (--stages) ------------------------------------------------------------

_CLOSERS = "[\"')\\]}\u2019\u201d\u00bb\u300d\u300f\uff09\u3011\u300b]"
REGEX_SPLITTER = re.compile(
    rf"""\S .*? (?: [.?!;:]+ {_CLOSERS}* (?=\s|\Z) | [。？！；：]+ {_CLOSERS}*
                | (?=[^\S\r\n]*[\r\n]) | (?=\s*\Z) )""",
    re.DOTALL | re.VERBOSE,
)
"""A one-regex splitter of the same rules (line breaks limited to \\n and \\r): the baseline
for the splitters."""


def _parse_with_json(chunk: Any) -> list[str]:
    """The parse stage as it was before orjson: the json module on every line (good lines)."""
    texts = []
    for line in chunk.lines():
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
    return texts


def stage_costs(corpus: Path, tok: GLMTokenizer, max_chunks: int) -> list[tuple[str, float]]:
    """CPU seconds of each pipeline stage, single-threaded, over the first chunks."""
    sp = tok.sentencepiece
    dtype = best_fitting_dtype(tok.vocab_size)
    cost: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        c0 = time.process_time()
        out = fn(*a, **kw)
        cost[name] = cost.get(name, 0.0) + time.process_time() - c0
        return out

    gc.disable()
    try:
        for i, chunk in enumerate(iter_chunks([corpus], DEFAULT_CHUNK_BYTES)):
            if i == max_chunks:
                break
            (texts,) = timed(
                "parse (orjson, checks; used)", parse_chunk, chunk, ["text"], BadLines()
            )
            timed("parse (json module, before)", _parse_with_json, chunk)
            prep = timed("split (compiled; used)", _prepare, texts, True)
            timed("split (numpy, vectorised)", split_sentences_batch, texts, use_native=False)
            timed(
                "split (one regex, baseline)",
                lambda t: [REGEX_SPLITTER.findall(x) for x in t],
                texts,
            )
            ids = timed("SP encode, 1 thread, gc paused", sp.encode, prep.sequences, num_threads=1)
            gc.enable()
            timed("SP encode, 1 thread, gc on", sp.encode, prep.sequences, num_threads=1)
            gc.disable()
            timed(
                "tokenizer encode_pieces (used)", tok.encode_pieces, prep.sequences, prep.per_doc, 1
            )
            fresh = sp.encode(prep.sequences, num_threads=1)  # _flatten appends eod to its lists
            timed("flatten ids (compiled; used)", _flatten, ids, prep.per_doc, tok.eos_id, dtype)
            timed(
                "flatten ids (numpy fromiter)",
                _flatten,
                fresh,
                prep.per_doc,
                tok.eos_id,
                dtype,
                use_native=False,
            )
    finally:
        gc.enable()
    return list(cost.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="JSONL corpus (default: the demo corpus)")
    parser.add_argument("--tokenizer-model", type=Path, help="default: train vocab 8000")
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: temporary)")
    parser.add_argument(
        "--stages", type=int, default=32, help="chunks for the per-stage CPU table (0: skip)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_src, corpus = build_corpus(work, args.input, args.min_mb)
        model = args.tokenizer_model
        if model is None:
            print("training tokenizer (vocab 8000)...", file=sys.stderr)
            train_tokenizer([train_src], work / "tok", 8000, threads=2)
            model = work / "tok.model"
        tok = GLMTokenizer(model)
        sentences, nbytes = load_sentences(corpus)
        mb = nbytes / 1e6
        print(
            f"corpus {corpus} {mb:.1f} MB, {len(sentences)} sentences; tokenizer {model} "
            f"(vocab {tok.vocab_size}); cpus {os.cpu_count()}; best of {args.repeats}; "
            f"compiled helpers: {'yes' if NATIVE is not None else 'NO (pure-Python fallbacks)'}"
        )
        if args.stages:
            costs = stage_costs(corpus, tok, args.stages)
            base = dict(costs)["SP encode, 1 thread, gc paused"]
            print(f"\nCPU per stage over the first {args.stages} chunks (single thread):")
            print(f"{'stage':>34} {'CPU s':>7} {'% of SP encode':>15}")
            for name, sec in costs:
                print(f"{name:>34} {sec:>7.3f} {100 * sec / base:>14.1f}%")
            print()
        rows = []
        for w in args.workers:
            best = dict.fromkeys(["limit", "limit_cpu", "tool", "tool_cpu", "e2e"], 1e9)
            for r in range(args.repeats):
                wall, cpu = time_limit(tok, sentences, w)
                best["limit"], best["limit_cpu"] = (
                    min(best["limit"], wall),
                    min(best["limit_cpu"], cpu),
                )
                proc, proc_cpu, e2e, text = time_tool(corpus, model, work / f"out_w{w}", w)
                best["tool"], best["tool_cpu"] = (
                    min(best["tool"], proc),
                    min(best["tool_cpu"], proc_cpu),
                )
                best["e2e"] = min(best["e2e"], e2e)
                if r == 0 and w == args.workers[-1]:
                    print(text.strip())
            rows.append((w, best))
        print()
        header = (
            f"{'workers':>7} {'SP limit MB/s':>14} {'tool MB/s':>10} {'ratio':>6} "
            f"{'e2e MB/s':>9} {'ratio':>6} {'SP CPU s':>9} {'tool CPU s':>11} {'ratio':>6}"
        )
        print(header)
        for w, b in rows:
            line = (
                f"{w:>7} {mb / b['limit']:>14.2f} {mb / b['tool']:>10.2f} "
                f"{b['limit'] / b['tool']:>6.2f} {mb / b['e2e']:>9.2f} "
                f"{b['limit'] / b['e2e']:>6.2f} {b['limit_cpu']:>9.2f} {b['tool_cpu']:>11.2f} "
                f"{b['limit_cpu'] / b['tool_cpu']:>6.2f}"
            )
            print(line)


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
