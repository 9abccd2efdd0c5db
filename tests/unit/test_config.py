"""Config loading, overrides, validation messages, and every shipped YAML."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_glm.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_split,
    to_dict,
)
from megatron_glm.config_docs import field_docs, undocumented_fields

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_exist() -> None:
    names = {p.stem for p in (REPO / "configs" / "model").glob("*.yaml")}
    assert {
        "glm-tiny",
        "glm-base",
        "glm-large",
        "glm-410m",
        "glm-515m",
        "glm-2b",
        "glm-10b",
        "glm-130b",
    } <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path) -> None:
    """Model files load as ModelConfig; run recipes (everything else) as RunConfig."""
    cls = ModelConfig if path.parent.name == "model" else RunConfig
    cfg = load_config(path, cls=cls)
    assert isinstance(cfg, cls)


def test_model_section_by_name_resolves_configs_model(tmp_path: Path) -> None:
    run = tmp_path / "configs" / "run.yaml"
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "m.yaml").write_text("num_layers: 3\nhidden_size: 96\n")
    run.write_text("model: m\ndata:\n  seq_length: 128\n")
    cfg = load_config(run, ["model.num_attention_heads=4"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (
        3,
        96,
        4,
    )
    assert cfg.model.ffn_hidden_size == 4 * 96
    assert cfg.data.seq_length == 128


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides(
        {}, ["train.precision=bf16", "optimizer.lr=3e-4", "data.data_path=[a, b]"]
    )
    cfg = from_dict(RunConfig, raw)
    assert cfg.train.precision == "bf16"
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.data.data_path == ["a", "b"]


def test_unknown_key_names_closest() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'model\.hiden_size'; did you mean "
        r"'model\.hidden_size'\?",
    ):
        load_config(None, ["model.hiden_size=8"])
    with pytest.raises(ValueError, match=r"unknown config key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.seed=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["model.hidden_size=65"], "config field 'model.hidden_size': must be divisible by"),
        (["model.hidden_dropout=1.5"], "config field 'model.hidden_dropout': must be in [0, 1)"),
        (
            ["train.global_batch_size=6", "train.micro_batch_size=4"],
            "config field 'train.global_batch_size': must be a multiple of micro_batch_size (4)",
        ),
        (["train.precision=fp8"], "config field 'train.precision': 'fp8' is not one of"),
        (["objective.span_prob=0.9"], "config field 'objective.span_prob': span+sentence+document"),
        (["data.split=a,b"], "config field 'data.split'"),
        (["data.seq_length=1024"], "config field 'model.max_position_embeddings': must be >="),
        (["parallel.tp=4"], "config field 'model.num_attention_heads': must be divisible by"),
        (["train.zero_stage=5"], "config field 'train.zero_stage'"),
        (["model.num_layers=two"], "config field 'model.num_layers': expected int"),
        # rules across sections that need no world size: refused on load, not at launch
        (
            ["parallel.tp=2", "model.ffn_hidden_size=91"],
            "config field 'model.ffn_hidden_size': 91 must be divisible by parallel.tp (2)",
        ),
        (
            ["parallel.tp=2", "model.vocab_size=129"],
            "config field 'model.vocab_size': 129 must be divisible by parallel.tp (2); use 0",
        ),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=31"],
            "config field 'data.seq_length': 31 must be divisible by parallel.tp (2) with "
            "parallel.sequence_parallel",
        ),
        (
            ["parallel.pp=2", "train.zero_stage=2"],
            "config field 'train.zero_stage': ZeRO-2 cannot be combined with parallel.pp=2",
        ),
        (["train.seed=-1"], "config field 'train.seed': must be in [0, 2**64)"),
        (["train.seed=18446744073709551616"], "config field 'train.seed': must be in [0, 2**64)"),
    ],
)
def test_validation_names_field(override: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(None, override)
    assert message in str(info.value)


def test_parse_split_megatron_forms() -> None:
    """Megatron-LM's --split strings: ',' or '/' between 1-3 weights, padded with zeros."""
    assert parse_split("969, 30 ,1") == (969.0, 30.0, 1.0)
    assert parse_split("98/2/0") == (98.0, 2.0, 0.0)
    assert parse_split("80/20") == (80.0, 20.0, 0.0)
    assert parse_split("1") == (1.0, 0.0, 0.0)
    assert parse_split("0.7,0.2,0.1") == (0.7, 0.2, 0.1)
    assert load_config(None, ["data.split=98/2/0"]).data.split == "98/2/0"


@pytest.mark.parametrize(
    ("split", "rule"),
    [
        ("1,x,1", "'1,x,1': 'x' is not a number; expected 1-3 non-negative numbers"),
        ("", "'': '' is not a number"),
        ("1,2,3,4", "'1,2,3,4': 4 weights, expected 1-3 non-negative numbers"),
        ("90,-10", "'90,-10': weight '-10' is not finite and >= 0"),
        ("1,nan", "'1,nan': weight 'nan' is not finite and >= 0"),
        ("1,inf", "'1,inf': weight 'inf' is not finite and >= 0"),
        ("1/2,3", "'1/2,3': '1/2' is not a number"),
        ("0,0,0", "'0,0,0': weights sum to 0"),
    ],
)
def test_bad_split_names_the_field(split: str, rule: str) -> None:
    """One parser: the same message from parse_split and from config validation."""
    message = f"config field 'data.split': {rule}"
    with pytest.raises(ValueError) as err:
        parse_split(split)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError) as err:
        load_config(None, [f"data.split='{split}'"])
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("with a positive sum, e.g. 969,30,1")


