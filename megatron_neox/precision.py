"""Precision and ZeRO rules: which combinations train correctly, which stage `auto` picks, which
Adam runs. Beside the config, below it: the config's validator runs `precision_problems` (a `cfg`
here is a `megatron_neox.config.Config`), and the engine and the planner read the same decisions.

What DeepSpeed 0.19.8 does (read in runtime/engine.py, reproduced on CPU with the fp16 check patched):

- Without ZeRO, fp16 runs `FP16_Optimizer`, but `engine.backward` multiplies the loss by the loss
  scale only for ZeRO optimizers, while `FP16_Optimizer.step` still divides the gradients by it:
  updates come out ~scale times too small, no overflow is ever seen and the scale grows without
  bound. bf16 without ZeRO accumulates gradients in bf16 (at pp = 1 through the same optimizer,
  which also takes a dummy Adam step at construction). Neither can be fixed from outside without
  replacing DeepSpeed's optimizer, so both are refused: ZeRO-1 is the mixed-precision optimizer
  (fp32 master weights, fp32 gradient accumulation, a loss-scaled backward, a true grad norm), and
  at one data-parallel rank it shards nothing and needs no more memory.
- fp32 at one data-parallel rank: ZeRO-1 shards nothing and only copies gradients through its
  buckets (`benchmarks/parallel_overhead.py --part a`: 0.84x Hugging Face's step at ZeRO-1 vs 1.19x
  at ZeRO-0 on one CPU rank), so `auto` picks ZeRO-0 there (with our global-norm clipper).
- `overlap_comm` works at ZeRO 1-3 without a pipeline (the pipeline engine turns it off with a
  warning); it only pays off with more than one data-parallel rank, where it overlaps the gradient
  reduction with the backward pass at the cost of a second reduce bucket.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

AUTO = "auto"


def zero_problems(stage, pp: int) -> List[str]:
    """A ZeRO stage (or 'auto') that cannot run with `pp` pipeline stages."""
    if stage == AUTO:
        return []  # auto_zero_stage picks 0 or 1, both fine at any pp
    if stage not in (0, 1, 2, 3):
        return [f"zero.stage must be 0, 1, 2 or 3, got {stage!r}"]
    if stage >= 2 and pp > 1:
        return [f"zero.stage={stage} cannot be used with parallel.pp={pp}: DeepSpeed's pipeline engine supports "
                "ZeRO stages 0 and 1 only; use zero.stage 1 or pp 1"]
    return []


def precision_problems(cfg) -> List[str]:
    """Combinations of precision, ZeRO and parallelism that cannot train correctly, each with the fix."""
    stage, prec = cfg.zero.stage, cfg.precision
    problems = zero_problems(stage, cfg.parallel.pp)
    if prec != "fp32" and stage == 0:
        why = ("DeepSpeed's optimizer without ZeRO never multiplies the loss by the loss scale but still "
               "divides the gradients by it (updates ~scale times too small, the scale grows without bound)"
               if prec == "fp16" else
               "DeepSpeed without ZeRO accumulates the gradients in bf16 and its bf16 optimizer takes a dummy "
               "step at construction")
        problems.append(
            f"precision={prec} with zero.stage=0 is refused: {why}. Use zero.stage=1 (or 'auto'): it keeps fp32 "
            "master weights and gradients, and at one data-parallel rank it shards nothing")
    ac, p = cfg.activation_checkpointing, cfg.parallel
    if p.sequence_parallel and p.tp > 1 and ac.interval and ac.partition_activations:
        problems.append(
            "activation_checkpointing.partition_activations=true with parallel.sequence_parallel=true is refused: "
            "DeepSpeed splits each checkpointed input across the tensor-parallel ranks assuming they all hold the "
            "same activation, but under sequence parallelism each holds a different slice of the sequence (wrong "
            "gradients; Megatron refuses it too). Sequence parallelism already shards those activations by tp: "
            "set activation_checkpointing.partition_activations=false")
    if stage == 0 and cfg.zero.offload_optimizer != "none":
        problems.append("zero.offload_optimizer needs zero.stage >= 1 (or 'auto')")
    return problems


def auto_zero_stage(cfg, dp: int) -> Tuple[int, str]:
    """The ZeRO stage `zero.stage='auto'` runs on `dp` data-parallel ranks, and why (for the
    start-up line). The one place the stage is chosen; megatron_neox/resolve.py asks it once."""
    if cfg.precision != "fp32":
        return 1, f"auto: {cfg.precision} needs the ZeRO optimizer's fp32 master weights"
    if cfg.zero.offload_optimizer != "none":
        return 1, "auto: optimizer offload"
    if dp == 1 and loads_universal(cfg):
        return 1, "auto: checkpoint.load is universal, whose optimizer state only ZeRO loads"
    if dp == 1:
        return 0, "auto: one data-parallel rank, nothing to shard"
    return 1, f"auto: {dp} data-parallel ranks"


def loads_universal(cfg) -> bool:
    """checkpoint.load names a universal checkpoint (tools/reshard.py). DeepSpeed 0.19.8 loads its
    optimizer state through the ZeRO optimizer only: at ZeRO-0 the load fails inside DeepSpeed
    (`'NoneType' object has no attribute 'copy'`). A missing or damaged one is left to the loader,
    which names it."""
    from megatron_neox.checkpoint_files import read_meta, resolve_tag_dir
    from megatron_neox.errors import CheckpointError

    if not cfg.checkpoint.load:
        return False
    try:
        return bool(read_meta(resolve_tag_dir(cfg.checkpoint.load)).get("universal"))
    except (CheckpointError, OSError):
        return False


def auto_overlap_comm(stage: int, pp: int, dp: int) -> Tuple[bool, str]:
    """`zero.overlap_comm=null`: on where DeepSpeed allows it and there is a reduction to overlap."""
    on = stage >= 1 and pp == 1 and dp > 1
    return on, "auto: " + ("ZeRO >= 1, no pipeline, dp > 1" if on else "nothing to overlap or not allowed here")


def choose_adam(device_type: str) -> tuple[Dict[str, Any], str]:
    """Extra DeepSpeed optimizer params and a description of the Adam that will run.

    DeepSpeed's own FusedAdam is JIT-compiled with nvcc at the first `deepspeed.initialize` unless
    the wheel was built with it (DS_BUILD_FUSED_ADAM=1; `ds_report` lists it under installed ops).
    A PyPI CUDA torch usually has no toolkit, so we take DeepSpeed's kernel only when it is prebuilt
    and torch's fused AdamW otherwise (one multi-tensor kernel on CUDA; on CPU ~5x faster than the
    per-parameter loop, measured by benchmarks/parallel_overhead.py, same results to 1 ulp).
    """
    if device_type == "cuda" and fused_adam_prebuilt():
        return {}, "DeepSpeed FusedAdam (prebuilt)"
    return {"torch_adam": True, "fused": True}, "torch fused AdamW"


def fused_adam_prebuilt() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam", False))
