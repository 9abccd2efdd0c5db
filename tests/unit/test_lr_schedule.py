"""AnnealingLR against GLM's own closed form, and its checkpoint round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_glm.config import OptimizerConfig
from megatron_glm.training.lr_schedule import (
    AnnealingLR,
    DecayStyle,
    build_scheduler,
    warmup_steps,
)


def glm_reference(k: int, lr: float, warmup: int, total: int, style: str, m: float) -> float:
    """GLM's ``AnnealingLR.get_lr`` as written there (cosine via ``decay_ratio = 1/m``).

    ``end_iter = total - warmup``; linear is clamped at the end (GLM's is not, see module doc).
    """
    if warmup > 0 and k <= warmup:
        return lr * k / warmup
    end_iter = total - warmup
    if style == "constant":
        return lr
    ratio = min(1.0, (k - warmup) / end_iter)
    if style == "linear":
        return lr - lr * (1 - m) * ratio
    d = 1.0 / m
    return lr / d * ((math.cos(math.pi * ratio) + 1) * (d - 1) / 2 + 1)


def _optimizer(groups: int = 2) -> torch.optim.Optimizer:
    params = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(groups)]
    return torch.optim.SGD([{"params": p} for p in params], lr=123.0)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_matches_glm_closed_form(style: DecayStyle, warmup: int) -> None:
    total, lr, m = 40, 3e-4, 0.1
    opt = _optimizer()
    sched = AnnealingLR(
        opt, peak_lr=lr, warmup=warmup, total=total, decay_style=style, min_lr_ratio=m
    )
    for k in range(total + 10):  # past the end the LR stays at the floor
        want = glm_reference(k, lr, warmup, total, style, m)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), k
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
        sched.step()


def test_landmarks() -> None:
    opt = _optimizer(1)
    sched = AnnealingLR(opt, peak_lr=1.0, warmup=10, total=110, decay_style="cosine",
                        min_lr_ratio=0.1)  # fmt: skip
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == 0.0  # the warmup ramp starts at zero (GLM / Megatron)
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lrs[110] == pytest.approx(0.1)
    assert lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_lr_mult_scales_a_group() -> None:
    opt = _optimizer(2)
    opt.param_groups[1]["lr_mult"] = 0.5
    AnnealingLR(opt, peak_lr=2.0, warmup=0, total=10, decay_style="constant", min_lr_ratio=0.1)
    assert [g["lr"] for g in opt.param_groups] == [2.0, 1.0]


def test_state_round_trip_resumes_position() -> None:
    kwargs = dict(peak_lr=1e-3, warmup=3, total=20, decay_style="cosine", min_lr_ratio=0.1)
    a_opt, b_opt = _optimizer(1), _optimizer(1)
    a = AnnealingLR(a_opt, **kwargs)  # type: ignore[arg-type]
    for _ in range(7):
        a.step()
    b = AnnealingLR(b_opt, **kwargs)  # type: ignore[arg-type]
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 7
    assert b_opt.param_groups[0]["lr"] == a_opt.param_groups[0]["lr"]
    a.step()
    b.step()
    assert b_opt.param_groups[0]["lr"] == a_opt.param_groups[0]["lr"]


def test_deepspeed_keyword_step_is_one_update() -> None:
    opt = _optimizer(1)
    sched = AnnealingLR(opt, peak_lr=1.0, warmup=4, total=8, decay_style="linear",
                        min_lr_ratio=0.0)  # fmt: skip
    sched.step(**{})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_build_scheduler_from_config() -> None:
    cfg = OptimizerConfig(lr=1e-3, warmup_ratio=0.1, decay_style="linear", min_lr_ratio=0.5)
    assert warmup_steps(50, cfg.warmup_ratio, cfg.warmup_iters) == 5
    assert warmup_steps(50, 0.1, 7) == 7
    opt = _optimizer(1)
    sched = build_scheduler(opt, cfg, train_iters=50)
    assert (sched.warmup, sched.total) == (5, 50)
    for _ in range(50):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
