"""Loss-spike policy (`train.on_spike`): which step's loss calls for a rollback, and what it skips.

The PaLM recipe (Chowdhery et al. 2022, section 5.1): on a spike, restart from a checkpoint before
it and skip the data batches that followed, since a spike comes from the combination of a state
of the weights and particular batches. Here a spike is a non-finite loss, or a loss above
`train.spike_factor` x the median of the last `train.spike_window` losses. Everything the policy
decides from lives in the TrainState (the loss window and the rollbacks done), which travels in
the client state of every checkpoint, so a resumed run decides exactly as an uninterrupted one.
"""
import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

from megatron_neox.config import Config


class SpikePolicy:
    def __init__(self, cfg: Config):
        self.train = cfg.train
        self.fixed_skips = [list(r) for r in cfg.data.skip_batches]
        self.enabled = cfg.train.on_spike == "rollback"

    def check(self, loss: float, state) -> Optional[str]:
        """Why the loss of step `state.iteration` is a spike, or None (and it joins the window)."""
        if not self.enabled:
            return None
        t, window, step = self.train, state.loss_window, state.iteration
        if step in t.inject_spike_at and all(r["step"] != step for r in state.rollbacks):
            return "injected (train.inject_spike_at)"  # once per trajectory: the replay passes
        if not math.isfinite(loss):
            return "non-finite loss"
        if len(window) >= t.spike_window:
            median = statistics.median(window)
            if loss > t.spike_factor * median:
                return f"loss above train.spike_factor={t.spike_factor} x median {median:.4g} of the last {len(window)}"
        window.append(loss)
        del window[:-t.spike_window]
        return None

    def allowed(self, state) -> bool:
        return len(state.rollbacks) < self.train.max_rollbacks

    def record(self, step: int, loss: float, reason: str, restored, done: Sequence[Dict[str, Any]] = ()
               ) -> Dict[str, Any]:
        """The rollback from `step` to the `restored` state; it skips the batches after its data
        position. Batches already skipped there (data.skip_batches, the rollbacks `done` so far)
        are passed over first: a second rollback to the same checkpoint skips onward from the data
        the replay trained on, not the same range again (which would replay the same spike)."""
        start = restored.consumed_batches
        ranges = self.fixed_skips + [list(r["skipped_batches"]) for r in done]
        moved = True
        while moved:
            moved = False
            for a, b in ranges:
                if a <= start < b:
                    start, moved = b, True
        return {"step": step, "loss": loss, "reason": reason, "restored_step": restored.iteration,
                "skipped_batches": [start, start + self.train.spike_skip_batches]}

    def skip_ranges(self, state) -> List[List[int]]:
        """Global-batch ranges never trained on: data.skip_batches and every rollback's."""
        return self.fixed_skips + [list(r["skipped_batches"]) for r in state.rollbacks]
