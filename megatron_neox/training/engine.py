"""Build the model and the DeepSpeed engine for a (pp, tp, dp) layout.

pp > 1: the layer list becomes a DeepSpeed `PipelineModule` over our topology's grid;
`deepspeed.initialize` gets no mpu (the PipelineModule brings its own grid) and our topology is
handed to `deepspeed.checkpointing.configure` only. pp = 1: a plain `GPTNeoX` module and our
topology as the mpu, so ZeRO 2/3 work too.
"""
import math
import os
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_neox.config import Config, ConfigError
from megatron_neox.model.gpt_neox import GPTNeoX, layer_specs, lm_loss
from megatron_neox.parallel.random import model_parallel_seed
from megatron_neox.topology import Topology, validate_layout


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
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_topology(cfg: Config) -> Topology:
    """Join the world (if not yet) and build the validated (pipe, data, model) grid."""
    init_distributed()
    world = dist.get_world_size()
    m = cfg.model
    validate_layout(world, cfg.parallel.pp, cfg.parallel.tp, num_layers=m.num_layers,
                    num_heads=m.num_attention_heads, vocab_size=m.padded_vocab(cfg.parallel.tp),
                    zero_stage=cfg.zero.stage)
    cfg.layout(world)  # batch identity errors before any group is made
    return Topology(cfg.parallel.pp, cfg.parallel.tp)


def check_precision_supported(cfg: Config) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if cfg.precision == "fp16" and not acc.is_fp16_supported():
        raise ConfigError(
            f"precision='fp16' is not supported on the {acc.device_name()} accelerator; "
            "use precision=fp32 (or bf16 where supported)"
        )
    if cfg.precision == "bf16" and not acc.is_bf16_supported():
        raise ConfigError(f"precision='bf16' is not supported on the {acc.device_name()} accelerator; use fp32")


def build_model(cfg: Config, topo: Topology, checkpoint_fn=None) -> torch.nn.Module:
    """The model for this rank: a PipelineModule stage (pp > 1) or the whole GPTNeoX (pp = 1)."""
    m, seed = cfg.model, cfg.train.seed
    model_parallel_seed(seed, topo)
    padded = m.padded_vocab(topo.tp)
    sp = cfg.parallel.sequence_parallel
    interval = cfg.activation_checkpointing.interval
    if topo.pp == 1:
        return GPTNeoX(m, padded, topo.tp_group, sp, seed=seed, checkpoint_interval=interval,
                       checkpoint_fn=checkpoint_fn)
    from deepspeed.pipe import PipelineModule

    return PipelineModule(
        layers=layer_specs(m, padded, topo.tp_group, sp, seed=seed),
        loss_fn=partial(lm_loss, tp_group=topo.tp_group),
        topology=topo.topo,
        partition_method=cfg.parallel.partition_method,
        activation_checkpoint_interval=interval,
        activation_checkpoint_func=checkpoint_fn,
        # Only transformer layers are recomputed: the embedding's input (token ids) needs no grad,
        # which DeepSpeed's re-entrant checkpoint cannot handle.
        checkpointable_layers=["TransformerLayerPipe"],
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices only: biases and norm gains (all 1-D) are not decayed (GPT-3)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _GlobalNormClipper:
    """Gradient clipping for fp32 + ZeRO-0, where DeepSpeed 0.19 reduces the norm over the tensor
    group only (under a pipeline each stage clips by its own norm), does not report it, and never
    checks for inf/nan.

    Wraps the optimizer's `step`: sums squared grads over this rank's parameters (TP-replicated
    ones counted on tp_rank 0 only; tied copies once), all-reduces over the pipe and tensor groups,
    clips every rank by the same global norm and skips the step when it is not finite.
    """

    def __init__(self, engine, topo: Topology, max_norm: float):
        self.engine, self.topo, self.max_norm = engine, topo, max_norm
        self.last_norm: Optional[float] = None
        self.skipped = 0
        opt = engine.optimizer
        self._step = opt.step
        opt.step = self.step

    def _params(self):
        seen = set()
        for group in self.engine.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if getattr(p, "model_parallel", False) or self.topo.tp_rank == 0:
                    yield p

    def step(self, *args, **kwargs):
        # On the accelerator: NCCL reduces device tensors only, and grads live there.
        sq = torch.zeros(1, dtype=torch.float64, device=self.engine.device)
        for p in self._params():
            # DeepSpeed marks the non-owner copies of a tied weight (embedding/head on two stages).
            if not getattr(p, "ds_pipe_replicated", False):
                sq += _sum_of_squares(p.grad.detach())
        for group in (self.topo.pp_group, self.topo.tp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        total = sq.item()
        norm = math.sqrt(total) if math.isfinite(total) else float("inf")
        self.last_norm = norm
        if not math.isfinite(norm):
            self.skipped += 1
            for group in self.engine.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return None
        if self.max_norm > 0 and norm > self.max_norm:
            coef = self.max_norm / (norm + 1e-6)
            for group in self.engine.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return self._step(*args, **kwargs)


def _sum_of_squares(g: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """sum(g**2) accumulated in float64, a chunk at a time: exact enough that every layout
    reports the same norm (fp32 reductions differ by ~1e-4 between layouts on CPU), without a
    float64 copy of the whole gradient."""
    flat = g.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for start in range(0, flat.numel(), chunk):
        c = flat[start:start + chunk].double()
        total += torch.dot(c, c)
    return total


def build_engine(cfg: Config, topo: Topology, world_size: Optional[int] = None):
    """(engine, model) for this rank; the DeepSpeed config is emitted from `cfg`."""
    import deepspeed

    check_precision_supported(cfg)
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    ds_config = cfg.deepspeed_config(world)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed would compile its fused Adam for the CPU at start-up; torch's AdamW is as fast
        # here and needs no build. On GPUs DeepSpeed's fused kernel stays the default.
        ds_config["optimizer"]["params"].setdefault("torch_adam", True)
        # torch's fused CPU AdamW: ~5x faster than its per-parameter loop (measured by
        # benchmarks/parallel_overhead.py), same results to 1 ulp.
        ds_config["optimizer"]["params"].setdefault("fused", True)
    checkpoint_fn = None
    if cfg.activation_checkpointing.interval:
        deepspeed.checkpointing.configure(topo, deepspeed_config=ds_config)
        checkpoint_fn = deepspeed.checkpointing.checkpoint
    # fp32 without ZeRO: DeepSpeed's norm is per stage under a pipeline, is not reported at pp=1,
    # and inf/nan is never checked. Our clipper does all three right at every layout.
    own_clip = cfg.zero.stage == 0 and cfg.precision == "fp32"
    if own_clip:
        ds_config["gradient_clipping"] = 0.0
    model = build_model(cfg, topo, checkpoint_fn)
    kwargs = {} if topo.pp > 1 else {"mpu": topo}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_config, **kwargs
    )
    engine.neox_clipper = _GlobalNormClipper(engine, topo, cfg.optimizer.clip_grad) if own_clip else None
    if cfg.zero.stage == 0 and topo.dp == 1:
        # Nothing to average over one data-parallel rank; DeepSpeed would still flatten every
        # gradient into a temporary buffer and copy it back each step. (ZeRO >= 1 does its own
        # reduction through the optimizer and needs these calls.)
        engine.enable_backward_allreduce = False
        if topo.pp > 1:
            engine.pipeline_enable_backward_allreduce = False
    return engine, model
