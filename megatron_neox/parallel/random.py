"""Model-parallel random number generation.

Two streams, as in Megatron:
- the default torch generator, seeded identically on every rank: dropout on replicated activations
  (embeddings, residual stream) must draw the same mask on all ranks of a TP group, otherwise the
  "replicated" copies drift apart; identical seeding also makes sharded init reproduce the
  unsharded init (every rank draws the same master weight);
- a tracked "tensor-parallel" stream seeded with seed + 2718 + tp_rank: dropout on a TP shard
  (attention probabilities of this rank's heads) must differ between ranks, or the shards would
  share one mask pattern.

The tracked stream lives in DeepSpeed's RNG tracker (deepspeed.runtime.activation_checkpointing.
checkpointing), because DeepSpeed's activation checkpointing saves and restores that tracker's
states around the recompute: dropout then draws the same masks in the recompute as in the forward.
On CPU, DeepSpeed's accelerator RNG *is* the default torch generator, so forking the tracker swaps
the default generator's state in and out; this is tested.
"""
from __future__ import annotations

import contextlib

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.activation_checkpointing import checkpointing as _ds_checkpointing

# DeepSpeed's own name and offset, so its `get_cuda_rng_tracker().fork()` (default argument) and
# `model_parallel_cuda_manual_seed` address the same stream with the same seed.
TENSOR_PARALLEL_RNG_NAME = _ds_checkpointing._MODEL_PARALLEL_RNG_TRACKER_NAME
_TENSOR_PARALLEL_SEED_OFFSET = 2718


def get_rng_tracker():
    """DeepSpeed's process-wide RNG-state tracker (a CudaRNGStatesTracker, CPU-capable)."""
    return _ds_checkpointing.get_cuda_rng_tracker()


def model_parallel_seed(seed: int, topology) -> None:
    """Seed the default generators with `seed` and the tensor-parallel stream per TP rank.

    Call once per rank, before building the model. `topology` is a megatron_neox.topology.Topology
    (only `tp_rank` is read). Resets the tracker, so calling it again reproduces the same masks.
    """
    seed = int(seed)  # numpy ints (e.g. from DeepSpeed's pipeline partitioning) are refused by torch
    tracker = get_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)                  # CPU and CUDA generators
    get_accelerator().manual_seed(seed)      # the accelerator's, when it is neither
    tracker.add(TENSOR_PARALLEL_RNG_NAME, seed + _TENSOR_PARALLEL_SEED_OFFSET + int(topology.tp_rank))


@contextlib.contextmanager
def tensor_parallel_rng():
    """Run the body (dropout on a TP-sharded activation) on this TP rank's own RNG stream."""
    tracker = get_rng_tracker()
    if TENSOR_PARALLEL_RNG_NAME not in tracker.get_states():
        raise RuntimeError("tensor_parallel_rng() used before model_parallel_seed(seed, topology): "
                           "seed the model-parallel RNG once per rank before building the model")
    with tracker.fork(TENSOR_PARALLEL_RNG_NAME):
        yield
