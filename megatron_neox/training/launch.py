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
        # torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's per-node launcher LOCAL_SIZE.
        local = next((os.environ[k] for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
                      if os.environ.get(k, "").isdigit()), "1")
        try:
            cores = len(os.sched_getaffinity(0))  # respects cgroup/affinity limits (SLURM, taskset)
        except AttributeError:
            cores = os.cpu_count() or 1
        n = max(1, cores // max(1, int(local)))
    torch.set_num_threads(n)
    return n
