"""Finetuning: cloze scores against a brute-force log-probability, seq2seq loss, task files,
and a tiny model learning a synthetic cloze task (single process, no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.config import ConfigError, FinetuneConfig, ModelConfig
from megatron_glm.data.jsonl import BadInputError
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.finetune.losses import ClozeLoss, Seq2SeqLoss, classification_sums
from megatron_glm.finetune.tasks import (
    ClassificationExample,
    Pattern,
    Seq2SeqExample,
    cloze_multi_batch,
    cloze_single_batch,
    read_classification,
    read_seq2seq,
    seq2seq_batch,
)
from megatron_glm.model import LossOutput, build_model
from megatron_glm.training.batches import MODEL_INPUTS

SEQ = 48


def tiny_model(vocab: int, seed: int = 3) -> torch.nn.Module:
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        kernels="torch",
    )
    return build_model(cfg, vocab_size=vocab, seed=seed).eval()


def examples() -> list[ClassificationExample]:
    return [
        ClassificationExample("the json module parses text", 1),
        ClassificationExample("a deque from collections", 0, text_b="second part"),
        ClassificationExample("short", 2),
    ]


def brute_log_prob(model, tok: GLMTokenizer, part_a: list[int], mask_at: int, ids: list[int]):
    """log p(ids | part A) by an uncached forward of one row ``part A [sop] ids[:-1]``."""
    b = [tok.sop_id, *ids[:-1]]
    tokens = torch.tensor([part_a + b])
    a, n = len(part_a), len(b)
    pos = torch.zeros(1, 2, a + n, dtype=torch.long)
    pos[0, 0, :a] = torch.arange(a)
    pos[0, 0, a:] = mask_at
    pos[0, 1, a:] = torch.arange(1, n + 1)
    hidden = model(tokens, pos, torch.tensor([a]), torch.tensor([a + n]))
    logp = torch.log_softmax((hidden[0] @ model.head_weight.t()).double(), dim=-1)
    return sum(float(logp[a + i, t].detach()) for i, t in enumerate(ids))


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_multi_token_scores_equal_brute_force(tiny_tokenizer: GLMTokenizer, score: str) -> None:
    tok = tiny_tokenizer
    model = tiny_model(tok.padded_vocab_size)
    pattern = Pattern.parse("{text} [MASK] is the package. {text_b}")
    cands = [tok.encode(w) for w in ("collections", "json decoder", "x")]
    assert sorted(len(c) for c in cands) != [1, 1, 1]  # really multi-token
    loss = ClozeLoss.build(cands, score)
    batch = cloze_multi_batch(tok, pattern, cands, [*examples(), None], SEQ)
    hidden = model(*(batch[k] for k in MODEL_INPUTS))
    with torch.no_grad():
        got = loss.scores(model, hidden, batch)
    for e, ex in enumerate(examples()):
        part_a, mask_at = pattern.encode(tok, ex, SEQ - max(len(c) for c in cands))
        for c, ids in enumerate(cands):
            want = brute_log_prob(model, tok, part_a, mask_at, ids)
            want = want / len(ids) if score == "mean" else want
            assert abs(float(got[e, c]) - want) < 1e-4, (e, c)
    out = loss(model, hidden, batch)
    want_ce = F.cross_entropy(got[:3], batch["label"][:3], reduction="sum")
    assert float(out.sum_loss) == pytest.approx(float(want_ce), rel=1e-6)
    assert float(out.num_tokens) == 3.0  # the padding example counts nothing


def test_single_token_loss_equals_brute_force(tiny_tokenizer: GLMTokenizer) -> None:
    """CE over the verbalizer logits at [MASK] = CE over their log-probabilities, each from an
    uncached forward of the plain model at the mask position."""
    tok = tiny_tokenizer
    model = tiny_model(tok.padded_vocab_size)
    pattern = Pattern.parse("{text} It is [MASK].")
    cands = [[tok.encode("a")[-1]], [tok.encode("the")[-1]], [tok.encode("b")[-1]]]
    loss = ClozeLoss.build(cands)
    assert loss.single_token
    batch = cloze_single_batch(tok, pattern, examples(), SEQ)
    out = loss(model, model(*(batch[k] for k in MODEL_INPUTS)), batch)
    total = 0.0
    for ex in examples():
        part_a, mask_at = pattern.encode(tok, ex, SEQ)
        tokens = torch.tensor([part_a])
        pos = torch.zeros(1, 2, len(part_a), dtype=torch.long)
        pos[0, 0] = torch.arange(len(part_a))
        n = torch.tensor([len(part_a)])
        hidden = model(tokens, pos, n, n)
        logp = torch.log_softmax((hidden[0, mask_at] @ model.head_weight.t()).double(), dim=-1)
        cand_lp = torch.stack([logp[c[0]] for c in cands])
        total -= float(torch.log_softmax(cand_lp, dim=0)[ex.label])
    assert float(out.sum_loss) == pytest.approx(total, rel=1e-5)


def test_seq2seq_loss_and_label_smoothing(tiny_tokenizer: GLMTokenizer) -> None:
    tok = tiny_tokenizer
    model = tiny_model(tok.padded_vocab_size)
    rows = [Seq2SeqExample("the json module parses", "text"), None]
    batch = seq2seq_batch(tok, rows, SEQ, mask_id=tok.gmask_id, max_target_length=8)
    hidden = model(*(batch[k] for k in MODEL_INPUTS))
    plain = Seq2SeqLoss()(model, hidden, batch)
    tgt = tok.encode("text")
    want = -brute_log_prob(
        model,
        tok,
        batch["tokens"][0, : int(batch["sep"][0])].tolist(),
        int(batch["sep"][0]) - 1,
        [*tgt, tok.eop_id],
    )
    assert float(plain.num_tokens) == len(tgt) + 1
    assert float(plain.sum_loss) == pytest.approx(want, rel=1e-5)
    smooth = Seq2SeqLoss(label_smoothing=0.1)(model, hidden, batch)
    sel = batch["loss_mask"][0] > 0
    logp = torch.log_softmax(hidden[0][sel] @ model.head_weight.t(), dim=-1)
    nll = -logp.gather(1, batch["targets"][0][sel].unsqueeze(1)).squeeze(1)
    want_s = (0.9 * nll - 0.1 * logp.mean(-1)).sum()
    assert float(smooth.sum_loss) == pytest.approx(float(want_s), rel=1e-5)


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_task_files_name_file_and_line(tmp_path: Path) -> None:
    good = {"text": "abc", "label": "x"}
    f = write(tmp_path / "a.jsonl", [good, {"text": "abc"}])
    with pytest.raises(BadInputError, match=rf"{f}:2: .*'label'"):
        read_classification(f, ["x", "y"])
    f = write(tmp_path / "b.jsonl", [good, good, {"text": "abc", "label": "z"}])
    with pytest.raises(BadInputError, match=rf"{f}:3: .*label 'z' has no verbalizer"):
        read_classification(f, ["x", "y"])
    f = write(
        tmp_path / "c.jsonl", [{"source": "s", "target": "t"}, {"source": " ", "target": "t"}]
    )
    with pytest.raises(BadInputError, match=rf"{f}:2: .*'source' is empty"):
        read_seq2seq(f)
    assert read_classification(write(tmp_path / "d.jsonl", [good]), ["y", "x"])[0].label == 1


def test_pattern_config_rules() -> None:
    with pytest.raises(ConfigError, match=r"patterns\[1\]"):
        FinetuneConfig(patterns=["{text} [MASK]", "{text} [MASK] [MASK]"])
    with pytest.raises(ConfigError, match="pattern_id"):
        FinetuneConfig(pattern_id=1)


def test_tiny_model_learns_synthetic_cloze(tiny_tokenizer: GLMTokenizer) -> None:
    """label = whether a fixed word appears: chance (~50%) before, >= 95% after training."""
    tok = tiny_tokenizer
    g = torch.Generator().manual_seed(0)
    words = ["data", "file", "list", "value", "name", "type", "object", "string"]

    def make(n: int) -> list[ClassificationExample]:
        out = []
        for _ in range(n):
            picks = [words[int(i)] for i in torch.randint(len(words), (6,), generator=g)]
            has = bool(torch.rand(1, generator=g) < 0.5)
            if has:
                picks[int(torch.randint(6, (1,), generator=g))] = "module"
            out.append(ClassificationExample(" ".join(picks), int(has)))
        return out

    train, test = make(256), make(128)
    pattern = Pattern.parse("{text} Module: [MASK]")
    cands = [tok.encode("no"), tok.encode("yes")]
    loss = ClozeLoss.build(cands)
    assert not loss.single_token  # "yes" is several pieces: the part-B scoring path learns
    model = tiny_model(tok.padded_vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def run(rows: list[ClassificationExample]) -> LossOutput:
        b = cloze_multi_batch(tok, pattern, cands, rows, 24)
        return loss(model, model(*(b[k] for k in MODEL_INPUTS)), b)

    def accuracy() -> float:
        with torch.no_grad():
            out = run(test)
        return float(out.per_objective_sum[1] / out.per_objective_count[1])

    before = accuracy()
    assert 0.3 < before < 0.7
    for step in range(100):
        out = run(train[(step * 32) % 256 :][:32])
        opt.zero_grad()
        (out.sum_loss / out.num_tokens).backward()
        opt.step()
    after = accuracy()
    assert after >= 0.95, (before, after)


def test_cloze_metrics_from_counts_equal_metrics_on_predictions() -> None:
    """Accuracy and macro F1 reduced as loss-sum counts (any layout) equal
    ``finetune.metrics`` on the predicted labels, padding examples excluded."""
    from megatron_glm.finetune.metrics import accuracy, macro_f1
    from megatron_glm.training.loss_stats import LossAccumulator

    g = torch.Generator().manual_seed(0)
    loss = ClozeLoss.build([[5], [6], [7]])
    acc = LossAccumulator(loss.objectives, "cpu")
    preds: list[str] = []
    golds: list[str] = []
    for _ in range(3):  # three micro-batches, the last with two padding rows
        scores = torch.randn(6, 3, generator=g)
        label = torch.randint(0, 3, (6,), generator=g)
        weight = torch.tensor([1.0, 1, 1, 1] + ([1.0, 1.0] if len(preds) < 12 else [0.0, 0.0]))
        acc.add(classification_sums(scores, label, weight))
        keep = weight > 0
        preds += [str(int(x)) for x in scores.argmax(1)[keep]]
        golds += [str(int(x)) for x in label[keep]]
    got = loss.metrics(acc.result())
    assert got["accuracy"] == pytest.approx(accuracy(preds, golds), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(macro_f1(preds, golds, ["0", "1", "2"]), abs=1e-12)


def test_cli_refuses_a_bad_task_file_before_launch(
    tmp_path: Path, tiny_tokenizer_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``glm-finetune`` exits 2 naming file:line, and a config error naming the field, before
    any process group starts."""
    from megatron_glm.finetune.__main__ import main

    task = tmp_path / "task"
    task.mkdir()
    write(task / "train.jsonl", [{"text": "a b", "label": "x"}] * 3)
    write(task / "validation.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "q"}])
    run = tmp_path / "run.yaml"
    run.write_text(
        f"data: {{tokenizer_model: {tiny_tokenizer_model}, seq_length: 32}}\n"
        f"finetune: {{task_dir: {task}, verbalizers: {{x: 'yes', y: 'no'}}}}\n"
    )
    assert main(["--config", str(run), "finetune.verbalizers={x: yes, y: no}"]) == 2
    assert "'finetune.verbalizers.x': expected str, got True (quote it" in capsys.readouterr().err
    assert main(["--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{task / 'validation.jsonl'}:2: " in err and "label 'q' has no verbalizer" in err
    assert main(["--config", str(run), "finetune.task=seq2seq"]) == 2
    assert "config field 'finetune.metric'" not in capsys.readouterr().err  # default resolves
    assert main(["--config", str(run), "finetune.metric=macro_f1", "finetune.task=seq2seq"]) == 2
    assert "config field 'finetune.metric'" in capsys.readouterr().err
    assert main(["--config", str(run), "finetune.metric=rougeL"]) == 2  # cloze has no ROUGE
    assert "'rougeL' is not a cloze metric" in capsys.readouterr().err


def test_cli_refuses_to_resume_a_pretraining_checkpoint(
    tmp_path: Path, tiny_tokenizer_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``checkpoint.load`` naming a pretraining checkpoint would continue its iteration, Adam
    and schedule as the task's: refused before launch, pointing at ``finetune.init``; the same
    checkpoint as ``finetune.init`` passes that check (the run then fails later for want of a
    process group, which is not what is tested)."""
    from dataclasses import asdict

    from megatron_glm.config import load_config
    from megatron_glm.finetune.__main__ import main
    from megatron_glm.finetune.run import check_finetune
    from megatron_glm.model import tensor_parallel_layout
    from megatron_glm.training.checkpoint import write_checkpoint

    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "validation"):
        write(task / f"{split}.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])
    model = build_model(
        ModelConfig(vocab_size=GLMTokenizer(tiny_tokenizer_model).padded_vocab_size), seed=1
    )
    tag = tmp_path / "pre" / "global_step5"
    tag.mkdir(parents=True)
    base = {"iteration": 5, "config": {"model": asdict(model.cfg), "finetune": {"task_dir": ""}}}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(
        state, tensor_parallel_layout(model.cfg), tag, tp=1, pp=1, base=base, marker={}
    )
    (tmp_path / "pre" / "latest").write_text("global_step5")
    run = tmp_path / "run.yaml"
    run.write_text(
        f"data: {{tokenizer_model: {tiny_tokenizer_model}, seq_length: 32}}\n"
        f"finetune: {{task_dir: {task}, verbalizers: {{x: 'yes', y: 'no'}}}}\n"
    )
    assert main(["--config", str(run), f"checkpoint.load={tmp_path / 'pre'}"]) == 2
    err = capsys.readouterr().err
    assert "config field 'checkpoint.load'" in err and "not a checkpoint of a finetuning run" in err
    assert f"finetune.init={tmp_path / 'pre'}" in err
    check_finetune(load_config(run, [f"finetune.init={tmp_path / 'pre'}"]))
