"""The training loop: build -> resume -> for each step: batch, lr, train_step, log, eval, save.

Everything a resumed run needs to continue exactly is in the checkpoint's client state
(iteration, consumed samples and tokens, the data position) plus DeepSpeed's engine and
optimizer state and every rank's RNG states; the LR and batch size are functions of those.
"""
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_neox.config import Config
from megatron_neox.errors import ConfigError, MegatronNeoxError
from megatron_neox.training import checkpoint
from megatron_neox.training.engine import build_engine, build_topology
from megatron_neox.training.metrics import MetricsLogger, log_info, memory_gb, resolve_peak_tflops
from megatron_neox.training.optim import BatchSchedule, LRSchedule, total_iterations
from megatron_neox.training.step import eval_step, train_step


class TrainingAborted(MegatronNeoxError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive skipped or non-finite steps)."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0

    def to_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    """What a call to `train` did (used by tests and tools)."""

    state: TrainState
    losses: List[float] = field(default_factory=list)
    eval_losses: List[float] = field(default_factory=list)
    stopped_by_signal: bool = False


class _StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption) ask for a save and a clean exit after the current step."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook): signals stay as they were
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank(self) -> bool:
        """True on every rank once any rank got a signal (ranks may be signalled at different times)."""
        from deepspeed.accelerator import get_accelerator

        # A device tensor: NCCL cannot reduce CPU tensors.
        flag = torch.tensor([1 if self.received is not None else 0], device=get_accelerator().current_device_name())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def train(cfg: Config) -> RunResult:
    """Train (or resume) the run `cfg` describes on the ranks of this world."""
    # First thing: a preemption signal during set-up is honoured after the first step.
    stop = _StopSignal()
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: Config, stop: "_StopSignal") -> RunResult:
    from megatron_neox.data.loader import BatchLoader, build_datasets

    topo = build_topology(cfg)
    world = dist.get_world_size()
    rank0 = dist.get_rank() == 0
    layout = cfg.layout(world)
    tok = _check_tokenizer(cfg)
    if cfg.data.eod_mask_loss and tok is None:
        raise ConfigError("data.eod_mask_loss=true needs tokenizer.path (to know the end-of-document id)")
    batches = BatchSchedule.from_config(cfg, layout)
    iters = total_iterations(cfg, batches)
    schedule = LRSchedule.from_config(cfg, iters)

    engine, _ = build_engine(cfg, topo)
    state = TrainState()
    # Our own checkpoints win (auto-resume after preemption); checkpoint.load seeds a new run.
    own = cfg.checkpoint.dir and checkpoint.has_checkpoint(cfg.checkpoint.dir)
    load_dir = cfg.checkpoint.dir if own else cfg.checkpoint.load
    if load_dir:
        saved = checkpoint.load(engine, cfg, topo, load_dir, required=True)
        if saved is not None:
            state = TrainState(**{k: int(saved[k]) for k in TrainState().to_dict() if k in saved})

    train_ds, valid_ds, _ = build_datasets(
        cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed, num_samples=_dataset_sizes(cfg, iters, batches)
    )
    if train_ds is None:
        raise ConfigError(f"data.split={cfg.data.split!r} leaves no documents for training")
    eod = tok.eod_id if tok is not None else None
    loader = BatchLoader(train_ds, micro_batch_size=layout.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
                         consumed_samples=state.consumed_samples, eod_token_id=eod,
                         eod_mask_loss=cfg.data.eod_mask_loss)

    peak = resolve_peak_tflops(cfg) if rank0 else 0.0
    metrics = MetricsLogger(cfg, world, enabled=rank0, peak_tflops=peak)
    if rank0:
        from megatron_neox.model.gpt_neox import count_parameters

        params = count_parameters(cfg.model, topo.tp)["total"]
        log_info(f"megatron_neox: {params:,} parameters | pp={topo.pp} tp={topo.tp} dp={topo.dp} | "
                 f"micro {layout.micro_batch_size} x accum {layout.grad_accum} x dp {topo.dp} = global "
                 f"{layout.global_batch_size} | {cfg.precision} | ZeRO-{cfg.zero.stage} | "
                 f"{iters} steps from step {state.iteration}")

    result = RunResult(state=state)
    seq = cfg.model.seq_length
    consecutive_bad = 0
    window: List[float] = []
    window_start, window_tokens = time.perf_counter(), 0
    run_start, run_start_iter = time.perf_counter(), state.iteration
    started_here = 0

    def save():
        if cfg.checkpoint.dir:
            checkpoint.save(engine, cfg, topo, cfg.checkpoint.dir, {**state.to_dict(), "config": cfg.to_dict()})

    def evaluate():
        if valid_ds is None:
            return
        eval_loader = BatchLoader(valid_ds, micro_batch_size=layout.micro_batch_size, dp_rank=topo.dp_rank,
                                  dp_size=topo.dp, eod_token_id=eod, eod_mask_loss=cfg.data.eod_mask_loss)
        losses = [eval_step(engine, eval_loader.next_global_batch(batches.full), topo) for _ in range(cfg.eval.iters)]
        loss = sum(losses) / len(losses)
        result.eval_losses.append(loss)
        metrics.log({"step": state.iteration, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})

    if state.iteration >= iters:
        if rank0:
            log_info(f"nothing to do: the checkpoint is at step {state.iteration} of {iters}")
        metrics.close()
        return result
    try:
        while state.iteration < iters:
            gbs = batches.global_batch(state.consumed_tokens)
            lr = schedule.lr(state.iteration, state.consumed_tokens)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro = loader.next_global_batch(gbs)
            r = train_step(engine, micro, topo)
            state.iteration += 1
            started_here += 1
            state.consumed_samples = loader.consumed_samples
            state.consumed_tokens += gbs * seq
            window_tokens += gbs * seq
            result.losses.append(r.loss)
            if r.skipped or not math.isfinite(r.loss):
                state.skipped_steps += 1
                consecutive_bad += 1
                if consecutive_bad >= cfg.train.max_skipped_steps:
                    raise TrainingAborted(
                        f"step {state.iteration}: {consecutive_bad} consecutive skipped or non-finite steps "
                        f"(loss {r.loss}, loss scale {r.loss_scale}); lower optimizer.lr, check the data, or "
                        "resume from an earlier checkpoint. Limit: train.max_skipped_steps"
                    )
            else:
                consecutive_bad = 0
                window.append(r.loss)
            if state.iteration % cfg.log.interval == 0 or state.iteration == iters:
                elapsed = time.perf_counter() - window_start
                speed = (time.perf_counter() - run_start) / max(1, state.iteration - run_start_iter)
                record: Dict[str, Any] = {
                    "step": state.iteration, "total_steps": iters,
                    "consumed_samples": state.consumed_samples, "tokens": state.consumed_tokens,
                    "loss": sum(window) / len(window) if window else float("nan"), "lr": lr,
                    "grad_norm": r.grad_norm, "loss_scale": r.loss_scale, "skipped_steps": state.skipped_steps,
                    "global_batch_size": gbs, **metrics.throughput(window_tokens, elapsed),
                    "mem_gb": memory_gb(), "eta_s": speed * (iters - state.iteration),
                }
                metrics.log(record)
                window, window_start, window_tokens = [], time.perf_counter(), 0
            if cfg.eval.interval and state.iteration % cfg.eval.interval == 0:
                evaluate()
            signalled = stop.any_rank()
            periodic = cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0
            exiting = cfg.train.exit_interval and started_here >= cfg.train.exit_interval
            if signalled or exiting:
                save()
                result.stopped_by_signal = bool(signalled)
                if rank0:
                    why = "a stop signal" if signalled else f"train.exit_interval={cfg.train.exit_interval}"
                    log_info(f"saved at step {state.iteration} after {why}; exiting")
                return result
            if periodic and state.iteration < iters:
                save()
        if not (cfg.eval.interval and state.iteration % cfg.eval.interval == 0):
            evaluate()
        save()
        return result
    finally:
        metrics.close()
