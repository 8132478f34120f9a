"""Process set-up shared by the entry points."""
import os

import torch


def configure_threads() -> int:
    """Give each rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    The deepspeed launcher does not set OMP_NUM_THREADS, and N ranks each using every core
    oversubscribe the CPU (on GPUs this only affects data loading and host-side work).
    """
    if "OMP_NUM_THREADS" in os.environ:
        n = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")) or 1)
        n = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n
