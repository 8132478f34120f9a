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
    engine's `train_batch`, which runs the whole schedule, optimizer step included), so that call is
    the one place every engine kind passes through after the gradients are final. `install`
    registers `clip` as the optimizer's step pre-hook (torch's `register_step_pre_hook`, not a
    replaced method); `build_engine` installs the clipper when `needed(cfg)` and hands it back, and
    `train_step` passes it in and reads the norm and the skip from it (`StepResult`).

    `clip` sums squared grads over this rank's parameters (TP-replicated ones counted on tp_rank 0
    only; tied copies once), all-reduces over the pipe and tensor groups, and clips every rank by
    the same global norm; when the norm is not finite it drops every gradient, so the optimizer
    (torch's AdamW, DeepSpeed's FusedAdam: parameters without a gradient are left alone, their
    moments and step count too) changes nothing and the step counts as skipped.
    """

    def __init__(self, engine, topo: Topology, max_norm: float):
        self.engine, self.topo, self.max_norm = engine, topo, max_norm
        self.last_norm: Optional[float] = None
        self.skipped = 0

    @staticmethod
    def needed(cfg: Config) -> bool:
        """fp32 without ZeRO: DeepSpeed's own clipping is per stage under a pipeline, unreported at
        pp=1 and never checks for inf/nan (it is turned off in the DeepSpeed config then)."""
        return cfg.zero.stage == 0 and cfg.precision == "fp32"

    @classmethod
    def install(cls, engine, topo: Topology, max_norm: float) -> "GlobalNormClipper":
        """Clip before every step of `engine.optimizer` (a step pre-hook); returns the clipper."""
        clipper = cls(engine, topo, max_norm)
        engine.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: clipper.clip())
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

    def clip(self) -> None:
        """Measure the global gradient norm, then clip the gradients by it or, when it is not
        finite, drop them (the step then changes nothing)."""
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
            return
        if self.max_norm > 0 and norm > self.max_norm:
            coef = self.max_norm / (norm + 1e-6)
            for group in self.engine.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)


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
