"""The (pipe, data, model) grid, its process groups, the mpu API and layout validation."""
import re

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.utils import bwc

from _dist import run_distributed
from megatron_neox.errors import ConfigError
from megatron_neox.layout import validate_layout
from megatron_neox.topology import Topology


def test_rank_coordinates_match_deepspeed_pp2_tp2_dp2():
    ds = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    # Written out by hand: model varies fastest, then data, then pipe.
    expected = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 0), 3: (0, 1, 1),
                4: (1, 0, 0), 5: (1, 0, 1), 6: (1, 1, 0), 7: (1, 1, 1)}
    for rank, (pp_rank, dp_rank, tp_rank) in expected.items():
        t = Topology(pp=2, tp=2, world_size=8, rank=rank, create_groups=False)
        assert (t.pp_rank, t.dp_rank, t.tp_rank) == (pp_rank, dp_rank, tp_rank)
        assert tuple(ds.get_coord(rank)) == (pp_rank, dp_rank, tp_rank)
        assert t.dp == 2 and t.is_first_stage == (pp_rank == 0) and t.is_last_stage == (pp_rank == 1)
    t = Topology(pp=2, tp=2, world_size=8, rank=5, create_groups=False)
    assert t.tp_ranks == [4, 5]       # TP neighbours are adjacent ranks
    assert t.dp_ranks == [5, 7]
    assert t.pp_ranks == [1, 5]
    assert t.get_tensor_model_parallel_src_rank() == 4
    assert t.get_data_parallel_group_ranks() == [5, 7]
    assert t.topo.get_rank_repr(5) == "model_01"  # the name in DeepSpeed's checkpoint files


def test_mpu_api_reads_as_deepspeed_expects():
    t = Topology(pp=2, tp=4, world_size=16, rank=14, create_groups=False)  # pp 1, dp 1, tp 2
    assert (t.get_model_parallel_rank(), t.get_model_parallel_world_size()) == (2, 4)
    assert (t.get_data_parallel_rank(), t.get_data_parallel_world_size()) == (1, 2)
    assert (t.get_pipe_parallel_rank(), t.get_pipeline_model_parallel_world_size()) == (1, 2)
    # DeepSpeed's backward-compatibility readers (used by ZeRO, grad norms, checkpointing).
    assert bwc.bwc_tensor_model_parallel_rank(t) == 2
    assert bwc.bwc_tensor_model_parallel_world_size(t) == 4
    assert bwc.bwc_pipeline_parallel_world_size(t) == 2
    # Its presence would make DeepSpeed treat us as a Ulysses mpu and ignore the TP group.
    assert not hasattr(t, "initialize_sequence_parallel")
    assert t.get_sequence_parallel_world_size() == 1
    assert t.get_sequence_data_parallel_world_size() == 2


def test_single_needs_no_distributed():
    t = Topology.single()
    assert (t.pp, t.tp, t.dp, t.rank, t.world_size) == (1, 1, 1, 0, 1)
    assert t.tp_group is None and t.dp_group is None and t.pp_group is None
    assert t.is_first_stage and t.is_last_stage


def test_topology_refuses_indivisible_world():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by pp \* tp = 2 \* 2 = 4"):
        Topology(pp=2, tp=2, world_size=6, rank=0, create_groups=False)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        Topology(pp=1, tp=2, world_size=2, rank=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=12, pp=2, tp=4), r"world size 12 is not divisible by pp \* tp = 2 \* 4 = 8"),
    (dict(world_size=8, pp=1, tp=8, num_heads=12), r"num_attention_heads=12 is not divisible by parallel.tp=8"),
    (dict(world_size=8, pp=8, tp=1, num_layers=4), r"pp=8 .*num_layers=4 transformer layers"),
    (dict(world_size=4, pp=1, tp=2, padded_vocab=50277),
     r"vocab 50277 is not divisible by parallel.tp=2.*128 \* 2 = 256"),
    (dict(world_size=4, pp=1, tp=0), r"tp must be a positive integer, got 0"),
])
def test_validate_layout_errors_name_the_numbers(kwargs, message):
    args = {"num_layers": 24, "num_heads": 16, **kwargs}
    with pytest.raises(ConfigError, match=message):
        validate_layout(args.pop("world_size"), args.pop("pp"), args.pop("tp"), **args)


def test_validate_layout_returns_dp():
    assert validate_layout(96, 4, 2, num_layers=44, num_heads=64, padded_vocab=50432) == 12
    assert validate_layout(4, 1, 1, num_layers=2, num_heads=4) == 4


@pytest.mark.parametrize("stage, pp, message", [
    (2, 2, r"zero.stage=2 .*pp=2.*stages 0 and 1"),
    (4, 1, r"zero.stage must be 0, 1, 2 or 3, got 4"),
])
def test_zero_stage_that_cannot_run_is_named(stage, pp, message):
    from megatron_neox.precision import zero_problems

    (problem,) = zero_problems(stage, pp)
    assert re.search(message, problem), problem
    assert zero_problems(3, 1) == zero_problems(1, 2) == zero_problems("auto", 4) == []


def _groups_check(rank, world_size):
    out = {}
    for pp, tp in ((2, 2), (1, 2), (1, 1)):
        t = Topology(pp=pp, tp=tp)
        got = {}
        for name, group, members in (("tp", t.tp_group, t.tp_ranks),
                                     ("dp", t.dp_group, t.dp_ranks),
                                     ("pp", t.pp_group, t.pp_ranks)):
            assert group is not None, f"{name} group missing (None would mean the world group)"
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=group)
            assert x.item() == sum(members), f"{name} all-reduce went outside {members}"
            assert dist.get_world_size(group) == len(members)
            got[name] = members
        assert t.get_model_parallel_group() is t.tp_group
        assert t.get_data_parallel_group() is t.dp_group
        assert t.get_pipe_parallel_group() is t.pp_group
        out[(pp, tp)] = got
    return out


def test_process_groups_in_four_ranks():
    results = run_distributed(_groups_check, 4)
    # pp=2, tp=2 (dp=1): rank 3 is stage 1, tp rank 1.
    assert results[3][(2, 2)] == {"tp": [2, 3], "dp": [3], "pp": [1, 3]}
    # pp=1, tp=2 (dp=2): rank 1 is dp rank 0, tp rank 1.
    assert results[1][(1, 2)] == {"tp": [0, 1], "dp": [1, 3], "pp": [1]}
    assert results[2][(1, 1)] == {"tp": [2], "dp": [0, 1, 2, 3], "pp": [2]}
