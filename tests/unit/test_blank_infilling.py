"""Blank infilling: structure against the per-token oracle, statistics, determinism, edges."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from infilling_reference import (
    Window,
    build_row,
    check_task_rules,
    make_window,
    parse_row,
    random_window,
    reference_infill,
    rows_equal,
)

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import (
    OBJECTIVES,
    BlankInfilling,
    SpecialIds,
    span_budget,
)

IDS = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=2, eos=2)


def _infill(seq_length: int, seed: int = 1, **cfg: Any) -> BlankInfilling:
    return BlankInfilling(ObjectiveConfig(**cfg), seq_length=seq_length, ids=IDS, seed=seed)


def _check(bi: BlankInfilling, window: Window, objective: str | None = None) -> None:
    """Oracle: parse per token, check the task's rules, rebuild per token, compare exactly."""
    row = bi(window, objective)
    assert row["tokens"].shape == (bi.seq_length,) and row["position_ids"].shape == (
        2,
        bi.seq_length,
    )
    p = parse_row(row, IDS, bi.seq_length)
    if objective is not None:
        assert p.objective == objective
    check_task_rules(p, window, IDS, bi.cfg)
    mask = p.mask_ids[0] if p.mask_ids else IDS.mask
    rebuilt = build_row(
        [int(x) for x in window.tokens], p.spans, p.order, mask, IDS, bi.seq_length,
        int(row["objective"]),
    )  # fmt: skip
    assert rows_equal(row, rebuilt)


def _truncated_poisson_mean(lam: float, max_len: int) -> float:
    pmf = [lam**k / math.factorial(k) for k in range(1, max_len + 1)]
    return sum(k * p for k, p in zip(range(1, max_len + 1), pmf, strict=True)) / sum(pmf)


def _batched_rows(bi: BlankInfilling, windows: list, objective: str | None) -> list[dict]:
    """Rows built 64 at a time with ``batch`` (the DataLoader path), split back into rows."""
    rows = []
    for k in range(0, len(windows), 64):
        chunk = windows[k : k + 64]
        out = bi.batch(chunk, [objective] * len(chunk))
        rows += [{key: v[b] for key, v in out.items()} for b in range(len(chunk))]
    return rows


