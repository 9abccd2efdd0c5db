"""Cached, batched GLM decoding: equal to the uncached reference, exact beam search, sampling,
multi-blank filling, bad input."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.config import ModelConfig
from megatron_glm.generation import GenerationConfig, fill_blanks, generate
from megatron_glm.generation.logits import choose_tokens, top_p_filter
from megatron_glm.generation.steppers import CachedStepper, UncachedStepper
from megatron_glm.model import GLMModel, build_model

VOCAB = 32  # model (padded) vocabulary
REAL = 30  # tokenizer vocabulary: ids 30, 31 are padding rows
MASK, SMASK, GMASK, SOP, EOP, EOS = 1, 2, 3, 4, 5, 6


@dataclass
class IntTokenizer:
    """Words are integers; ``[MASK]``/``[sMASK]``/``[gMASK]`` map to their ids."""

    vocab_size: int = REAL
    mask_id: int = MASK
    smask_id: int = SMASK
    gmask_id: int = GMASK
    sop_id: int = SOP
    eop_id: int = EOP
    eos_id: int = EOS

    def encode(self, text: str) -> list[int]:
        names = {"[MASK]": MASK, "[sMASK]": SMASK, "[gMASK]": GMASK}
        return [names[w] if w in names else int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def tiny(**overrides: object) -> ModelConfig:
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=48,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model() -> GLMModel:
    """Large init so that random logits are peaked and decoding is not one repeated token."""
    return build_model(tiny(init_method_std=0.3), vocab_size=VOCAB, seed=0).eval()


def prompts(kind: str) -> tuple[list[list[int]], list[int]]:
    """4 part-A rows of different lengths and their mask index for a span/sentence/document."""
    g = torch.Generator().manual_seed(len(kind))
    lengths = [5, 11, 8, 17]
    rows = [torch.randint(10, REAL, (n,), generator=g).tolist() for n in lengths]
    positions = []
    for row in rows:
        if kind == "span":
            p, token = len(row) // 2, MASK
        elif kind == "sentence":
            p, token = len(row) // 3, SMASK
        else:
            p, token = len(row) - 1, GMASK
        row[p] = token
        positions.append(p)
    return rows, positions


# ------------------------------------------------------------- cached == uncached, step by step


@pytest.mark.parametrize("kind", ["span", "sentence", "document"])
@torch.no_grad()
def test_cached_logits_equal_uncached_at_every_step(model: GLMModel, kind: str) -> None:
    rows, positions = prompts(kind)
    steps = 9
    cached = CachedStepper(model, rows, positions, REAL, steps)
    uncached = UncachedStepper(model, rows, positions, REAL)
    g = torch.Generator().manual_seed(7)
    feed = [SOP] * len(rows)
    active = list(range(len(rows)))
    worst = 0.0
    for step in range(steps):
        a = cached.step(feed, step + 1)
        b = uncached.step(feed, step + 1)
        assert a.shape == b.shape == (len(active), REAL)
        worst = max(worst, float((a - b).abs().max()))
        if step == 3:  # row 1 finishes: both drop it (the cache shrinks)
            keep = [0, 2, 3]
            cached.select(keep)
            uncached.select(keep)
            active = [active[j] for j in keep]
        feed = torch.randint(10, REAL, (len(active),), generator=g).tolist()
    assert cached.cache.batch_size == 3
    assert worst < 1e-5, worst
    print(f"{kind}: cached vs uncached logits, max |diff| over {steps} steps {worst:.2e}")


def test_prefill_equals_forward_part_a(model: GLMModel) -> None:
    """Part A's hidden states from the cached prefill are those of the full forward."""
    rows, positions = prompts("span")
    stepper = CachedStepper(model, rows[:1], positions[:1], REAL, 4)
    assert stepper.cache.length == len(rows[0])
    tokens = torch.tensor([rows[0]])
    pos = torch.stack([torch.arange(len(rows[0])), torch.zeros(len(rows[0]), dtype=torch.long)])
    with torch.no_grad():
        full = model(tokens, pos[None], torch.tensor([5]), torch.tensor([5]))
        cache = model.new_cache(1, 8)
        pre = model.prefill(tokens, pos[None], torch.tensor([5]), cache)
    torch.testing.assert_close(pre, full, atol=1e-6, rtol=0)


def test_cache_refuses_training_mode_and_overflow() -> None:
    m = build_model(tiny(), vocab_size=VOCAB, seed=1)
    with pytest.raises(ValueError, match="eval"):
        m.new_cache(1, 4)
    m.eval()
    cache = m.new_cache(1, 4)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="capacity 4"):
        m.prefill(tokens, torch.zeros(1, 2, 5, dtype=torch.long), torch.tensor([5]), cache)