def test_evaluation_needs_a_validation_split() -> None:
    """A config-only rule, so the config refuses it on load (not a pre-launch check)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.split=100,0,0", "train.eval_interval=10"])
    assert err.value.field == "data.split"
    assert "gives the validation split no documents but train.eval_interval=10" in str(err.value)
    assert (
        load_config(None, ["data.split=100,0,0", "train.eval_interval=0"]).train.eval_interval == 0
    )


def test_bad_yaml_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=str(bad)):
        load_config(bad)


def test_round_trip_through_dict() -> None:
    cfg = load_config(None, ["model.num_layers=3", "train.seed=7"])
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg


def test_bad_override_value_and_section_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"override 'optimizer\.lr=\[1': value is not valid YAML"):
        load_config(None, ["optimizer.lr=[1"])
    (tmp_path / "model").mkdir()
    bad = tmp_path / "model" / "broken.yaml"
    bad.write_text("num_layers: [2\n")
    run = tmp_path / "run.yaml"
    run.write_text("model: broken\n")
    with pytest.raises(ValueError, match=f"{bad}: invalid YAML"):
        load_config(run)
    with pytest.raises(ValueError, match=r"config section 'model': expected a mapping"):
        load_config(None, ["model=3"])


def test_partition_method_validated() -> None:
    cfg = load_config(None, ["parallel.partition_method=type:GLMBlock"])
    assert cfg.parallel.partition_method == "type:GLMBlock"
    with pytest.raises(ValueError, match=r"config field 'parallel\.partition_method': one of"):
        load_config(None, ["parallel.partition_method=balanced"])


def test_config_error_names_the_field_and_stays_a_value_error() -> None:
    err = ConfigError("train.zero_stage", "must be 0, 1, 2 or 3")
    assert isinstance(err, ValueError)
    assert (err.field, err.message) == ("train.zero_stage", "must be 0, 1, 2 or 3")
    assert str(err) == "config field 'train.zero_stage': must be 0, 1, 2 or 3"
    again = pickle.loads(pickle.dumps(err))  # DataLoader workers re-raise pickled errors
    assert type(again) is ConfigError and str(again) == str(err) and again.field == err.field
    # A section names its fields relative to itself; loading it inside a run adds the section.
    with pytest.raises(ConfigError) as alone:
        ModelConfig(hidden_size=65)
    assert alone.value.field == "hidden_size"
    with pytest.raises(ConfigError) as inside:
        load_config(None, ["model.hidden_size=65"])
    assert inside.value.field == "model.hidden_size"
    assert str(inside.value).startswith("config field 'model.hidden_size': must be divisible")


# ----------------------------------------------------------------------------- --help


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted name, owning class, field name) of every leaf field, sections flattened."""
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            out += _leaf_fields(sub, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            out.append((f"{prefix}{f.name}", cls, f.name))
    return out


def test_help_lists_every_field_with_type_default_and_docstring() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_glm.pretrain", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    flat = " ".join(text.split())
    leaves = _leaf_fields(RunConfig)
    assert len(leaves) > 60
    assert f"config fields ({len(leaves)}), by section" in text
    lines = text.splitlines()
    for dotted, owner, name in leaves:
        doc = field_docs(owner)[name]
        first_line = " ".join(doc.splitlines()[0].split())
        assert first_line and first_line in flat, dotted
        assert " ".join(doc.split()) in flat, dotted  # the whole docstring, rewrapped
        (at,) = [i for i, ln in enumerate(lines) if ln.startswith(f"  {dotted}: ")]
        section = dotted.split(".")[0]
        header = next(ln for ln in reversed(lines[:at]) if ln and not ln.startswith(" "))
        assert header.startswith(f"{section}: "), (dotted, header)  # grouped under its section
    for line in (
        "  train.precision: {fp32,bf16,fp16} = fp32",
        "  model.ffn_hidden_size: int | null = null",
        "  data.data_path: list[str] = []",
        "  optimizer.lr: float = 0.0001",
        "  parallel.sequence_parallel: bool = false",
        "  data.tokenizer_model: str = ''",
    ):
        assert line in lines, line


@dataclass(kw_only=True)
class _PartlyDocumented:
    documented: int = 1
    """Has a docstring."""
    bare: int = 2
    also_documented: str = "x"
    """Two lines
    of docstring."""


def test_every_config_field_has_a_docstring() -> None:
    """Adding a field without a docstring fails here (and it would be bare in --help)."""
    assert undocumented_fields(RunConfig) == []
    assert undocumented_fields(_PartlyDocumented) == ["bare"]
    assert field_docs(_PartlyDocumented) == {
        "documented": "Has a docstring.",
        "also_documented": "Two lines\nof docstring.",
    }
