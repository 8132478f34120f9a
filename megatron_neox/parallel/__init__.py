"""Megatron-style tensor parallelism: communication mappings, sharded layers, vocab-parallel
cross entropy and model-parallel RNG. `group=None` (or a size-1 group) means tp = 1."""
from megatron_neox.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_neox.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    default_init_method,
)
from megatron_neox.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_neox.parallel.random import get_rng_tracker, model_parallel_seed, tensor_parallel_rng
from megatron_neox.parallel.utils import (
    divide,
    split_tensor_along_last_dim,
    sum_grads_over_tensor_parallel_group,
    vocab_range_from_global_vocab_size,
    vocab_range_from_per_partition_vocab_size,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_parallel_region",
    "default_init_method",
    "divide",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "get_rng_tracker",
    "model_parallel_seed",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "split_tensor_along_last_dim",
    "sum_grads_over_tensor_parallel_group",
    "tensor_parallel_rng",
    "vocab_parallel_cross_entropy",
    "vocab_range_from_global_vocab_size",
    "vocab_range_from_per_partition_vocab_size",
]