# ------------------------------------------------------------------ batched == one at a time


def _stop_after_a_few(model: GLMModel, rows: list[list[int]], positions: list[int]) -> int:
    """A token that greedy decoding emits early in row 0, used as the stop id (rows then
    finish at different steps, exercising the shrinking batch)."""
    free = generate(
        model,
        rows[:1],
        positions[:1],
        GenerationConfig(max_new_tokens=6),
        eos_ids=[],
        sop_id=SOP,
        vocab_size=REAL,
    )[0]
    return free[2]


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(max_new_tokens=10),
        GenerationConfig(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2),
        GenerationConfig(max_new_tokens=7, num_beams=3, length_penalty=0.7),
        GenerationConfig(max_new_tokens=7, num_beams=4, no_repeat_ngram_size=2),
    ],
    ids=["greedy", "greedy-penalties", "beam", "beam-ngram"],
)
def test_batched_equals_one_at_a_time(model: GLMModel, config: GenerationConfig) -> None:
    rows, positions = prompts("span")
    stop = _stop_after_a_few(model, rows, positions)
    kwargs = dict(eos_ids=[stop], sop_id=SOP, vocab_size=REAL)
    batched = generate(model, rows, positions, config, **kwargs)  # type: ignore[arg-type]
    single = [
        generate(model, [r], [p], config, **kwargs)[0]  # type: ignore[arg-type]
        for r, p in zip(rows, positions, strict=True)
    ]
    uncached = generate(model, rows, positions, config, use_cache=False, **kwargs)  # type: ignore[arg-type]
    assert batched == single == uncached
    lengths = {len(t) for t in batched}
    assert len(lengths) > 1, batched  # rows stopped at different steps
    assert all(stop not in t and len(t) <= config.max_new_tokens for t in batched)


def test_padding_rows_never_win() -> None:
    """A model whose padding rows have the largest logits still generates real ids only."""
    m = build_model(tiny(), vocab_size=VOCAB, seed=2).eval()
    with torch.no_grad():
        m.head_weight[REAL:] = m.head_weight[:REAL].sum(0) * 100  # dominates every logit
    rows, positions = prompts("span")
    out = generate(
        m,
        rows,
        positions,
        GenerationConfig(max_new_tokens=4),
        eos_ids=[EOP],
        sop_id=SOP,
        vocab_size=REAL,
    )
    assert all(0 <= t < REAL for row in out for t in row)
    full = generate(
        m, rows, positions, GenerationConfig(max_new_tokens=4), eos_ids=[EOP], sop_id=SOP
    )
    assert any(t >= REAL for row in full for t in row)  # the restriction is what did it


# ------------------------------------------------------------- beam search == brute force


def _brute_force(
    model: GLMModel,
    sop: int,
    row: list[int],
    pos: int,
    vocab: int,
    stop: int,
    max_len: int,
    lp: float,
) -> list[int]:
    """Score every continuation (ending at ``stop`` or at ``max_len``) with the uncached model."""
    best: tuple[float, list[int]] | None = None

    def logprobs(prefix: list[int]) -> torch.Tensor:
        stepper = UncachedStepper(model, [row], [pos], vocab)
        out = torch.empty(0)
        for i, token in enumerate([sop, *prefix]):
            out = stepper.step([token], i + 1)
        return torch.log_softmax(out[0], dim=-1)

    cache: dict[tuple[int, ...], torch.Tensor] = {}
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if stop in seq[:-1] or (length < max_len and seq[-1] != stop):
                continue
            total = 0.0
            for i, token in enumerate(seq):
                key = seq[:i]
                if key not in cache:
                    with torch.no_grad():
                        cache[key] = logprobs(list(key))
                total += float(cache[key][token])
            score = total / length**lp
            if best is None or score > best[0]:
                best = (score, [t for t in seq if t != stop])
    assert best is not None
    return best[1]


