"""The training loop: set-up (the config resolved once) -> resume -> for each step: plan, batch,
train_step, log, then every component's `after_step`.

A step (`_Run.step`) reads top to bottom: the schedule's plan for the run's position (learning
rate and global batch size, training/schedules.py), the loader's next global batch, `train_step`
(which applies the plan, runs forward/backward, clips and steps, training/step.py), the state's
advance (tokens, the loader's `state_dict`), the spike check, the log line. A loss spike
(`train.on_spike`: rollback, training/spikes.py) rolls back to the last complete checkpoint inside
the same step, and the loop goes on the same way. The loop only orders; each component decides its
own "when" behind one convention, `after_step(state, last_step, trained) -> stop?`: the validator
(`should_validate`), the lm-eval harness (`should_evaluate`) and the checkpointer (save interval,
exit interval, preemption signals; after a rollback only the signals). The metrics logger decides
inside the step (`should_log`).

Everything a resumed run needs to continue exactly is in the checkpoint's client state
(iteration, consumed tokens, the loader's state_dict, the spike policy's window) plus DeepSpeed's
engine and optimizer state and every rank's RNG states; the LR and batch size are functions of those.
"""
import math
import os
import time
from dataclasses import dataclass, field
from typing import List

from megatron_neox.config import Config
from megatron_neox.errors import ConfigError, MegatronNeoxError
from megatron_neox.evaluation.harness import TrainingHarness, check_training_tasks
from megatron_neox.outputs import check_run_dirs
from megatron_neox.topology import Topology
from megatron_neox.training.checkpointer import Checkpointer, StopSignal, TrainState, check_resume
from megatron_neox.training.engine import build_engine
from megatron_neox.training.launch import setup
from megatron_neox.training.metrics import MetricsLogger, log_info, resolve_peak_tflops
from megatron_neox.training.objectives import build_objective
from megatron_neox.training.schedules import Schedule
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


def train_batches_needed(cfg: Config, iters: int) -> int:
    """Global batches the train split must hold: the run's `iters` steps, the data.skip_batches
    ranges passed over on the way, and room for every rollback's skip (train.max_rollbacks x
    train.spike_skip_batches). Sized so, the loader never runs past the end and wraps into the
    run's own first samples, and a longer run with the same skips trains on the same first batches
    (the train split's first k samples do not depend on how many are asked for)."""
    merged: List[List[int]] = []
    for a, b in sorted(map(list, cfg.data.skip_batches)):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    end = iters
    for a, b in merged:  # each range that starts before the run's last batch pushes that batch back
        if a < end:
            end += b - a
    if cfg.train.on_spike == "rollback":
        end += cfg.train.max_rollbacks * cfg.train.spike_skip_batches
    return end


