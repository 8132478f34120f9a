"""Global gradient-norm clipping for the engines DeepSpeed does not clip correctly (fp32 + ZeRO-0)."""
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_neox.config import Config
from megatron_neox.topology import Topology


class GlobalNormClipper:
    """Gradient clipping for fp32 + ZeRO-0, where DeepSpeed 0.19 reduces the norm over the tensor
    group only (under a pipeline each stage clips by its own norm), does not report it, and never
    checks for inf/nan.

    DeepSpeed calls the optimizer's `step` itself (inside `engine.step()`, and inside the pipeline
    engine's `train_batch`), so that call is the one place every engine kind passes through after
    the gradients are final: `install` wraps it. `build_engine` installs the clipper when
    `needed(cfg)` and hands it back; `train_step` reads the norm and skips from it.

    The wrapped step sums squared grads over this rank's parameters (TP-replicated
    ones counted on tp_rank 0 only; tied copies once), all-reduces over the pipe and tensor groups,
    clips every rank by the same global norm and skips the step when it is not finite.
    """

    def __init__(self, engine, topo: Topology, max_norm: float):
        self.engine, self.topo, self.max_norm = engine, topo, max_norm
        self.last_norm: Optional[float] = None
        self.skipped = 0
        self._step = None

    @staticmethod
    def needed(cfg: Config) -> bool:
        """fp32 without ZeRO: DeepSpeed's own clipping is per stage under a pipeline, unreported at
        pp=1 and never checks for inf/nan (it is turned off in the DeepSpeed config then)."""
        return cfg.zero.stage == 0 and cfg.precision == "fp32"

    @classmethod
    def install(cls, engine, topo: Topology, max_norm: float) -> "GlobalNormClipper":
        """Route `engine.optimizer.step` through the clipper; returns it."""
        clipper = cls(engine, topo, max_norm)
        clipper._step = engine.optimizer.step
        engine.optimizer.step = clipper.step
        return clipper

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