def _span_counts(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: number of spans (block position 1) and masked tokens (loss tokens - spans)."""
    n = np.array([(r["position_ids"][1] == 1).sum() for r in rows])
    masked = np.array([r["loss_mask"].sum() for r in rows]) - n
    return n, masked


# ------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("seq_length", [16, 64, 128, 512, 1024, 2048])
@pytest.mark.parametrize(
    "cfg",
    [{}, {"mask_ratio": 0.4, "poisson_lambda": 1.0}, {"poisson_lambda": 8.0, "max_span_length": 3}],
)
def test_budget_fits_and_leaves_headroom(seq_length: int, cfg: dict) -> None:
    ocfg = ObjectiveConfig(**cfg)
    window, n_max = span_budget(ocfg, seq_length)
    assert window >= 1 and window + 2 * n_max <= seq_length
    mean = _truncated_poisson_mean(ocfg.poisson_lambda, ocfg.max_span_length)
    assert n_max >= ocfg.mask_ratio * window / mean + 1  # at least the expected span count


def test_budget_default_numbers() -> None:
    assert span_budget(ObjectiveConfig(), 512) == (446, 33)


def test_too_short_sequence_is_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("config field 'data.seq_length': 4 is too")):
        _infill(4)


# ------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("seq_length", [64, 512])
def test_random_rows_match_the_per_token_oracle(seq_length: int) -> None:
    bi = _infill(seq_length, seed=7)
    count = 450 if seq_length == 64 else 120
    for i in range(count):
        length = bi.window_length if i % 4 else 1 + i % bi.window_length
        mean_doc = (200, 25, 4, 1)[i % 4]
        w = random_window(length, i, mean_doc=mean_doc, eos=IDS.eos)
        _check(bi, w, None if i % 5 else OBJECTIVES[i % 3])


def test_part_b_order_is_shuffled() -> None:
    bi = _infill(512, seed=8)
    in_text_order = []
    for i in range(60):
        p = parse_row(bi(random_window(bi.window_length, i), "span"), IDS, 512)
        assert len(p.spans) >= 3
        in_text_order.append(p.order == sorted(p.order))
    assert sum(in_text_order) <= 3


def test_reference_sampler_rows_are_valid() -> None:
    """The benchmark baseline obeys the same contract, so the speed ratio is a fair one."""
    bi = _infill(128, seed=3)
    for i in range(150):
        w = random_window(bi.window_length if i % 3 else 10 + i % 50, i, mean_doc=(80, 6)[i % 2])
        row = reference_infill(w, bi.cfg, IDS, 128, bi.max_spans, seed=3)
        check_task_rules(parse_row(row, IDS, 128), w, IDS, bi.cfg)


def _edge_windows(window_length: int) -> dict[str, Window]:
    L = window_length
    alt = np.where(np.arange(L) % 2 == 0, 500, IDS.eos)
    return {
        "one_token": make_window([1], trailing_eos=False),
        "one_eos": Window(np.array([IDS.eos]), np.array([0]), 0, 1),
        "all_eos": Window(np.full(L, IDS.eos), np.array([0]), 0, 2),
        "two_tokens": make_window([2], trailing_eos=False),
        "token_eos": make_window([1]),
        "eos_first": Window(np.r_[IDS.eos, np.arange(100, 100 + L - 1)], np.array([0, 1]), 0, 3),
        "one_long_document": make_window([L], trailing_eos=False, sentence_length=40),
        "one_sentence": Window(np.arange(200, 200 + L), np.array([0]), 0, 4),
        "single_token_docs": Window(alt, np.arange(0, L, 2), 0, 5),
        "short_docs": make_window([3] * (L // 4), sentence_length=1),
        "full_of_sentences": make_window([L - 1], sentence_length=1),
    }


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_edge_windows_give_valid_rows(objective: str) -> None:
    bi = _infill(128, seed=11)
    windows = _edge_windows(bi.window_length)
    for name, w in windows.items():
        for index in range(8):
            w2 = Window(w.tokens[: bi.window_length], w.sentence_starts, w.epoch, 100 * index)
            try:
                _check(bi, w2, objective)
            except AssertionError as e:  # pragma: no cover - diagnostic
                raise AssertionError(f"{name} index {100 * index}: {e}") from e


def test_all_eos_window_is_kept_without_loss() -> None:
    bi = _infill(64)
    w = Window(np.full(bi.window_length, IDS.eos), np.array([0]), 0, 0)
    for objective in ("span", "sentence"):
        row = bi(w, objective)
        assert int(row["sep"]) == int(row["valid_len"]) == bi.window_length
        assert row["loss_mask"].sum() == 0


def test_spans_never_contain_eos_even_in_tiny_documents() -> None:
    bi = _infill(512, seed=5)
    w = _edge_windows(bi.window_length)["short_docs"]
    for index in range(40):
        w2 = Window(w.tokens, w.sentence_starts, 0, index)
        row = bi(w2, "span")
        part_b = row["tokens"][int(row["sep"]) : int(row["valid_len"])]
        assert IDS.eos not in part_b.tolist()
        assert (row["position_ids"][1] == 1).sum() >= 1


def test_errors_name_the_problem() -> None:
    bi = _infill(64)
    too_long = Window(np.arange(100, 100 + bi.window_length + 1), np.array([0]), 3, 9)
    with pytest.raises(ValueError, match=re.escape("window 9 (epoch 3) has 49 tokens")):
        bi(too_long)
    with pytest.raises(ValueError, match="has 0 tokens"):
        bi(Window(np.zeros(0, np.int64), np.array([0]), 0, 0))
    with pytest.raises(ValueError, match=re.escape("unknown objective 'gpt'")):
        bi(random_window(10, 0), "gpt")
    with pytest.raises(ValueError, match=re.escape("need 0 <= index < 2**40")):
        bi(Window(np.arange(100, 110), np.array([0]), 0, 2**40))
    bad_starts = Window(np.arange(100, 110), np.array([0, 12]), 0, 0)
    with pytest.raises(
        ValueError, match=re.escape("sentence_starts must be sorted offsets in [0, 10), got 0..12")
    ):
        bi(bad_starts, "sentence")


# ------------------------------------------------------------------------------- statistics


def test_span_task_statistics() -> None:
    cfg = ObjectiveConfig()
    bi = _infill(512, seed=2024)
    windows = [random_window(bi.window_length, i, mean_doc=150) for i in range(2000)]
    rows = _batched_rows(bi, windows, "span")
    n, masked = _span_counts(rows)
    fraction = masked.sum() / (len(rows) * bi.window_length)
    assert abs(fraction - cfg.mask_ratio) < 0.01, fraction
    mean_len = masked.sum() / n.sum()
    expected = _truncated_poisson_mean(cfg.poisson_lambda, cfg.max_span_length)
    assert abs(mean_len - expected) < 0.1, (mean_len, expected)
    assert n.max() <= bi.max_spans and (n < bi.max_spans).mean() > 0.999
    assert all(int(r["valid_len"]) <= 512 for r in rows)


def test_span_ratio_holds_with_short_documents() -> None:
    """Spans moved out of full short documents keep the masked fraction (docstring claim)."""
    bi = _infill(512, seed=12)
    windows = [random_window(bi.window_length, i, mean_doc=8) for i in range(1024)]
    out = [bi.batch(windows[k : k + 32], ["span"] * 32) for k in range(0, 1024, 32)]
    n = sum(int((o["position_ids"][:, 1] == 1).sum()) for o in out)
    masked = sum(float(o["loss_mask"].sum()) for o in out) - n
    assert abs(masked / (1024 * bi.window_length) - 0.15) < 0.01
    for k in range(0, 1024, 97):  # structure of rows built in these batches
        _check(bi, windows[k], "span")


def test_documents_shorter_than_every_span_get_one_clipped_span() -> None:
    bi = _infill(128, single_span_prob=1.0)
    L = bi.window_length
    tokens = np.where(np.arange(L) % 2 == 0, 500, IDS.eos)  # documents of one token
    for index in range(50):
        w = Window(tokens, np.arange(0, L, 2), 0, index)
        p = parse_row(bi(w, "span"), IDS, 128)
        assert len(p.spans) == 1 and p.spans[0][1] == 1 and p.spans[0][0] % 2 == 0


def test_single_span_probability() -> None:
    bi = _infill(128, single_span_prob=0.3)
    rows = _batched_rows(bi, [random_window(bi.window_length, i) for i in range(2000)], "span")
    n, _ = _span_counts(rows)
    single = (n == 1).mean()
    assert abs(single - 0.3) < 0.03, single  # multi-span rows always have several spans
    assert (n[n > 1] >= 2).all()


def test_sentence_task_masks_whole_sentences_at_the_ratio() -> None:
    bi = _infill(512, seed=9)
    windows = [random_window(bi.window_length, i, mean_doc=120) for i in range(2000)]
    rows = _batched_rows(bi, windows, "sentence")
    for w, row in zip(windows[:200], rows, strict=False):  # whole sentences, per token
        check_task_rules(parse_row(row, IDS, 512), w, IDS, bi.cfg)
    _, masked_per_row = _span_counts(rows)
    masked = masked_per_row.sum()
    total = sum(len(w.tokens) for w in windows)
    assert abs(masked / total - bi.cfg.sentence_ratio) < 0.01, masked / total


def test_document_suffix_ratio() -> None:
    cfg = ObjectiveConfig(document_min_ratio=0.3, document_max_ratio=0.9)
    bi = BlankInfilling(cfg, seq_length=256, ids=IDS, seed=4)
    windows = [random_window(bi.window_length, i) for i in range(2000)]
    ratios = []
    for w, row in zip(windows, _batched_rows(bi, windows, "document"), strict=True):
        gen = int(row["valid_len"]) - int(row["sep"]) - 1
        assert int(row["sep"]) == len(w.tokens) - gen + 1
        assert row["tokens"][int(row["sep"]) - 1] == IDS.gmask
        ratios.append(gen / len(w.tokens))
    r = np.array(ratios)
    half = 0.5 / bi.window_length
    assert r.min() >= 0.3 - half and r.max() <= 0.9 + half
    assert r.min() < 0.32 and r.max() > 0.88 and abs(r.mean() - 0.6) < 0.01


@pytest.mark.parametrize("probs", [(0.5, 0.25, 0.25), (0.2, 0.3, 0.5)])
def test_task_frequencies(probs: tuple[float, float, float]) -> None:
    bi = _infill(64, span_prob=probs[0], sentence_prob=probs[1], document_prob=probs[2])
    base = random_window(20, 0)
    windows = [Window(base.tokens, base.sentence_starts, i % 3, i) for i in range(5000)]
    codes = np.array([int(row["objective"]) for row in _batched_rows(bi, windows, None)])
    freq = np.bincount(codes, minlength=3) / len(codes)
    assert np.abs(freq - np.array(probs)).max() < 0.02, freq


# ------------------------------------------------------------------------------- determinism


def test_rows_are_a_pure_function_of_seed_epoch_index() -> None:
    a, b = _infill(128, seed=5), _infill(128, seed=5)
    windows = [random_window(a.window_length, i, mean_doc=40) for i in range(50)]
    first = [a(w) for w in windows]
    for w in reversed(windows):  # other instance, other call order
        b(w)
    for w, row in zip(windows, first, strict=True):
        assert rows_equal(row, b(w))

    def differs(x: dict, y: dict) -> bool:
        return not rows_equal(x, y)

    w = windows[3]
    base = a(w, "span")
    assert differs(base, _infill(128, seed=6)(w, "span"))
    assert differs(base, a(Window(w.tokens, w.sentence_starts, w.epoch + 1, w.index), "span"))
    assert differs(base, a(Window(w.tokens, w.sentence_starts, w.epoch, w.index + 1), "span"))


def test_batch_rows_equal_single_rows() -> None:
    """A row never depends on the batch it is built in (mixed tasks, edge windows, fallback)."""
    bi = _infill(128, seed=21)
    edges = list(_edge_windows(bi.window_length).values())
    windows = [random_window(bi.window_length if i % 3 else 5 + i, i, mean_doc=(60, 3)[i % 2])
               for i in range(40)]  # fmt: skip
    windows = [*windows[:20], *edges, *windows[20:]]
    objectives = [None if i % 4 else OBJECTIVES[i % 3] for i in range(len(windows))]
    out = bi.batch(windows, objectives)
    assert out["tokens"].shape == (len(windows), 128)
    assert out["position_ids"].shape == (len(windows), 2, 128)
    for b, (w, obj) in enumerate(zip(windows, objectives, strict=True)):
        single = bi(w, obj)
        assert all(np.array_equal(out[k][b], single[k]) for k in single), b
    with pytest.raises(ValueError, match=re.escape("BlankInfilling.batch: no windows")):
        bi.batch([])


def test_special_ids_from_tokenizer(tiny_tokenizer) -> None:
    ids = SpecialIds.from_tokenizer(tiny_tokenizer)
    assert ids.mask == tiny_tokenizer.mask_id and ids.smask == tiny_tokenizer.smask_id
    assert ids.gmask == tiny_tokenizer.gmask_id and ids.sop == tiny_tokenizer.sop_id
    assert ids.eop == tiny_tokenizer.eop_id and ids.pad == ids.eos == tiny_tokenizer.eos_id