def _dataset_sizes(cfg: Config, schedule: Schedule) -> tuple:
    full = schedule.batches.full
    train = train_batches_needed(cfg, schedule.iters) * full
    evals = (schedule.iters // cfg.eval.interval + 1) if cfg.eval.interval else 1
    valid = evals * cfg.eval.iters * full
    test = cfg.eval.iters * full
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


@dataclass
class StepOutcome:
    """One pass of the loop: a trained step, or a rollback to the last checkpoint (a spike)."""

    result: StepResult
    trained: bool


class _Run:
    """Everything one training run is built from, in the order it is built, from the config and grid
    `setup` gave: the tokenizer, lm-eval tasks and data first (their errors come before the model is
    built), then the engine, then the resume. The loop components (validator, harness,
    checkpointer) share one convention: `after_step(state, last_step, trained) -> stop?`."""

    def __init__(self, cfg: Config, topo: Topology, stop: StopSignal):
        from megatron_neox.data.finetune import FinetuneLoader, build_finetune_datasets
        from megatron_neox.data.loader import (BatchLoader, build_datasets, eod_flags, eod_warnings, loader_options,
                                               size_warnings)

        from megatron_neox.plan import recompute_of

        self.recompute = recompute_of(cfg)
        self.cfg, self.topo = cfg, topo
        self.layout = layout = cfg.resolved.layout
        tok = _check_tokenizer(cfg)
        tasks = check_training_tasks(cfg)  # every lm-eval task built and checked before the model is
        check_resume(cfg, topo)  # a checkpoint of another model, layout or data setup: refused now
        # The end-of-document id only where something uses it: a tokenizer without one is fine otherwise.
        eod = tok.eod_id if tok is not None and (eod_flags(cfg.data) or cfg.eval.tasks) else None
        batch_options = loader_options(cfg.data, eod)  # refuses EOD flags without a tokenizer
        self.schedule = Schedule.from_config(cfg)
        self.iters = self.schedule.iters
        sizes = _dataset_sizes(cfg, self.schedule)
        # train.objective sft / dpo: fine-tuning data and loss (training/objectives.py); None: pretraining.
        self.objective = build_objective(cfg.train, topo) if cfg.train.objective != "lm" else None
        if self.objective is None:
            train_ds, valid_ds, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                                                   num_samples=sizes,
                                                   vocab_size=cfg.model.vocab_size if cfg.data.check_token_ids else None)
        else:
            train_ds, valid_ds, _ = build_finetune_datasets(cfg.data, cfg.train.objective,
                                                            seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                                                            num_samples=sizes, pad_id=0)  # padding: no loss
        if train_ds is None:
            raise ConfigError(f"data.split={cfg.data.split!r} leaves no documents for training")
        if topo.rank == 0:
            for w in size_warnings(cfg.data, train_ds, valid_ds, seq_length=cfg.model.seq_length,
                                   train_tokens=self.iters * self.schedule.batches.full * cfg.model.seq_length,
                                   eval_iters=cfg.eval.iters) + \
                    eod_warnings(cfg.data, train_ds, eod):
                log_info(f"warning: {w}")

        self.engine, _, self.clipper = build_engine(cfg, topo, self.objective)
        self.checkpointer = Checkpointer(cfg, self.engine, topo, stop)
        self.state = self.checkpointer.resume()
        if cfg.train.objective == "dpo":
            self._set_reference(train_ds, valid_ds)
        self.spikes = SpikePolicy(cfg)
        loader_kwargs = dict(micro_batch_size=layout.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
                             **batch_options, skip_ranges=self.spikes.skip_ranges(self.state))
        self.loader = (BatchLoader(train_ds, **loader_kwargs) if self.objective is None
                       else FinetuneLoader(train_ds, cfg.train.objective, **loader_kwargs))
        self.loader.load_state_dict(self.state.data_position())
        rank0 = topo.rank == 0
        self.metrics = MetricsLogger(cfg, topo.world_size, enabled=rank0,
                                     peak_tflops=resolve_peak_tflops(cfg) if rank0 else 0.0, rank=topo.rank)
        self.validator = Validator(cfg, self.engine, topo, valid_ds, micro_batch_size=layout.micro_batch_size,
                                   global_batch_size=self.schedule.batches.full, eod_token_id=eod,
                                   metrics=self.metrics, objective=self.objective)
        # eval.tasks: lm-evaluation-harness on the sharded engine
        self.harness = TrainingHarness(cfg, self.engine, topo, tok, metrics=self.metrics, tasks=tasks)
        self.components = (self.validator, self.harness, self.checkpointer)  # in the order they act
        self.guard = SkipGuard(cfg.train.max_skipped_steps)
        if rank0:
            log_info(_start_line(cfg, topo, self.iters, self.state, self.recompute))

    def _set_reference(self, train_ds, valid_ds) -> None:
        """DPO: the start model's log-probabilities of every pair, computed before step 1 or read back
        (training/reference.py)."""
        from megatron_neox.training.reference import FILE_NAME, load_or_compute

        cfg = self.cfg
        path = os.path.join(cfg.checkpoint.dir, FILE_NAME) if cfg.checkpoint.dir else None
        start = f"{cfg.checkpoint.load}" if cfg.checkpoint.load else f"seed {cfg.train.seed}"
        t0 = time.perf_counter()
        table, computed = load_or_compute(path, start, self.state.iteration, self.engine, self.topo, self.objective,
                                          train_ds, self.layout.micro_batch_size)
        if self.topo.rank == 0:
            log_info(f"dpo: reference log-probabilities of {len(table):,} pairs (the start model's, "
                     f"{'computed' if computed else 'read back from ' + str(path)}) in {time.perf_counter() - t0:.1f} s")
        for ds in (train_ds, valid_ds):
            if ds is not None:
                ds.reference = table

    def step(self) -> StepOutcome:
        """One optimizer step at the learning rate and batch size the schedule gives the run's
        position, then its bookkeeping; a loss spike (train.on_spike) rolls back instead."""
        state = self.state
        plan = self.schedule.plan(state.iteration, state.consumed_tokens)
        start = time.perf_counter()
        batch = self.loader.next_global_batch(plan.global_batch_size)
        data_wait = time.perf_counter() - start
        r = train_step(self.engine, batch, self.topo, self.clipper, plan, timer=self.metrics.compute_timer,
                       objective=self.objective)
        # A DPO sample is a pair: two sequences.
        tokens = plan.global_batch_size * self.cfg.model.seq_length * (2 if self.cfg.train.objective == "dpo" else 1)
        state.advance(tokens, self.loader.state_dict())
        spike = self.spikes.check(r.loss, state)
        if spike is not None:
            self.rollback(r.loss, spike)
            return StepOutcome(r, trained=False)
        self.metrics.record_step(r.loss, tokens, counted=self.guard.check(r, state), data_wait=data_wait)
        if self.metrics.should_log(state.iteration):
            extra = self.objective.pop_stats() if self.objective is not None else None  # DPO's rewards
            self.metrics.log_step(state.to_dict(), lr=plan.lr, grad_norm=r.grad_norm, loss_scale=r.loss_scale,
                                  global_batch_size=plan.global_batch_size, extra=extra)
        return StepOutcome(r, trained=True)

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
        record = self.spikes.record(step, loss, reason, state, done)
        state.rollbacks = done + [record]
        self.loader.load_state_dict(state.data_position())
        self.loader.skip_ranges = [tuple(r) for r in self.spikes.skip_ranges(state)]
        self.metrics.log({"step": step, "rollback_to": state.iteration, "spike_loss": loss, "spike_reason": reason,
                          "skipped_batches": record["skipped_batches"], "rollbacks": len(state.rollbacks)})
        self.metrics.start(state.iteration, self.iters)


