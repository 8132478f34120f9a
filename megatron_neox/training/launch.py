"""Process set-up shared by the entry points: threads, joining the world, the layout and grid.

`setup(cfg)` is the one place a rank joins torch.distributed (however it was started), resolves
the config once for the world (the `Layout` attached, every `auto` decided), checks that this
machine can train it (`check_trains_here`) and builds its `Topology` from it; the trainer, the
tests and the benchmarks call it before building an engine.
"""
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_neox.config import Config
from megatron_neox.ranks import free_port
from megatron_neox.resolve import resolve
from megatron_neox.topology import Topology


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


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join the world however the ranks were started: the deepspeed launcher or torchrun (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), or `srun` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;
    the master is the first host of the job unless MASTER_ADDR is set)."""
    import deepspeed
    from datetime import timedelta

    if dist.is_initialized():  # e.g. by a test harness: let DeepSpeed's comm layer adopt it
        deepspeed.init_distributed()
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _first_slurm_host()
        # Per job, so two jobs sharing a node do not collide.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    bind_local_device()  # before the process group: NCCL binds it to cuda:LOCAL_RANK
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))


def bind_local_device() -> Optional[int]:
    """Pick this rank's GPU and make it current, before the process group exists; None without GPUs.

    DeepSpeed builds NCCL's process group with `device_id=cuda:LOCAL_RANK`. Under `srun` with
    per-task binding (`--gpus-per-task=1`, `--gpu-bind=single:1`) every task sees one GPU as cuda:0
    while SLURM_LOCALID (our LOCAL_RANK) counts the node's tasks: LOCAL_RANK = 3 would name a device
    that does not exist. The device is LOCAL_RANK modulo the visible devices, written back to
    LOCAL_RANK so DeepSpeed's engine and process group use the same one.
    """
    if not torch.cuda.is_available():
        return None
    visible = torch.cuda.device_count()
    device = int(os.environ.get("LOCAL_RANK", "0")) % visible
    os.environ["LOCAL_RANK"] = str(device)
    torch.cuda.set_device(device)
    return device


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # No scontrol (e.g. a test outside SLURM): a plain single host name is usable as is.
        return nodelist.split(",")[0]


def check_trains_here(cfg: Config) -> None:
    """ConfigError when this machine's accelerator cannot train `cfg`: its precision, or an attention
    kernel with no backward here (megatron_neox/hardware.py). Not part of `resolve`, which also
    serves plan.py, where the machine that plans is not the one that trains."""
    from megatron_neox.hardware import check_attention_kernel_trains, check_precision_supported

    check_precision_supported(cfg.precision)
    check_attention_kernel_trains(cfg.model.attention_kernel)


def setup(cfg: Config) -> Tuple[Config, Topology]:
    """Join the world (if not yet), resolve the config on it (megatron_neox/resolve.py: every layout
    error before any group is made, every 'auto' decided), refuse what this machine cannot train
    (before any data or model work) and build this rank's grid. Returns the resolved config, which
    every component is built from, and the grid."""
    from megatron_neox.plan import decide_checkpoint_interval

    init_distributed()
    cfg = resolve(cfg, dist.get_world_size(), extra=(decide_checkpoint_interval,))
    check_trains_here(cfg)
    return cfg, Topology.from_layout(cfg.resolved.layout)
