"""When to save, and what a run resumes from: the training loop asks, this module decides.

`Checkpointer.after_step(state)` saves on `checkpoint.save_interval`, and saves and asks the loop to
stop after a preemption signal (SIGTERM/SIGUSR1 on any rank) or `train.exit_interval` steps of this
run; `resume()` prefers the run's own checkpoints (auto-resume after preemption) over
`checkpoint.load` (which seeds a new run). How a checkpoint is written, found and verified is
training/checkpoint.py (the file format: checkpoint_files.py).

With `checkpoint.async_save` a save returns once this rank's state is copied to host memory; the
checkpoint is declared complete at the first `after_step` at which every rank's writer has
finished. That is learnt from the all-reduce the stop signal already makes each step, so an
asynchronous save adds no collective to the steps it overlaps.

A save that fails (a full disk, a directory made unwritable) fails on every rank at once: a write
error is kept by the rank's writer (training/writer.py) and the ranks agree on it where they meet
anyway (that per-step all-reduce, the points of a save where they used to wait in a barrier), so
no rank waits in a collective for one that has given up, whichever rank met the error.
"""
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_neox.checkpoint_files import has_checkpoint
from megatron_neox.config import Config
from megatron_neox.errors import CheckpointError
from megatron_neox.topology import Topology
from megatron_neox.training import checkpoint, preemption
from megatron_neox.training.metrics import log_info