def _start_line(cfg: Config, topo: Topology, iters: int, state: TrainState, recompute) -> str:
    from megatron_neox.model.gpt_neox import count_parameters
    from megatron_neox.resolve import describe_setup

    params = count_parameters(cfg.model, topo.tp)["total"]
    layout = cfg.resolved.layout
    return (f"megatron_neox: {params:,} parameters | pp={topo.pp} tp={topo.tp} dp={topo.dp} | "
            f"micro {layout.micro_batch_size} x accum {layout.grad_accum} x dp {topo.dp} = global "
            f"{layout.global_batch_size} | {cfg.precision} | {describe_setup(cfg)} | "
            f"{f'recompute every {recompute.interval} layer(s)' if recompute.interval else 'no recompute'} "
            f"({recompute.why}) | "
            f"{iters} steps from step {state.iteration}")


def train(cfg: Config) -> RunResult:
    """Train (or resume) the run `cfg` describes on the ranks of this world."""
    # First thing: a preemption signal during set-up is honoured after the first step.
    stop = StopSignal()
    lock = None
    try:
        # Resolved (every 'auto' decided, the recompute interval from the planner's memory estimate
        # on this device; the layout attached) and checked against this machine before anything is
        # written or built.
        cfg, topo = setup(cfg)
        lock = check_run_dirs(cfg)  # one run per checkpoint.dir
        run = _Run(cfg, topo, stop)
        try:
            return _loop(run)
        finally:
            run.metrics.close()
    finally:
        if lock is not None:
            lock.release()
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
        outcome = run.step()
        result.losses.append(outcome.result.loss)
        # Every component, in order; a stop (a signal, train.exit_interval) comes after it has saved.
        with run.metrics.paused():  # validation, lm-eval and saves are not training time
            stops = [c.after_step(state, iters, outcome.trained) for c in run.components]
        if any(stops):
            result.stopped_by_signal = run.checkpointer.stopped_by_signal
            return result
    run.validator.at_end(state)
    run.checkpointer.save(state)
    return result
