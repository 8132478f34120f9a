"""The training step reads device values on the host only where the loop needs them.

Each read of a device scalar (`.item()`, `float(tensor)`) is an `aten::_local_scalar_dense`, which
on a GPU waits for the whole queue to drain. Counted on CPU with a TorchDispatchMode around
`train_step` on one gloo rank and attributed to the innermost project or DeepSpeed frame. The
project's budget is what the loop uses per step: the mean loss (the spike check and the non-finite
guard look at every step) and the global gradient norm. DeepSpeed's ZeRO optimizer reads its own
norm's validity (`is_invalid_grad_norm`) inside its step; that is DeepSpeed's and not counted."""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _dist import run_distributed
from _layouts import micro_batches, tiny_config

STEPS = 2


class _CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = {"megatron_neox": 0, "deepspeed": 0, "other": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            files = [f.filename for f in reversed(traceback.extract_stack())]
            owner = next((o for f in files for o in ("deepspeed", "megatron_neox") if f"/{o}/" in f), "other")
            self.reads[owner] += 1
        return func(*args, **(kwargs or {}))


def _world(rank, world_size):
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg, topo = setup(tiny_config(1, 1))
    engine, _, clipper = build_engine(cfg, topo)
    train_step(engine, micro_batches(0, cfg, topo.dp, topo.dp_rank), topo, clipper)  # warm-up, not counted
    reads = []
    for step in range(1, STEPS + 1):
        batch = micro_batches(step, cfg, topo.dp, topo.dp_rank)
        with _CountReads() as mode:
            train_step(engine, batch, topo, clipper)
        reads.append(mode.reads)
    return reads


def test_train_step_reads_only_the_loss_and_the_norm_per_step():
    reads = run_distributed(_world, 1)[0]
    assert all(r == reads[0] for r in reads), reads
    assert reads[0]["megatron_neox"] == 2, f"project reads of device values per step: {reads[0]}"
    assert reads[0]["other"] == 0, reads[0]
