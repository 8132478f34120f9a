"""Small helpers shared by the tensor-parallel modules.

A `group` argument is a torch.distributed ProcessGroup; `None` means "no tensor parallelism"
(tp = 1), never "the whole world": code here must not fall through to torch's default group.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_neox.errors import ConfigError


def divide(numerator: int, denominator: int, what: str | None = None) -> int:
    """`numerator // denominator`, refusing to round: a silent floor would mis-shape a shard."""
    if denominator <= 0 or numerator % denominator != 0:
        subject = f"{what} ({numerator})" if what else str(numerator)
        raise ConfigError(f"{subject} is not divisible by {denominator}; "
                          f"choose sizes that split evenly across the {denominator} partitions")
    return numerator // denominator


def group_size(group) -> int:
    """Number of ranks in `group`; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous: bool = False) -> tuple[torch.Tensor, ...]:
    """Split the last dimension into `num_partitions` equal views (copies if `contiguous`)."""
    chunk = divide(tensor.size(-1), num_partitions, "last dimension")
    parts = torch.split(tensor, chunk, dim=-1)
    if contiguous:
        return tuple(p.contiguous() for p in parts)
    return parts


def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int,
                                              world_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows held by `rank` (world_size kept for symmetry)."""
    del world_size
    start = rank * per_partition_vocab_size
    return start, start + per_partition_vocab_size


def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int,
                                       world_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows held by `rank` when `global_vocab_size` is split evenly."""
    per_partition = divide(global_vocab_size, world_size, "vocabulary size")
    return vocab_range_from_per_partition_vocab_size(per_partition, rank, world_size)


def set_tensor_parallel_attributes(param: torch.nn.Parameter, partition_dim: int,
                                   stride: int = 1) -> None:
    """Mark `param` as a tensor-parallel shard.

    DeepSpeed's gradient-norm and overflow code (deepspeed.runtime.utils) counts a parameter
    with a true `model_parallel` on every TP rank and any other parameter on TP rank 0 only (our
    own clipper, training/clipping.py, counts the same way); `tensor_model_parallel`,
    `partition_dim` and `partition_stride` are Megatron's names. Conversion and resharding read
    the sharding table (parallel/sharding.py), not these marks; tests/test_sharding.py checks that
    every parameter's marks agree with the table.
    """
    param.model_parallel = True
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def sum_grads_over_tensor_parallel_group(params: Iterable[torch.nn.Parameter], group) -> None:
    """Make the gradients of these replicated parameters sums over the TP group.

    Under sequence parallelism each TP rank sees only its slice of the sequence, so a replicated
    parameter applied to the sharded activations (norm weights, row-parallel biases) gets only a
    partial gradient, which DeepSpeed does not reduce. A hook on each parameter all-reduces its
    gradient as autograd produces it, so no step outside the engine has to remember to. The
    parameters are flagged `sequence_parallel`.
    """
    if group_size(group) == 1:
        return

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.sequence_parallel = True
        p.register_hook(all_reduce)


def shard_rows(full: torch.Tensor, rank: int, world_size: int, stride: int = 1,
               dim: int = 0) -> torch.Tensor:
    """This rank's shard of `full` along `dim`, for a layout made of `stride` stacked blocks.

    With stride > 1 (fused layouts such as [gate | up]) each block is split on its own and the
    rank keeps its piece of every block, so the shard has the same block structure as `full`.
    """
    divide(full.size(dim), stride * world_size, f"dimension {dim} of the full weight")
    blocks: Sequence[torch.Tensor] = torch.chunk(full, stride, dim=dim)
    pieces = [torch.chunk(block, world_size, dim=dim)[rank] for block in blocks]
    return torch.cat(pieces, dim=dim).contiguous()


def merge_shards(parts: Sequence[torch.Tensor], stride: int = 1, dim: int = 0) -> torch.Tensor:
    """Inverse of `shard_rows`: the full tensor from every rank's shard, in rank order."""
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([pr[s] for pr in per_rank], dim=dim) for s in range(stride)], dim=dim)
