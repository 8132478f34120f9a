"""Learning-rate schedule and GPT-3 batch-size ramp-up, applied through one `Schedule` object.

Both are pure functions of (iteration, consumed tokens), which the checkpoint stores, so a resumed
run continues exactly and nothing here needs its own saved state. `Schedule.plan(state)` is what
the next step runs at (a `StepPlan`: learning rate and global batch size); the step applies it to
the engine (`StepPlan.apply`, called by training/step.py `train_step`), so nothing else writes the
optimizer's learning rate or DeepSpeed's batch size.

- Warm-up: linear from 0 to the peak over `warmup_iters` (default: warmup_fraction x decay steps).
- Decay to `min_lr` (default 10% of the peak, GPT-3 section B) over `decay_iters` steps or
  `decay_tokens` tokens: cosine, linear, or constant; flat at min_lr afterwards.
- Ramp-up (GPT-3 section B: "linearly from a small value (32k tokens) to the full value over the
  first 4-12 billion tokens"): the global batch grows in `increment_tokens` steps, always a whole
  number of micro x dp batches.
"""
import math
from dataclasses import dataclass
from typing import Optional

from megatron_neox.config import Config, ConfigError
from megatron_neox.layout import Layout


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    min_lr: float
    warmup_iters: int
    warmup_tokens: Optional[int]
    decay_iters: Optional[int]
    decay_tokens: Optional[int]
    style: str

    @classmethod
    def from_config(cls, cfg: Config, total_iters: Optional[int]) -> "LRSchedule":
        s = cfg.lr_schedule
        peak = cfg.optimizer.lr
        min_lr = s.min_lr if s.min_lr is not None else s.min_lr_ratio * peak
        decay_iters = s.decay_iters or total_iters
        if s.decay_tokens is None and decay_iters is None:
            raise ConfigError("set lr_schedule.decay_iters or lr_schedule.decay_tokens (train.iters is not set)")
        if s.warmup_tokens is not None:
            warmup = 0  # the warm-up is measured in tokens (it wins over warmup_iters)
        elif s.warmup_iters is not None:
            warmup = s.warmup_iters
        elif decay_iters is not None:
            warmup = int(round(s.warmup_fraction * decay_iters))
        else:
            raise ConfigError("set lr_schedule.warmup_iters when the decay is measured in tokens")
        return cls(peak, min_lr, warmup, s.warmup_tokens, decay_iters, s.decay_tokens, s.decay_style)

    def lr(self, iteration: int, tokens: int) -> float:
        """Learning rate for the step that starts after `iteration` steps and `tokens` tokens."""
        if self.warmup_tokens is not None and tokens < self.warmup_tokens:
            return self.peak * max(tokens, 1) / self.warmup_tokens
        if self.warmup_iters and iteration < self.warmup_iters:
            return self.peak * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.peak
        if self.decay_tokens is not None:
            start = self.warmup_tokens or 0
            progress = (tokens - start) / max(1, self.decay_tokens - start)
        else:
            span = max(1, self.decay_iters - self.warmup_iters)
            progress = (iteration - self.warmup_iters) / span
        progress = min(max(progress, 0.0), 1.0)
        if self.style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak - self.min_lr) * factor


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch size (in sequences) as a function of consumed tokens."""

    full: int
    unit: int  # micro x dp: the smallest step a global batch can take
    start: int
    increment: int
    ramp_tokens: int

    @classmethod
    def from_config(cls, cfg: Config, layout: Layout) -> "BatchSchedule":
        unit = layout.micro_batch_size * layout.dp
        full = layout.global_batch_size
        r = cfg.train.batch_rampup
        if r is None:
            return cls(full, unit, full, 0, 0)
        seq = cfg.model.seq_length

        def to_batch(tokens: int) -> int:
            return max(unit, (tokens // seq) // unit * unit)

        start, inc = min(to_batch(r.start_tokens), full), to_batch(r.increment_tokens)
        return cls(full, unit, start, inc, r.ramp_tokens)

    def global_batch(self, tokens: int) -> int:
        if self.ramp_tokens == 0 or tokens >= self.ramp_tokens or self.start >= self.full:
            return self.full
        steps = (self.full - self.start) // self.increment if self.increment else 0
        if steps == 0:
            return self.full
        # Linear in tokens: the k-th increment arrives after k/steps of the ramp.
        k = int(tokens * steps // self.ramp_tokens)
        return min(self.full, self.start + k * self.increment)


def total_iterations(cfg: Config, batches: BatchSchedule) -> Optional[int]:
    """Steps the run will take: train.iters, or enough steps to consume train.train_tokens."""
    if cfg.train.iters is not None:
        return cfg.train.iters
    tokens, steps, seq = 0, 0, cfg.model.seq_length
    budget = cfg.train.train_tokens
    while tokens < budget:
        if tokens >= batches.ramp_tokens:  # constant from here: finish arithmetically
            per = batches.full * seq
            return steps + math.ceil((budget - tokens) / per)
        tokens += batches.global_batch(tokens) * seq
        steps += 1
    return steps


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step runs at."""

    lr: float
    global_batch_size: int

    def apply(self, engine) -> None:
        """Set the learning rate of every parameter group and, when the batch ramp-up changed it,
        DeepSpeed's batch size (its gradient-accumulation boundary: global batch / (micro x dp))."""
        for group in engine.optimizer.param_groups:
            group["lr"] = self.lr
        if engine.train_batch_size() != self.global_batch_size:
            engine.set_train_batch_size(self.global_batch_size)


@dataclass(frozen=True)
class Schedule:
    """The run's learning-rate schedule, batch ramp-up and length, from a resolved config."""

    lr: LRSchedule
    batches: BatchSchedule
    iters: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        batches = BatchSchedule.from_config(cfg, cfg.resolved.layout)
        iters = total_iterations(cfg, batches)
        return cls(LRSchedule.from_config(cfg, iters), batches, iters)

    def plan(self, iteration: int, tokens: int) -> StepPlan:
        """The step that starts after `iteration` steps and `tokens` consumed tokens."""
        return StepPlan(self.lr.lr(iteration, tokens), self.batches.global_batch(tokens))