@dataclass
class TrainState:
    """Where the run is; with the engine, optimizer and RNG states, all a resume needs."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consumed_batches: int = 0
    """Global batches drawn from the data order, trained on or skipped (data.skip_batches, rollbacks)."""
    loss_window: List[float] = field(default_factory=list)
    """The last train.spike_window losses (the spike policy's running median survives a resume)."""
    rollbacks: List[Dict[str, Any]] = field(default_factory=list)
    """Every loss-spike rollback of this trajectory: step, loss, reason, restored_step, skipped_batches."""

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_saved(cls, saved: Optional[dict]) -> "TrainState":
        state = cls()
        state.load(saved)
        return state

    def load(self, saved: Optional[dict]) -> None:
        """Become the state of client state `saved` (None: a fresh run)."""
        fresh = TrainState()
        saved = saved or {}
        for k, default in fresh.__dict__.items():
            v = saved.get(k, default)
            setattr(self, k, list(v) if isinstance(default, list) else int(v))
        if "consumed_batches" not in saved:  # saved before batches could be skipped: one per step
            self.consumed_batches = self.iteration

    def data_position(self) -> Dict[str, int]:
        """The train loader's state (data/loader.py `BatchLoader.state_dict`) this state records."""
        return {"consumed_samples": self.consumed_samples, "consumed_batches": self.consumed_batches}

    def advance(self, tokens: int, data_position: Dict[str, int]) -> None:
        """One step done: `tokens` more consumed, the loader now at `data_position` (its state_dict)."""
        self.iteration += 1
        self.consumed_tokens += tokens
        self.consumed_samples = int(data_position["consumed_samples"])
        self.consumed_batches = int(data_position["consumed_batches"])


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption) ask for a save and a clean exit after the current step."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook): signals stay as they were
                pass
        preemption.announce_rank()  # a supervising launch/run.py may forward signals from now on
        preemption.watch_launcher(self._launcher_gone)  # the plain `deepspeed` runner passes no signal on

    def _launcher_gone(self, why: str) -> None:
        log_info(f"rank {os.environ.get('RANK', '?')}: {why}: finishing the step, saving and exiting")
        self.received = signal.SIGTERM

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank(self, busy: bool = False, failed: bool = False) -> tuple:
        """(any rank got a signal, any rank is `busy`, any rank has `failed`), the same on every
        rank; ranks may be signalled at different times."""
        signalled, busy, failed = _any_rank(self.received is not None, busy, failed)
        return bool(signalled), bool(busy), bool(failed)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _any_rank(*flags: bool) -> List[int]:
    """Each flag OR-ed over the ranks (one all-reduce)."""
    from deepspeed.accelerator import get_accelerator

    # A device tensor: NCCL cannot reduce CPU tensors.
    t = torch.tensor([int(f) for f in flags], device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _agree(error: Optional[Exception]) -> None:
    """Every rank calls it at the same point of a save, in place of a barrier: when this rank's part
    (`error`) or another's failed, every rank raises, so none is left waiting in a collective for a
    rank that has given up (the failure may be rank 0's alone: it alone writes `latest`)."""
    if not _any_rank(error is not None)[0]:
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        found: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(found, None if error is None else str(error))
        if error is None:
            rank, message = next((r, m) for r, m in enumerate(found) if m is not None)
            error = CheckpointError(f"the checkpoint save failed on rank {rank}: {message}")
    raise error


def resume_dir(cfg: Config) -> Optional[str]:
    """Where a run resumes from: its own checkpoint.dir once it holds a checkpoint (auto-resume),
    else checkpoint.load (a new run seeded from it), else nowhere."""
    own = cfg.checkpoint.dir and has_checkpoint(cfg.checkpoint.dir)
    return cfg.checkpoint.dir if own else cfg.checkpoint.load


def check_resume(cfg: Config, topo: Topology) -> None:
    """At start-up, before the data and the model are built: the checkpoint the run will resume
    from belongs to it (training/checkpoint.py `check_resumable`)."""
    load_dir = resume_dir(cfg)
    if load_dir:
        checkpoint.check_resumable(cfg, topo, load_dir)


class Checkpointer:
    """Saves `engine`'s checkpoints into `checkpoint.dir` when they are due (nothing when unset)."""

    def __init__(self, cfg: Config, engine, topo: Topology, stop: StopSignal):
        self.cfg, self.engine, self.topo, self.stop = cfg, engine, topo, stop
        self.dir = cfg.checkpoint.dir
        self.steps_this_run = 0
        self.stopped_by_signal = False
        self.writer = checkpoint.use_durable_writer(engine, background=cfg.checkpoint.async_save)
        self.pending: Optional[checkpoint.PendingSave] = None

    def resume(self) -> TrainState:
        """The state to start from: the run's own newest checkpoint, else checkpoint.load, else step 0."""
        load_dir = resume_dir(self.cfg)
        if not load_dir:
            return TrainState()
        return TrainState.from_saved(checkpoint.load(self.engine, self.cfg, self.topo, load_dir, required=True))

    def reload(self) -> Optional[Dict[str, Any]]:
        """Load the newest complete checkpoint of this run (a rollback); returns its client state,
        or None when the run has saved none yet."""
        self.flush()
        if not (self.dir and has_checkpoint(self.dir)):
            return None
        return checkpoint.load(self.engine, self.cfg, self.topo, self.dir, required=True)

    def save(self, state: TrainState, wait: bool = True) -> None:
        """Save `state`; with `wait`, return once the checkpoint is complete on every rank."""
        if not self.dir:
            return
        self.flush()
        self.pending = checkpoint.begin_save(self.engine, self.cfg, self.topo, self.dir, state.to_dict())
        if wait or not self.cfg.checkpoint.async_save:
            self.flush()

    def flush(self) -> None:
        """Wait for the save in flight (if any) and declare it complete."""
        if self.pending is None:
            return
        self.writer.drain()
        _agree(self.writer.error)  # every rank's files are durable
        self._finalize()

    def _finalize(self) -> None:
        error = None
        if self.topo.rank == 0:
            try:
                checkpoint.finalize_tag(self.pending, self.cfg.checkpoint.keep_last)
            except CheckpointError as e:
                error = e
        self.pending = None
        _agree(error)  # nobody goes on (or returns) before the checkpoint is complete

    def after_step(self, state: TrainState, total_steps: int, trained: bool = True) -> bool:
        """Save if due; True when the run must stop now (it has saved). After a rollback
        (`trained` False) only a stop signal is looked for: the state is a checkpoint's."""
        self.steps_this_run += int(trained)
        signalled, writing, failed = self.stop.any_rank(busy=self.pending is not None and self.writer.pending(),
                                                        failed=self.writer.error is not None)
        if failed:
            _agree(self.writer.error)  # raises on every rank
        if self.pending is not None and not writing:
            self._finalize()  # every rank's files are durable
        exit_after = self.cfg.train.exit_interval
        if signalled or (trained and exit_after and self.steps_this_run >= exit_after):
            self.save(state)
            self.stopped_by_signal = signalled
            if self.topo.rank == 0:
                why = "a stop signal" if signalled else f"train.exit_interval={exit_after}"
                log_info(f"saved at step {state.iteration} after {why}; exiting")
            return True
        every = self.cfg.checkpoint.save_interval
        if trained and every and state.iteration % every == 0 and state.iteration < total_steps:
            self.save(state, wait=False)  # the last step is saved by the loop's end
        return False
