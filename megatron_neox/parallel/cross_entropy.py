"""Cross entropy over logits whose vocabulary dim is split across tensor-parallel ranks.

Gathering [B, T, V] logits to every rank would cost V/tp times the memory of the shard (50k-vocab
models spend more memory on logits than on a layer's activations), so each rank works on its slice
and only [B, T] vectors are all-reduced: the max (for a stable softmax), the sum of exponentials,
and the target logit (found on exactly one rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_neox.parallel.utils import (
    group_rank,
    group_size,
    vocab_range_from_per_partition_vocab_size,
)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        tp = group_size(group)
        logits_max = logits.detach().amax(dim=-1)
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # At least fp32: bf16 exp-sums over 50k entries lose the loss's low digits.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        # A new tensor: the caller's logits stay untouched for anything else that saved them.
        shifted = logits.to(dtype) - logits_max.to(dtype).unsqueeze(-1)

        start, end = vocab_range_from_per_partition_vocab_size(logits.size(-1), group_rank(group), tp)
        not_here = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(not_here, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(not_here, 0.0)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            # One call for both [B, T] reductions.
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]

        loss = torch.log(sum_exp) - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, not_here, local_target)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, not_here, local_target = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot(target)) * grad_loss; the one-hot lives on one rank
        # only. Written into the saved softmax itself (Megatron does the same): a fresh
        # [B, T, V/tp] fp32 tensor here would be allocated at the step's peak memory. (A second
        # backward through the graph fails on the saved tensor's version counter.) The target
        # entries get (softmax - hit) * grad_loss: the same two roundings as subtracting first.
        index = local_target.unsqueeze(-1)
        g = grad_loss.unsqueeze(-1)
        hit = (~not_here).to(softmax.dtype).unsqueeze(-1)
        at_target = (softmax.gather(-1, index) - hit) * g
        grad = softmax.mul_(g)
        grad.scatter_(-1, index, at_target)
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits_parallel: torch.Tensor, target: torch.Tensor,
                                 group=None) -> torch.Tensor:
    """Per-token loss (shape of `target`, at least fp32) from this rank's vocab slice of the logits.

    logits_parallel: [..., V / tp], rank r holding vocabulary ids [r*V/tp, (r+1)*V/tp).
    target: [...] integer ids in [0, V). Equals F.cross_entropy(full_logits, target,
    reduction="none"); there is no ignore_index: mask the loss instead.
    """
    return _VocabParallelCrossEntropy.apply(logits_parallel, target, group)
