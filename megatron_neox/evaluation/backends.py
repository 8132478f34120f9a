"""What the lm-eval adapter needs from a model: target log-probs, greedy ids, and generation.

Two backends behind one interface:

- `MergedModel`: the whole model (`generate.load_model`, any checkpoint layout merged) on one
  device. tools/evaluate.py uses it: one process, no launcher, and generation runs with the KV
  cache. It needs the whole model in one device's memory (NeoX-20B: 41 GB in bf16).
- `EngineModel`: the training engine itself, sharded as it trains (pp, tp, dp, ZeRO). Every rank
  runs the same requests; the logits stay vocab-parallel (only [B, T] vectors are all-reduced
  across the tensor-parallel group) and the last pipeline stage broadcasts its [B, T] results to
  its pipeline. No rank ever holds more of the model than it trains with. Generation recomputes
  the whole sequence for every new token (DeepSpeed's pipeline schedule carries no KV cache), so
  in-training generation tasks cost O(length^2) forward tokens: keep their `max_gen_toks` small.

Log-probabilities are normalised over the whole padded vocabulary, as the training loss and the
Hugging Face export (whose `vocab_size` is the padded one) do. Greedy choices skip the padding
ids (>= the tokenizer's size), as generation does (tools/convert_to_hf.py writes them into the
export's `suppress_tokens`).
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_neox.errors import ConfigError
from megatron_neox.generate import _context_limit, choose_next, mask_padded_vocab
from megatron_neox.parallel.utils import group_rank, group_size, vocab_range_from_per_partition_vocab_size

# (row, tokens generated so far) -> stop this row?
StopFn = Callable[[int, List[int]], bool]


@torch.no_grad()
def target_logprobs_and_argmax(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                               tp_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [B, T] fp32, greedy id [B, T]) from this rank's vocab slice of the logits.

    With tp > 1 each rank holds V/tp columns; the softmax normaliser, the target's logit and the
    argmax are combined across the group from [B, T] vectors, never the full [B, T, V].
    """
    tp = group_size(tp_group)
    start, end = vocab_range_from_per_partition_vocab_size(logits.size(-1), group_rank(tp_group), tp)
    logits = logits.float()
    local_max = logits.amax(dim=-1)
    global_max = local_max.clone()
    if tp > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = (logits - global_max.unsqueeze(-1)).exp().sum(dim=-1)
    here = (targets >= start) & (targets < end)
    target_logit = logits.gather(-1, (targets - start).clamp(0, end - start - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = target_logit.masked_fill(~here, 0.0)
    # Greedy over real tokens only: this slice's padding columns (ids >= vocab_size) are masked.
    best_val, best_idx = mask_padded_vocab(logits, max(0, min(vocab_size - start, end - start))).max(dim=-1)
    best_idx = best_idx + start
    if tp > 1:
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=tp_group)
        target_logit, sum_exp = both[0], both[1]
        # argmax across slices: the highest value wins; ties go to the lowest id (as torch.argmax).
        vals = [torch.empty_like(best_val) for _ in range(tp)]
        idxs = [torch.empty_like(best_idx) for _ in range(tp)]
        dist.all_gather(vals, best_val.contiguous(), group=tp_group)
        dist.all_gather(idxs, best_idx.contiguous(), group=tp_group)
        vals_t, idxs_t = torch.stack(vals), torch.stack(idxs)  # slices are in id order
        best_idx = idxs_t.gather(0, vals_t.argmax(dim=0, keepdim=True)).squeeze(0)
    logprob = target_logit - global_max - sum_exp.log()
    return logprob, best_idx


def _append(out: List[List[int]], done: List[bool], next_ids: torch.Tensor, stop: StopFn) -> bool:
    """Add each unfinished row's next id; True once every row has stopped."""
    for row, token in enumerate(next_ids.tolist()):
        if not done[row]:
            out[row].append(token)
            done[row] = stop(row, out[row])
    return all(done)


class MergedModel:
    """The whole model on one device (pp = tp = 1)."""

    def __init__(self, model, vocab_size: int, device="cpu"):
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._generator: Optional[torch.Generator] = None  # for sampled generation, on the model's device

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        limit = _context_limit(self.model.cfg)
        if limit is not None and tokens.shape[1] > limit:
            raise ConfigError(f"a sequence of {tokens.shape[1]} tokens is longer than this model's learned "
                              f"position embeddings ({limit})")
        logits = self.model(tokens.to(self.device))
        logprob, best = target_logprobs_and_argmax(logits, targets.to(self.device), self.vocab_size)
        return logprob.cpu(), best.cpu()

    @torch.no_grad()
    def generate(self, contexts: torch.Tensor, max_new_tokens: int, stop: StopFn, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 1234) -> List[List[int]]:
        """New ids for each row of `contexts` [B, T] (equal lengths, no padding), through the KV cache.
        Sampling (temperature > 0) draws from one generator seeded with `seed` at the first call."""
        generator = None
        if temperature > 0:
            if self._generator is None:
                self._generator = torch.Generator(device=self.device).manual_seed(seed)
            generator = self._generator
        out: List[List[int]] = [[] for _ in range(contexts.shape[0])]
        done = [False] * len(out)
        tokens, cache = contexts.to(self.device), None
        for _ in range(max_new_tokens):
            logits, cache = self.model(tokens, kv_cache=cache, use_cache=True)
            nxt = choose_next(mask_padded_vocab(logits[:, -1].float(), self.vocab_size), temperature=temperature,
                              top_k=top_k, top_p=top_p, generator=generator)
            if _append(out, done, nxt, stop):
                break
            tokens = nxt.view(-1, 1).to(self.device)
        return out


class EngineModel:
    """The DeepSpeed training engine, sharded as it trains (see the module docstring)."""

    def __init__(self, engine, topo, vocab_size: int, sequence_parallel: bool = False):
        self.engine, self.topo, self.vocab_size = engine, topo, vocab_size
        # Sequence parallelism splits the sequence over the TP group: lengths must divide by tp.
        self.multiple = topo.tp if sequence_parallel else 1

    def _logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's vocab slice of the logits, or None on a pipeline stage that has none."""
        position_ids = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        if self.topo.pp == 1:
            self.engine.eval()
            try:
                return self.engine(tokens.to(self.engine.device), position_ids.to(self.engine.device))
            finally:
                self.engine.train()
        # A new shape for every call: DeepSpeed caches the tensor shapes it sends between stages.
        self.engine.reset_activation_shape()
        # Without a loss the engine adds the logits to its running loss total (train_batch resets it).
        self.engine.total_loss = None
        batch = iter([((tokens, position_ids), torch.zeros_like(tokens))])
        try:
            _, logits = self.engine.eval_batch(batch, return_logits=True, compute_loss=False, reduce_output=None,
                                               bcast_loss=False, num_micro_batches=1)
        finally:
            self.engine.reset_activation_shape()  # the next training step sends its own shapes again
            self.engine.total_loss = None
        return logits if self.topo.is_last_stage else None

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T = tokens.shape
        width = -(-T // self.multiple) * self.multiple
        if width != T:  # right padding cannot change the earlier positions under the causal mask
            tokens = torch.nn.functional.pad(tokens, (0, width - T))
            targets = torch.nn.functional.pad(targets, (0, width - T))
        logits = self._logits(tokens)
        device = self.engine.device
        result = torch.empty(2, B, width, dtype=torch.float64, device=device)
        if logits is not None:
            logprob, best = target_logprobs_and_argmax(logits, targets.to(logits.device), self.vocab_size,
                                                       self.topo.tp_group)
            # float64 carries both exactly (ids < 2^53).
            result[0], result[1] = logprob.double(), best.double()
        if self.topo.pp > 1:
            dist.broadcast(result, src=self.topo.pp_ranks[-1], group=self.topo.pp_group)
        result = result[:, :, :T].cpu()
        return result[0].float(), result[1].long()

    @torch.no_grad()
    def generate(self, contexts: torch.Tensor, max_new_tokens: int, stop: StopFn, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 1234) -> List[List[int]]:
        """Greedy only: every rank must choose the same token, and greedy needs no full distribution."""
        if temperature > 0:
            raise ConfigError("in-training harness evaluation generates greedily only; the task asks for "
                              f"sampling (temperature={temperature}): evaluate it with tools/evaluate.py")
        out: List[List[int]] = [[] for _ in range(contexts.shape[0])]
        done = [False] * len(out)
        tokens = contexts
        for _ in range(max_new_tokens):
            _, best = self.score(tokens, torch.zeros_like(tokens))
            nxt = best[:, -1]
            if _append(out, done, nxt, stop):
                break
            tokens = torch.cat([tokens, nxt.view(-1, 1)], dim=1)
        return out
