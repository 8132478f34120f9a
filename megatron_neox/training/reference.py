"""DPO's reference log-probabilities: precomputed once, by the start model, before the first step.

Before step 1 the engine holds the frozen start model itself, so one forward pass of it (eval mode,
no gradients) over every pair of the dataset gives the reference; no second model is kept in
memory, and any (pp, tp, dp) layout computes it as it trains. Cost: one forward per pair (about a
third of a training step's compute per pair, once), 16 bytes per pair in a file. Each data-parallel
rank takes its share of the pairs, the last pipeline stage records the log-probabilities, and one
all-reduce of the table puts them on every rank.

The table is saved in `checkpoint.dir/dpo_reference.npz` with what it was computed from (the start
checkpoint and the dataset's sizes), so a resumed run -- whose weights have moved -- reads it back
instead of recomputing; a resumed run without it, or with one made for other data, is refused.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_neox.durable import atomic_write
from megatron_neox.errors import CheckpointError

FILE_NAME = "dpo_reference.npz"


def data_key(sets) -> str:
    """A hash of the chosen and rejected datasets' document sizes (what the table is indexed by)."""
    h = hashlib.sha256()
    for ds in sets:
        h.update(np.ascontiguousarray(ds.document_sizes(), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def compute_reference(engine, topo, objective, dataset, micro_batch_size: int) -> np.ndarray:
    """[pairs, 2] float64 (chosen, rejected) summed log-probabilities under the engine's weights,
    for every pair of `dataset`'s underlying sets (all splits)."""
    from megatron_neox.data.finetune import dpo_micro_batch
    from megatron_neox.training.step import eval_step

    sets = dataset.sets
    n = sets[0].num_documents
    table = torch.zeros(n, 3, dtype=torch.float64)  # chosen, rejected, times written
    B, dp = micro_batch_size, topo.dp
    objective.recorded = []
    try:
        for first in range(0, n, B * dp):
            mine = [min(first + topo.dp_rank * B + k, n - 1) for k in range(B)]  # the last chunk repeats a pair
            rows = [(d, [s.get_document(d) for s in sets]) for d in mine]
            eval_step(engine, [dpo_micro_batch(rows, dataset)], topo, objective)
            if objective.recorded:
                logps = objective.recorded.pop().cpu()
                for k, d in enumerate(mine):
                    table[d] += torch.stack([logps[k], logps[B + k], torch.tensor(1.0, dtype=torch.float64)])
    finally:
        objective.recorded = None
        objective.discard_stats()
    if dist.is_available() and dist.is_initialized() and topo.world_size > 1:
        from deepspeed.accelerator import get_accelerator

        on_device = table.to(get_accelerator().current_device_name())
        dist.all_reduce(on_device)
        table = on_device.cpu()
    return (table[:, :2] / table[:, 2:].clamp(min=1.0)).numpy()


def load_or_compute(path: Optional[str], start: str, iteration: int, engine, topo, objective, dataset,
                    micro_batch_size: int) -> tuple[np.ndarray, bool]:
    """(the reference table of this run, whether it was computed now): read from `path` when it was
    saved for this start and data, else computed (only at step 0: later the weights are no longer
    the start model's)."""
    key = data_key(dataset.sets)
    if path is not None and os.path.exists(path):
        with np.load(path) as saved:
            if str(saved["start"]) == start and str(saved["data"]) == key:
                return saved["table"], False
        if iteration > 0:
            raise CheckpointError(f"{path} was computed for another start checkpoint or dataset, and this run is at "
                                  f"step {iteration}, past its start model; resume with the run's own data")
    elif iteration > 0:
        raise CheckpointError(f"the DPO run resumes at step {iteration} but {path or 'checkpoint.dir'} holds no "
                              f"{FILE_NAME} (the reference log-probabilities of its start model); start again from "
                              "step 0")
    table = compute_reference(engine, topo, objective, dataset, micro_batch_size)
    if path is not None and topo.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path, "wb", durable=True) as f:
            np.savez(f, table=table, start=np.array(start), data=np.array(key))
    return table, True
