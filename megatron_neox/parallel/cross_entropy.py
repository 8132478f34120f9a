"""Cross entropy over logits whose vocabulary dim is split across tensor-parallel ranks.

Gathering [B, T, V] logits to every rank would cost V/tp times the memory of the shard (50k-vocab
models spend more memory on logits than on a layer's activations), so each rank works on its slice
and only [B, T] vectors are all-reduced: the max (for a stable softmax), the sum of exponentials,
and the target logit (found on exactly one rank).

Memory (N tokens, V' = V/tp logits per token, e bytes per logit: 2 in bf16/fp16, 4 in fp32): the
exponentials are computed in fp32 (bf16 sums over 50k entries lose the loss's low digits) but only
`_CHUNK_ELEMENTS` logits at a time, never as a whole fp32 copy. Forward and backward each read the
logits once per chunk; between them the function keeps the logits themselves (N V' e bytes, which
the output layer's matmul produced anyway) and two fp32 numbers per token (max, sum of exps); the
backward recomputes each chunk's softmax and writes the gradient straight in the logits' dtype. At
the step's peak that is 2 N V' e bytes (logits + their gradient) plus a chunk, where the former
version held an fp32 softmax (4 N V' bytes) and then its e-byte cast: for Pythia-1B shapes at bf16
(micro 8, seq 2048, V 50304: N V = 824M) 3.3 GB + 1.6 GB of fp32 traffic and memory became
1.6 GB plus ~0.4 GB of chunk temporaries.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_neox.parallel.utils import (
    group_rank,
    group_size,
    vocab_range_from_per_partition_vocab_size,
)

# Logits per fp32 chunk (2^25: 128 MB per fp32 temporary; 667 tokens of a 50k vocabulary): large
# enough that a GPU kernel per chunk is saturated, small against the logits of a real micro-batch.
_CHUNK_ELEMENTS = 2 ** 25


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        tp = group_size(group)
        V = logits.size(-1)
        flat = logits.detach().reshape(-1, V)
        logits_max = flat.amax(dim=-1)
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # At least fp32, chunk by chunk (see the module docstring).
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits_max = logits_max.to(dtype)

        start, end = vocab_range_from_per_partition_vocab_size(V, group_rank(group), tp)
        flat_target = target.reshape(-1)
        not_here = (flat_target < start) | (flat_target >= end)
        local_target = (flat_target - start).masked_fill(not_here, 0)
        target_logit = flat.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).to(dtype) - logits_max
        target_logit = target_logit.masked_fill(not_here, 0.0)

        sum_exp = torch.empty_like(logits_max)
        for a, b in _row_chunks(flat.size(0), V):
            torch.sum((flat[a:b].to(dtype) - logits_max[a:b, None]).exp_(), dim=-1, out=sum_exp[a:b])
        if tp > 1:
            # One call for both [N] reductions.
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]

        loss = torch.log(sum_exp) - target_logit
        ctx.save_for_backward(logits, logits_max, sum_exp, not_here, local_target)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logits_max, sum_exp, not_here, local_target = ctx.saved_tensors
        V = logits.size(-1)
        flat = logits.detach().reshape(-1, V)
        g = grad_loss.reshape(-1, 1)
        hit = (~not_here).to(sum_exp.dtype).unsqueeze(-1)
        index = local_target.unsqueeze(-1)
        grad = torch.empty_like(flat)
        # d loss / d logits = (softmax - onehot(target)) * grad_loss; the one-hot lives on one rank
        # only. The target entries get (softmax - hit) * grad_loss: the same two roundings as
        # subtracting first.
        for a, b in _row_chunks(flat.size(0), V):
            softmax = (flat[a:b].to(sum_exp.dtype) - logits_max[a:b, None]).exp_().div_(sum_exp[a:b, None])
            at_target = (softmax.gather(-1, index[a:b]) - hit[a:b]) * g[a:b]
            softmax.mul_(g[a:b]).scatter_(-1, index[a:b], at_target)
            grad[a:b].copy_(softmax)
        return grad.view(logits.shape), None, None


def vocab_parallel_cross_entropy(logits_parallel: torch.Tensor, target: torch.Tensor,
                                 group=None) -> torch.Tensor:
    """Per-token loss (shape of `target`, at least fp32) from this rank's vocab slice of the logits.

    logits_parallel: [..., V / tp], rank r holding vocabulary ids [r*V/tp, (r+1)*V/tp).
    target: [...] integer ids in [0, V). Equals F.cross_entropy(full_logits, target,
    reduction="none"); there is no ignore_index: mask the loss instead.
    """
    return _VocabParallelCrossEntropy.apply(logits_parallel, target, group)