@pytest.mark.parametrize("lp", [0.0, 1.0, 2.5])
def test_beam_search_equals_brute_force(lp: float) -> None:
    """Vocabulary of 4 real ids (stop = 3), up to 3 tokens: 16 beams keep every continuation."""
    m = build_model(tiny(init_method_std=0.5), vocab_size=8, seed=3).eval()
    vocab, stop, sop, max_len = 4, 3, 5, 3
    rows = [[0, 1, 7, 2], [2, 7, 0, 0, 1, 1]]
    positions = [2, 1]
    config = GenerationConfig(max_new_tokens=max_len, num_beams=16, length_penalty=lp)
    beams = generate(m, rows, positions, config, eos_ids=[stop], sop_id=sop, vocab_size=vocab)
    expected = [
        _brute_force(m, sop, r, p, vocab, stop, max_len, lp)
        for r, p in zip(rows, positions, strict=True)
    ]
    assert beams == expected
    greedy = generate(
        m,
        rows,
        positions,
        GenerationConfig(max_new_tokens=max_len),
        eos_ids=[stop],
        sop_id=sop,
        vocab_size=vocab,
    )
    assert greedy != beams  # the search finds what greedy misses


# ------------------------------------------------------------------------------- sampling


def test_sampling_seeded_and_top_k_one_is_greedy(model: GLMModel) -> None:
    rows, positions = prompts("sentence")
    kwargs = dict(eos_ids=[EOP], sop_id=SOP, vocab_size=REAL)

    def run(**cfg: object) -> list[list[int]]:
        return generate(
            model,
            rows,
            positions,
            GenerationConfig(max_new_tokens=8, **cfg),  # type: ignore[arg-type]
            **kwargs,
        )  # type: ignore[arg-type]

    hot = dict(do_sample=True, temperature=2.0)
    assert run(seed=11, **hot) == run(seed=11, **hot)
    assert run(seed=11, **hot) != run(seed=12, **hot)
    state = torch.random.get_rng_state()
    assert run(do_sample=True, top_k=1, seed=5, temperature=3.0) == run()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not used


def test_sampled_fills_do_not_depend_on_chunking(model: GLMModel) -> None:
    """A text's sampled fills depend on the seed and its index in the whole input: the same
    texts in chunks of 2 (``first_row``, as ``tools/generate.py`` reads a file) or all at once
    give the same fills, and two texts never share a stream."""
    texts = [f"{10 + i} 11 [MASK] 12 [MASK]" for i in range(4)] + ["10 11 [MASK] 12 [MASK]"]
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=3.0, seed=7)
    whole = fill_blanks(model, IntTokenizer(), texts, config, batch_size=3)
    chunked = [
        r
        for start in range(0, len(texts), 2)
        for r in fill_blanks(
            model, IntTokenizer(), texts[start : start + 2], config, first_row=start
        )
    ]
    assert chunked == whole
    shifted = fill_blanks(model, IntTokenizer(), texts[:2], config, first_row=2)
    assert shifted != whole[:2]  # another index, another stream
    assert whole[4].fills != fill_blanks(model, IntTokenizer(), texts[:1], config)[0].fills


