"""Tensor-parallel Linear and Embedding layers (Megatron's column/row split).

A column-parallel linear splits the output features: each rank computes its slice of y = x W^T.
A row-parallel linear splits the input features: each rank computes a partial sum of y, and the
partials are all-reduced. Column followed by row (QKV -> attention -> dense, h -> 4h -> h) needs
no communication in between and one all-reduce at the end.

Initialisation reproduces the unsharded model: every TP rank draws the full master weight from the
same RNG state (so the RNG advances identically everywhere) and keeps its own shard. The master is
drawn on the host from the CPU generator, so a model starts from the same weights on every device
(a GPU run can be compared with a CPU one), one weight at a time: only the shard is kept, on the
device the layer is built for (`with torch.device(...)`, e.g. the rank's GPU). Biases start at zero.

`forward` returns the output tensor, or `(output, bias)` when `skip_bias_add=True` (so the caller
can fuse the bias add into a following op). A bias with nothing between it and the matmul joins the
matmul (addmm), and `RowParallelLinear.forward(x, add_to=...)` sums a tensor (a residual, another
branch's partial sum) inside its matmul: one pass over the output fewer each.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_neox.errors import ConfigError
from megatron_neox.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_neox.parallel.utils import (
    divide,
    group_rank,
    group_size,
    set_tensor_parallel_attributes,
    sum_grads_over_tensor_parallel_group,
    shard_rows,
    vocab_range_from_per_partition_vocab_size,
)

InitMethod = Callable[[torch.Tensor], object]


def default_init_method(weight: torch.Tensor) -> torch.Tensor:
    """normal(0, 0.02): GPT-2 / GPT-3 / NeoX 'normal' init."""
    return nn.init.normal_(weight, mean=0.0, std=0.02)


def _sharded_parameter(full_shape: tuple[int, int], init_method: InitMethod | None,
                       partition_dim: int, stride: int, group, params_dtype: torch.dtype | None
                       ) -> nn.Parameter:
    shard = shard_rows(host_init(full_shape, init_method or default_init_method), group_rank(group),
                       group_size(group), stride, dim=partition_dim)
    param = nn.Parameter(shard.to(device=torch.get_default_device(), dtype=params_dtype or torch.get_default_dtype()))
    set_tensor_parallel_attributes(param, partition_dim, stride)
    return param


def host_init(shape, init_method: InitMethod) -> torch.Tensor:
    """A weight drawn by `init_method` in fp32 on the host (the same values on every device, and a
    bf16/fp16 model starts from the fp32 one rounded). `.float()`: deepspeed.zero.Init turns every
    new float tensor into the training dtype."""
    if torch.get_default_device().type == "meta":  # shapes only (e.g. state_dict_shapes): draw nothing
        return torch.empty(shape, dtype=torch.float32, device="meta")
    master = torch.empty(shape, dtype=torch.float32, device="cpu").float()
    with torch.no_grad():
        init_method(master)
    return master


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [output_size, input_size] split by rows (output features) across TP.

    weight: [output_size / tp, input_size]. `gather_output=True` all-gathers y to the full
    output_size; otherwise y keeps this rank's output slice. `stride` > 1 declares a fused output
    made of `stride` stacked blocks (e.g. [gate | up]): each block is split on its own, so every
    rank holds [gate_r | up_r] (and `gather_output` restores the full [gate | up] order). With `sequence_parallel` the input is this rank's slice of the
    sequence (dim 1) and is all-gathered before the matmul.
    """

    def __init__(self, input_size: int, output_size: int, *, group=None, bias: bool = True,
                 gather_output: bool = False, init_method: InitMethod | None = None,
                 stride: int = 1, skip_bias_add: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        if gather_output and sequence_parallel:
            raise ConfigError("ColumnParallelLinear: gather_output=True cannot be combined with "
                              "sequence_parallel=True (the output would be gathered twice)")
        tp = group_size(group)
        self.group = group
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, tp, "ColumnParallelLinear output_size")
        divide(output_size, tp * stride, f"ColumnParallelLinear output_size with stride {stride}")
        self.gather_output = gather_output
        self.stride = stride
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = sequence_parallel and tp > 1

        self.weight = _sharded_parameter((output_size, input_size), init_method, 0, stride,
                                         group, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype))
            set_tensor_parallel_attributes(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group)
            if self.stride > 1:
                # The gather yields [rank][block][piece]; the full layout is [block][rank][piece].
                tp = group_size(self.group)
                y = y.unflatten(-1, (tp, self.stride, -1)).transpose(-3, -2).flatten(-3)
        if self.skip_bias_add:
            return y, self.bias
        return y

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={group_size(self.group)}, stride={self.stride}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [output_size, input_size] split by columns (input features) across TP.

    weight: [output_size, input_size / tp]; the bias is replicated and added once, after the
    all-reduce. `input_is_parallel=False` takes the full input and keeps this rank's slice of its
    last dim. `reduce_output=False` returns the un-reduced partial sum without the bias, so a GPT-NeoX
    parallel-residual layer can add its attention and MLP partials and all-reduce once (then add
    both biases itself). With `sequence_parallel` the reduce is a reduce-scatter along the sequence
    dim (1) and the bias gradient is summed over the group by a hook
    (`parallel.utils.sum_grads_over_tensor_parallel_group`).
    """

    def __init__(self, input_size: int, output_size: int, *, group=None, bias: bool = True,
                 input_is_parallel: bool = True, init_method: InitMethod | None = None,
                 skip_bias_add: bool = False, reduce_output: bool = True,
                 sequence_parallel: bool = False, params_dtype: torch.dtype | None = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ConfigError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        tp = group_size(group)
        self.group = group
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, tp, "RowParallelLinear input_size")
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.reduce_output = reduce_output
        self.sequence_parallel = sequence_parallel and tp > 1

        self.weight = _sharded_parameter((output_size, input_size), init_method, 1, 1,
                                         group, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype))
            if self.sequence_parallel:  # added after the reduce-scatter: partial gradients
                sum_grads_over_tensor_parallel_group([self.bias], group)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, add_to: torch.Tensor | None = None):
        """`add_to` (shaped like the output) is summed inside the matmul (addmm), saving one pass
        over the output: with `reduce_output=True` it is added on every rank before the reduce, so
        it must be a partial sum, or anything at tp = 1."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        # The bias joins the matmul when no reduce comes between them (tp = 1).
        fold_bias = self.reduce_output and not self.skip_bias_add and group_size(self.group) == 1
        if add_to is not None:
            y = torch.addmm(add_to.reshape(-1, self.output_size), x.reshape(-1, x.size(-1)), self.weight.t())
            y = y.view(add_to.shape)
            if fold_bias and self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self.weight, self.bias if fold_bias else None)
        if not self.reduce_output:
            return (y, self.bias) if self.skip_bias_add else y
        if fold_bias:
            return y
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        if self.skip_bias_add:
            return y, self.bias
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp={group_size(self.group)}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, reduce_output={self.reduce_output}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split across TP.

    weight: [num_embeddings / tp, embedding_dim]. Each rank looks up the ids in its range, zeroes
    the rest, and an all-reduce assembles the full [B, T, embedding_dim] on every rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group=None,
                 init_method: InitMethod | None = None, params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = group_size(group)
        self.group = group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = divide(
            num_embeddings, tp, "vocabulary size (pad it to a multiple of 128 * tp)")
        self.vocab_start_index, self.vocab_end_index = vocab_range_from_per_partition_vocab_size(
            self.num_embeddings_per_partition, group_rank(group), tp)
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), init_method, 0, 1,
                                         group, params_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
        # Zeroing the rows also zeroes their grad, so row 0 is not credited for foreign ids.
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tp={group_size(self.group)}")
