"""The training loop: build -> resume -> for each step: batch, lr, train_step, log, validate, save.

The loop only orders the steps; each component decides its own "when": the metrics logger
(`should_log`, the throughput window and ETA), the validator (`should_validate`), the
checkpointer (`after_step`: save interval, exit interval, preemption signals) and the spike
policy (`train.on_spike`: a rollback to the last complete checkpoint, training/spikes.py).

Everything a resumed run needs to continue exactly is in the checkpoint's client state
(iteration, consumed samples and tokens, the data position) plus DeepSpeed's engine and
optimizer state and every rank's RNG states; the LR and batch size are functions of those.
"""
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_neox.config import Config
from megatron_neox.errors import ConfigError, MegatronNeoxError
from megatron_neox.evaluation.harness import TrainingHarness
from megatron_neox.layout import Layout
from megatron_neox.outputs import check_run_dirs
from megatron_neox.topology import Topology
from megatron_neox.training.checkpointer import Checkpointer, StopSignal, TrainState
from megatron_neox.training.engine import build_engine
from megatron_neox.training.launch import setup
from megatron_neox.training.metrics import MetricsLogger, log_info, resolve_peak_tflops
from megatron_neox.training.schedules import BatchSchedule, LRSchedule, total_iterations
from megatron_neox.training.spikes import SpikePolicy
from megatron_neox.training.step import StepResult, train_step
from megatron_neox.training.validation import Validator


class TrainingAborted(MegatronNeoxError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive skipped or non-finite steps)."""


@dataclass
class RunResult:
    """What a call to `train` did (used by tests and tools)."""

    state: TrainState
    losses: List[float] = field(default_factory=list)
    eval_losses: List[float] = field(default_factory=list)
    stopped_by_signal: bool = False


class SkipGuard:
    """Counts skipped (overflow) and non-finite steps; aborts after `train.max_skipped_steps` in a row."""

    def __init__(self, limit: int):
        self.limit, self.consecutive = limit, 0

    def check(self, r: StepResult, state: TrainState) -> bool:
        """True when the step counts (its loss goes into the logged mean)."""
        if not (r.skipped or not math.isfinite(r.loss)):
            self.consecutive = 0
            return True
        state.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise TrainingAborted(
                f"step {state.iteration}: {self.consecutive} consecutive skipped or non-finite steps "
                f"(loss {r.loss}, loss scale {r.loss_scale}); lower optimizer.lr, check the data, or "
                "resume from an earlier checkpoint. Limit: train.max_skipped_steps"
            )
        return False


def _dataset_sizes(cfg: Config, iters: int, batches: BatchSchedule) -> tuple:
    train = iters * batches.full
    evals = (iters // cfg.eval.interval + 1) if cfg.eval.interval else 1
    valid = evals * cfg.eval.iters * batches.full
    test = cfg.eval.iters * batches.full
    return train, valid, test


def _check_tokenizer(cfg: Config):
    """The tokenizer (when configured) must fit the model's vocab; returns it or None."""
    if not cfg.tokenizer.path:
        return None
    from megatron_neox.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer.path, verify=False)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer.path} has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "set model.vocab_size to at least the tokenizer's size"
        )
    return tok