def test_top_p_keeps_exactly_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0
    logits = probs.log().view(1, 4)
    for p, nucleus in [(0.45, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3})]:
        kept = top_p_filter(logits, p)[0]
        assert {i for i in range(4) if kept[i] > float("-inf")} == nucleus, p
        torch.testing.assert_close(kept[list(nucleus)], logits[0, list(nucleus)])
    config = GenerationConfig(do_sample=True, top_p=0.75)
    g = [torch.Generator().manual_seed(0)]
    draws = {choose_tokens(logits, config, g)[0] for _ in range(200)}
    assert draws == {1, 3}


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["10 [MASK] 11", "10 11 12"], "row 1: no \\[MASK\\]"),
        (["10 [MASK]", "[MASK] 12", "10 [XMASK] 12"], "row 2: unknown mask token '\\[XMASK\\]'"),
        (["10 [MASK]", "12 [MASK]", " ".join(["10"] * 44) + " [MASK]"], "row 2: prompt of 45"),
    ],
    ids=["no-mask", "unknown-mask", "too-long"],
)
def test_bad_input_names_the_row(model: GLMModel, texts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fill_blanks(model, IntTokenizer(), texts, GenerationConfig(max_new_tokens=4))


def test_generation_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"GenerationConfig\.top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"GenerationConfig\.min_new_tokens"):
        GenerationConfig(max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig(num_beams=2, do_sample=True)


def test_min_new_tokens_delays_the_stop(model: GLMModel) -> None:
    rows, positions = prompts("span")
    stop = _stop_after_a_few(model, rows, positions)
    out = generate(
        model,
        rows,
        positions,
        GenerationConfig(max_new_tokens=8, min_new_tokens=6),
        eos_ids=[stop],
        sop_id=SOP,
        vocab_size=REAL,
    )
    assert all(len(t) >= 6 for t in out)


# ------------------------------------------------------------------------- multiple blanks

PATTERN = list(range(10, 22))  # the one "sentence" the copy model learns


def _copy_example(g: torch.Generator) -> tuple[list[int], list[int], int]:
    """Part A: PATTERN with 1-3 random spans (1-3 tokens, apart) masked; part B: the first."""
    want = int(torch.randint(1, 4, (1,), generator=g))
    spans: list[tuple[int, int]] = []
    while len(spans) < want:
        start = int(torch.randint(0, len(PATTERN), (1,), generator=g))
        end = min(start + int(torch.randint(1, 4, (1,), generator=g)), len(PATTERN))
        if all(end < s0 or start > s1 for s0, s1 in spans):
            spans.append((start, end))
    spans.sort()
    part_a, masked = [], spans[0]
    i, first_at = 0, -1
    for s0, s1 in spans:
        part_a += PATTERN[i:s0]
        if (s0, s1) == masked:
            first_at = len(part_a)
        part_a.append(MASK)
        i = s1
    part_a += PATTERN[i:]
    return part_a, PATTERN[masked[0] : masked[1]], first_at


def _train_copy_model(steps: int = 300) -> GLMModel:
    torch.manual_seed(0)
    m = build_model(tiny(), vocab_size=VOCAB, seed=4)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        examples = [_copy_example(g) for _ in range(16)]
        s = max(len(a) + len(b) + 1 for a, b, _ in examples)
        tokens = torch.zeros(16, s, dtype=torch.long)
        targets = torch.zeros(16, s, dtype=torch.long)
        weight = torch.zeros(16, s)
        position_ids = torch.zeros(16, 2, s, dtype=torch.long)
        for r, (a, b, p) in enumerate(examples):
            n, k = len(a), len(b) + 1
            tokens[r, : n + k] = torch.tensor([*a, SOP, *b])
            targets[r, n : n + k] = torch.tensor([*b, EOP])
            weight[r, n : n + k] = 1.0
            position_ids[r, 0, :n] = torch.arange(n)
            position_ids[r, 0, n : n + k] = p
            position_ids[r, 1, n : n + k] = torch.arange(1, k + 1)
        sep = torch.tensor([len(a) for a, _, _ in examples])
        valid = torch.tensor([len(a) + len(b) + 1 for a, b, _ in examples])
        logits = m.logits(m(tokens, position_ids, sep, valid))
        loss = (F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weight).sum()
        opt.zero_grad()
        (loss / weight.sum()).backward()
        opt.step()
    return m.eval()


def test_multi_blank_fills_three_blanks_in_order() -> None:
    m = _train_copy_model()
    tok = IntTokenizer()
    text = "10 [MASK] 13 14 [MASK] 17 18 [MASK] 21"
    other = "10 11 12 [MASK] 16 17 18 19 20 21"
    results = fill_blanks(m, tok, [text, other], GenerationConfig(max_new_tokens=5), batch_size=2)
    expected_text = " ".join(str(t) for t in PATTERN)
    assert results[0].fills == ["11 12", "15 16", "19 20"]
    assert results[0].text == expected_text
    assert results[0].new_tokens == 6
    assert results[1].fills == ["13 14 15"] and results[1].text == expected_text
    # one text at a time, and uncached, give the same fills
    assert fill_blanks(m, tok, [text], GenerationConfig(max_new_tokens=5))[0] == results[0]
    uncached = fill_blanks(
        m, tok, [text, other], GenerationConfig(max_new_tokens=5), use_cache=False
    )
    assert uncached == results


def _model_preferring(token: int) -> GLMModel:
    """A model whose head row ``token`` dominates every logit (greedy always picks it)."""
    m = build_model(tiny(), vocab_size=VOCAB, seed=5).eval()
    with torch.no_grad():
        m.head_weight[token] = m.head_weight.sum(0) * 100
    return m


def test_gmask_stops_at_eos_and_mask_stops_at_eop_only() -> None:
    m = _model_preferring(EOS)
    config = GenerationConfig(max_new_tokens=3)
    gmask, mask = fill_blanks(m, IntTokenizer(), ["10 11 [gMASK]", "10 [MASK] 11"], config)
    assert gmask.fills == [""] and gmask.new_tokens == 0
    assert mask.fills == [f"{EOS} {EOS} {EOS}"]  # [MASK] ends at [eop] only


def test_fills_never_contain_mask_tokens() -> None:
    m = _model_preferring(MASK)  # would fill every blank with another blank, forever
    (result,) = fill_blanks(
        m, IntTokenizer(), ["10 [MASK] 11 [sMASK]"], GenerationConfig(max_new_tokens=2)
    )
    assert len(result.fills) == 2
    assert all(str(MASK) not in f.split() for f in result.fills)
