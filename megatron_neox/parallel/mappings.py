"""Tensor-parallel communication as autograd functions.

Each function is named by what it does to the activation on the way forward; its backward is the
dual (the transpose of the forward as a linear map), which is what makes gradients come out right:
copy <-> all-reduce, split <-> all-gather, reduce-scatter <-> all-gather.

Activations are batch-first [B, T, C]: "last dim" is the hidden/vocab dim, and the sequence dim
used by Megatron sequence parallelism is dim 1. With `group=None` or a size-1 group every function
returns its input unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_neox.parallel.utils import divide, group_rank, group_size

SEQUENCE_DIM = 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Reduce a copy: the input may be saved for backward elsewhere, or be a grad autograd shares.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    size = divide(x.size(dim), n, f"tensor dimension {dim}")
    return x.narrow(dim, group_rank(group) * size, size).contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    # One collective into one buffer [n * d0, ...] (rank r's piece at row block r): a list
    # all_gather costs NCCL an extra flatten-and-copy-out. Moving the rank axis next to `dim` then
    # copies once, and not at all when every dim before `dim` has size 1 (e.g. batch 1).
    n = group_size(group)
    dim = dim % x.dim()
    x = x.contiguous()
    out = torch.empty((n * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    out = out.unflatten(0, (n, x.size(0))).movedim(0, dim)
    return out.reshape(*x.shape[:dim], n * x.size(dim), *x.shape[dim + 1:])


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    # The input laid out as [n, ...] (rank r's piece first-dim block r; a free view when the dims
    # before `dim` have size 1), flattened to [n * d0, ...], the shape gloo and NCCL both take.
    n = group_size(group)
    dim = dim % x.dim()
    size = divide(x.size(dim), n, f"tensor dimension {dim}")
    pieces = x.unflatten(dim, (n, size)).movedim(dim, 0).contiguous()
    out = torch.empty(pieces.shape[1:], dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, pieces.flatten(0, 1), group=group)
    return out


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's grad w.r.t. the replicated input only covers its own shard of the output.
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1, ctx.group), None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # The gathered tensor fed a column-parallel layer: each rank's grad is a partial sum.
            return _reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None, None
        return _split(grad, SEQUENCE_DIM, ctx.group), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


@torch.compiler.disable
def _apply(function, *args):
    """`function.apply(*args)` outside any compiled graph (model.compile): the collectives run
    eagerly between the compiled pieces of a layer. Only reached when the group has > 1 rank."""
    return function.apply(*args)


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: enters a region whose ranks each use the full input."""
    return x if group_size(group) == 1 else _apply(_CopyToTensorParallel, x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: sums the ranks' partial results."""
    return x if group_size(group) == 1 else _apply(_ReduceFromTensorParallel, x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dim; backward all-gathers it."""
    return x if group_size(group) == 1 else _apply(_ScatterToTensorParallel, x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim; backward keeps this rank's slice."""
    return x if group_size(group) == 1 else _apply(_GatherFromTensorParallel, x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence dim (1); backward all-gathers it."""
    return x if group_size(group) == 1 else _apply(_ScatterToSequenceParallel, x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather along the sequence dim (1).

    Backward reduce-scatters when the full sequence went into a tensor-parallel op (the usual case:
    each rank holds a partial grad); pass `tensor_parallel_output_grad=False` when every rank
    computed the same thing from it, and backward then just keeps this rank's slice.
    """
    if group_size(group) == 1:
        return x
    return _apply(_GatherFromSequenceParallel, x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the ranks' partials and keep this rank's slice of the sequence dim (1); backward all-gathers."""
    return x if group_size(group) == 1 else _apply(_ReduceScatterToSequenceParallel, x, group)
