"""ParallelDims without a process group: sizes, validation, rank layout, the mpu methods."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_glm.parallel.dims import ParallelDims


def test_rank_layout_is_deepspeeds_pipe_data_model_order() -> None:
    # world 8 = pp 2 x dp 2 x tp 2, model fastest: rank = (pp * dp_size + dp) * tp + tp_rank.
    expected = {  # rank: (tp group, dp group, pipeline, model-parallel group)
        0: ([0, 1], [0, 2], [0, 4], [0, 1, 4, 5]),
        3: ([2, 3], [1, 3], [3, 7], [2, 3, 6, 7]),
        6: ([6, 7], [4, 6], [2, 6], [2, 3, 6, 7]),
    }
    for rank, (tp, dp, pp, mp) in expected.items():
        d = ParallelDims(world_size=8, tp=2, pp=2, dp=2, rank=rank)
        assert (d.tp_ranks, d.dp_ranks, d.pp_ranks, d.model_parallel_ranks) == (tp, dp, pp, mp)
    d = ParallelDims(world_size=8, tp=2, pp=2, rank=6)
    assert (d.tp_rank, d.dp_rank, d.pp_rank) == (0, 1, 1)
    assert d.get_model_parallel_rank() == 2 and d.get_model_parallel_world_size() == 4
    assert d.get_tensor_model_parallel_src_rank() == 6
    assert d.get_data_parallel_group_ranks() == [4, 6]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4), (8, 1)])
def test_groups_agree_with_deepspeed_topology(tp: int, pp: int) -> None:
    world = 8
    topo = ParallelDims(world_size=world, tp=tp, pp=pp).topology()
    for rank in range(world):
        d = ParallelDims(world_size=world, tp=tp, pp=pp, rank=rank)
        coord = topo.get_coord(rank)
        assert (d.tp_rank, d.dp_rank, d.pp_rank) == (coord.model, coord.data, coord.pipe)
        assert d.tp_ranks in topo.get_axis_comm_lists("model") or tp == 1
        assert d.dp_ranks in topo.get_axis_comm_lists("data") or d.dp_size == 1
        assert d.model_parallel_ranks == sorted(topo.get_axis_list("data", d.dp_rank))


def test_dp_defaults_to_the_rest_of_the_world() -> None:
    assert ParallelDims(world_size=12, tp=2, pp=3).dp == 2
    assert ParallelDims(world_size=1).dp == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(world_size=6, tp=4),
            "parallel layout: tp (4) x pp (1) = 4 does not divide the world size 6",
        ),
        (
            dict(world_size=8, tp=2, dp=2),
            "parallel layout: tp (2) x pp (1) x dp (2) = 4 != world size 8",
        ),
        (dict(world_size=4, tp=0), "parallel layout: tp must be an integer >= 1, got 0"),
        (dict(world_size=4, dp=0), "parallel layout: dp must be an integer >= 1, got 0"),
        (
            dict(world_size=2, dp=2, sequence_parallel=True),
            "parallel layout: sequence_parallel needs tp > 1",
        ),
        (dict(world_size=2, tp=2, rank=2), "parallel layout: rank 2 not in [0, 2)"),
    ],
)
def test_invalid_layouts_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        ParallelDims(**kwargs)
    assert str(exc.value) == message


def test_divisibility_errors_name_the_field() -> None:
    d = ParallelDims(world_size=4, tp=4)
    d.check_divisible("model.num_attention_heads", 8)
    with pytest.raises(ValueError) as exc:
        d.check_divisible("model.num_attention_heads", 6)
    assert str(exc.value) == (
        "config field 'model.num_attention_heads': 6 must be divisible by parallel.tp (4)"
    )


def test_sizes_only_object_has_no_groups_and_build_needs_a_group() -> None:
    d = ParallelDims(world_size=4, tp=2)
    with pytest.raises(RuntimeError, match=r"holds sizes only \(no process groups\)"):
        d.get_tensor_model_parallel_group()
    with pytest.raises(RuntimeError, match="needs an initialised default process group"):
        ParallelDims.build(tp=2)
    # Sequence parallelism is a switch on the same groups (dataclasses.replace keeps them).
    sp = dataclasses.replace(d, sequence_parallel=True)
    assert sp.sequence_parallel and sp.tp == 2 and sp == dataclasses.replace(sp)


def test_describe_and_mpu_sizes() -> None:
    d = ParallelDims(world_size=8, tp=2, pp=2, sequence_parallel=True, rank=5)
    assert d.describe() == (
        "parallel layout: world 8 = tp 2 x pp 2 x dp 2, sequence parallel | rank 5 -> tp 1, "
        "pp 1, dp 0"
    )
    assert d.get_tensor_model_parallel_world_size() == 2
    assert d.get_pipeline_model_parallel_world_size() == d.get_pipe_parallel_world_size() == 2
    assert d.get_data_parallel_world_size() == 2 and d.get_data_parallel_rank() == 0
    # DeepSpeed's "sequence parallel" means Ulysses; exposing it would shrink its DP size.
    assert not hasattr(d, "get_sequence_parallel_world_size")
