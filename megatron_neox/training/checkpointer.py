"""When to save, and what a run resumes from: the training loop asks, this module decides.

`Checkpointer.after_step(state)` saves on `checkpoint.save_interval`, and saves and asks the loop to
stop after a preemption signal (SIGTERM/SIGUSR1 on any rank) or `train.exit_interval` steps of this
run; `resume()` prefers the run's own checkpoints (auto-resume after preemption) over
`checkpoint.load` (which seeds a new run). How a checkpoint is written, found and verified is
training/checkpoint.py.
"""
import signal
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_neox.config import Config
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

    def to_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_saved(cls, saved: Optional[dict]) -> "TrainState":
        if saved is None:
            return cls()
        return cls(**{k: int(saved[k]) for k in cls().to_dict() if k in saved})


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


class Checkpointer:
    """Saves `engine`'s checkpoints into `checkpoint.dir` when they are due (nothing when unset)."""

    def __init__(self, cfg: Config, engine, topo: Topology, stop: StopSignal):
        self.cfg, self.engine, self.topo, self.stop = cfg, engine, topo, stop
        self.dir = cfg.checkpoint.dir
        self.steps_this_run = 0
        self.stopped_by_signal = False

    def resume(self) -> TrainState:
        """The state to start from: the run's own newest checkpoint, else checkpoint.load, else step 0."""
        ck = self.cfg.checkpoint
        own = self.dir and checkpoint.has_checkpoint(self.dir)
        load_dir = self.dir if own else ck.load
        if not load_dir:
            return TrainState()
        return TrainState.from_saved(checkpoint.load(self.engine, self.cfg, self.topo, load_dir, required=True))

    def save(self, state: TrainState) -> None:
        if self.dir:
            checkpoint.save(self.engine, self.cfg, self.topo, self.dir,
                            {**state.to_dict(), "config": self.cfg.to_dict()})

    def after_step(self, state: TrainState, total_steps: int) -> bool:
        """Save if due; True when the run must stop now (it has saved)."""
        self.steps_this_run += 1
        signalled = self.stop.any_rank()
        exit_after = self.cfg.train.exit_interval
        if signalled or (exit_after and self.steps_this_run >= exit_after):
            self.save(state)
            self.stopped_by_signal = signalled
            if self.topo.rank == 0:
                why = "a stop signal" if signalled else f"train.exit_interval={exit_after}"
                log_info(f"saved at step {state.iteration} after {why}; exiting")
            return True
        every = self.cfg.checkpoint.save_interval
        if every and state.iteration % every == 0 and state.iteration < total_steps:
            self.save(state)  # the last step is saved by the loop's end
        return False