class _Run:
    """Everything one training run is built from, in the order it is built: the layout and data
    first (their errors come before the model is built), then the engine, then the resume."""

    def __init__(self, cfg: Config, stop: StopSignal):
        from megatron_neox.data.loader import BatchLoader, build_datasets, loader_options, size_warnings
        from megatron_neox.plan import resolve_checkpoint_interval

        self.layout, self.topo = setup(cfg)
        # activation_checkpointing.interval 'auto' -> a number from the memory estimate on this device
        cfg, self.recompute = resolve_checkpoint_interval(cfg, self.layout)
        self.cfg = cfg
        tok = _check_tokenizer(cfg)
        eod = tok.eod_id if tok is not None else None
        batch_options = loader_options(cfg.data, eod)  # refuses EOD flags without a tokenizer
        self.batches = BatchSchedule.from_config(cfg, self.layout)
        self.iters = total_iterations(cfg, self.batches)
        self.schedule = LRSchedule.from_config(cfg, self.iters)
        sizes = _dataset_sizes(cfg, self.iters, self.batches)
        train_ds, valid_ds, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                                               num_samples=sizes,
                                               vocab_size=cfg.model.vocab_size if cfg.data.check_token_ids else None)
        if train_ds is None:
            raise ConfigError(f"data.split={cfg.data.split!r} leaves no documents for training")
        if self.topo.rank == 0:
            for w in size_warnings(cfg.data, train_ds, valid_ds, seq_length=cfg.model.seq_length,
                                   train_tokens=sizes[0] * cfg.model.seq_length, eval_iters=cfg.eval.iters):
                log_info(f"warning: {w}")

        self.engine, _, self.clipper = build_engine(cfg, self.topo, self.layout)
        self.checkpointer = Checkpointer(cfg, self.engine, self.topo, stop)
        self.state = self.checkpointer.resume()
        self.spikes = SpikePolicy(cfg)
        self.loader = BatchLoader(train_ds, micro_batch_size=self.layout.micro_batch_size, dp_rank=self.topo.dp_rank,
                                  dp_size=self.topo.dp, consumed_samples=self.state.consumed_samples,
                                  **batch_options, consumed_batches=self.state.consumed_batches,
                                  skip_ranges=self.spikes.skip_ranges(self.state))
        rank0 = self.topo.rank == 0
        self.metrics = MetricsLogger(cfg, self.topo.world_size, enabled=rank0,
                                     peak_tflops=resolve_peak_tflops(cfg) if rank0 else 0.0, rank=self.topo.rank)
        self.validator = Validator(cfg, self.engine, self.topo, valid_ds, micro_batch_size=self.layout.micro_batch_size,
                                   global_batch_size=self.batches.full, eod_token_id=eod, metrics=self.metrics)
        # eval.tasks: lm-evaluation-harness on the sharded engine
        self.harness = TrainingHarness(cfg, self.engine, self.topo, tok, metrics=self.metrics)
        self.guard = SkipGuard(cfg.train.max_skipped_steps)
        if rank0:
            log_info(_start_line(cfg, self.topo, self.layout, self.iters, self.state, self.recompute))

    def step(self) -> Tuple[StepResult, Optional[str]]:
        """One optimizer step at the batch size and learning rate of the run's position; returns
        its result and, when its loss is a spike (train.on_spike), why (the step is then not logged)."""
        state = self.state
        gbs = self.batches.global_batch(state.consumed_tokens)
        lr = self.schedule.lr(state.iteration, state.consumed_tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        batch = self.loader.next_global_batch(gbs)
        data_wait = time.perf_counter() - start
        r = train_step(self.engine, batch, self.topo, self.clipper, timer=self.metrics.compute_timer)
        tokens = gbs * self.cfg.model.seq_length
        state.iteration += 1
        state.consumed_samples, state.consumed_batches = self.loader.consumed_samples, self.loader.consumed_batches
        state.consumed_tokens += tokens
        spike = self.spikes.check(r.loss, state)
        if spike is not None:
            return r, spike
        self.metrics.record_step(r.loss, tokens, counted=self.guard.check(r, state), data_wait=data_wait)
        if self.metrics.should_log(state.iteration):
            self.metrics.log_step(state.to_dict(), lr=lr, grad_norm=r.grad_norm, loss_scale=r.loss_scale,
                                  global_batch_size=gbs)
        return r, None

    def rollback(self, loss: float, reason: str) -> None:
        """Back to the last complete checkpoint, skipping the batches after its data position."""
        state, ckpt_dir = self.state, self.cfg.checkpoint.dir
        step = state.iteration
        if not self.spikes.allowed(state):
            raise TrainingAborted(f"step {step}: loss {loss:.4g} is a spike ({reason}) after "
                                  f"{len(state.rollbacks)} rollbacks; limit: train.max_rollbacks")
        done, saved = list(state.rollbacks), self.checkpointer.reload()
        if saved is None:
            raise TrainingAborted(f"step {step}: loss {loss:.4g} is a spike ({reason}) but {ckpt_dir} holds no "
                                  "checkpoint to roll back to yet; lower checkpoint.save_interval")
        state.load(saved)
        record = self.spikes.record(step, loss, reason, state)
        state.rollbacks = done + [record]
        self.loader.consumed_samples, self.loader.consumed_batches = state.consumed_samples, state.consumed_batches
        self.loader.skip_ranges = [tuple(r) for r in self.spikes.skip_ranges(state)]
        self.metrics.log({"step": step, "rollback_to": state.iteration, "spike_loss": loss, "spike_reason": reason,
                          "skipped_batches": record["skipped_batches"], "rollbacks": len(state.rollbacks)})
        self.metrics.start(state.iteration, self.iters)


def _start_line(cfg: Config, topo: Topology, layout: Layout, iters: int, state: TrainState, recompute) -> str:
    from megatron_neox.model.gpt_neox import count_parameters
    from megatron_neox.training.precision import describe_setup

    params = count_parameters(cfg.model, topo.tp)["total"]
    k = recompute.interval
    ckpt = f"recompute every {k} layer(s)" if k else "no recompute"
    return (f"megatron_neox: {params:,} parameters | pp={topo.pp} tp={topo.tp} dp={topo.dp} | "
            f"micro {layout.micro_batch_size} x accum {layout.grad_accum} x dp {topo.dp} = global "
            f"{layout.global_batch_size} | {cfg.precision} | {describe_setup(cfg, layout.dp)} | {ckpt} ({recompute.why}) | "
            f"{iters} steps from step {state.iteration}")


def train(cfg: Config) -> RunResult:
    """Train (or resume) the run `cfg` describes on the ranks of this world."""
    # First thing: a preemption signal during set-up is honoured after the first step.
    stop = StopSignal()
    try:
        check_run_dirs(cfg)  # before anything is built
        run = _Run(cfg, stop)
        try:
            return _loop(run)
        finally:
            run.metrics.close()
    finally:
        stop.restore()


def _loop(run: _Run) -> RunResult:
    state, iters = run.state, run.iters
    result = RunResult(state=state, eval_losses=run.validator.losses)
    if state.iteration >= iters:
        if run.topo.rank == 0:
            log_info(f"nothing to do: the checkpoint is at step {state.iteration} of {iters}")
        return result
    run.metrics.start(state.iteration, iters)
    while state.iteration < iters:
        r, spike = run.step()
        result.losses.append(r.loss)
        if spike is not None:
            run.rollback(r.loss, spike)
            continue
        if run.validator.should_validate(state.iteration):
            run.validator.validate(state.iteration)
        run.harness.maybe_evaluate(state.iteration, iters)
        if run.checkpointer.after_step(state, iters):
            result.stopped_by_signal = run.checkpointer.stopped_by_signal
            return result
    if not run.validator.should_validate(state.iteration):
        run.validator.validate(state.iteration)
    run.checkpointer.save(state)
    return result
