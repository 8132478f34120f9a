"""Loss on the validation split during training: when (`eval.interval`, and at the end) and how."""
import math
from typing import List, Optional

from megatron_neox.config import Config
from megatron_neox.topology import Topology
from megatron_neox.training.metrics import MetricsLogger
from megatron_neox.training.step import eval_step


class Validator:
    """`eval.iters` global batches of the valid split, from its start each time (the same samples
    at every evaluation, so the curve compares like with like)."""

    def __init__(self, cfg: Config, engine, topo: Topology, valid_ds, *, micro_batch_size: int,
                 global_batch_size: int, eod_token_id: Optional[int], metrics: MetricsLogger):
        self.cfg, self.engine, self.topo, self.valid_ds = cfg, engine, topo, valid_ds
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.eod_token_id, self.metrics = eod_token_id, metrics
        self.losses: List[float] = []

    def should_validate(self, step: int) -> bool:
        every = self.cfg.eval.interval
        return bool(every) and step % every == 0

    def after_step(self, state, last_step: int, trained: bool = True) -> bool:
        """The trainer's component convention: validate when due after a trained step; never stops the run."""
        if trained and self.should_validate(state.iteration):
            self.validate(state.iteration)
        return False

    def at_end(self, state) -> None:
        """The last evaluation of a run, unless `after_step` has just made it."""
        if not self.should_validate(state.iteration):
            self.validate(state.iteration)

    def validate(self, step: int) -> Optional[float]:
        """Mean loss over the evaluation batches (logged); None when there is no valid split."""
        if self.valid_ds is None:
            return None
        from megatron_neox.data.loader import BatchLoader, loader_options

        loader = BatchLoader(self.valid_ds, micro_batch_size=self.micro_batch_size, dp_rank=self.topo.dp_rank,
                             dp_size=self.topo.dp, **loader_options(self.cfg.data, self.eod_token_id))
        losses = [eval_step(self.engine, loader.next_global_batch(self.global_batch_size), self.topo)
                  for _ in range(self.cfg.eval.iters)]
        loss = sum(losses) / len(losses)
        self.losses.append(loss)
        self.metrics.log({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        return loss
