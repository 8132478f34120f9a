"""The config resolved once for a world: every `auto` decided, the layout attached.

`resolve(cfg, world_size)` runs in set-up (training/launch.py `setup`, plan.py) and returns the
config every component then reads: immutable (config.py `Section`), with concrete values where the
file said `auto`/null, and `cfg.resolved` holding the `Layout` and each decision with its reason
(the start-up line prints them; a checkpoint records the resolved config, so it says what ran).

Adding an `auto` decision is one function: `def decide_x(cfg, layout) -> List[Decision]` (return []
when the key is not `auto`), appended to `DECISIONS`. Decisions run in order and each sees the
config with the earlier ones applied (overlap_comm depends on the chosen ZeRO stage); the result is
validated again as a whole, so a decision cannot produce a combination the validator refuses. A
decision that needs a layer above this one comes in through `extra`, after `DECISIONS`: the
planner's `activation_checkpointing.interval` (plan.py `decide_checkpoint_interval`, from its memory
estimate of the layout), which training set-up and the planner pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

from megatron_neox.config import Config, config_from_dict
from megatron_neox.errors import ConfigError
from megatron_neox.hardware import regional_compile_ok
from megatron_neox.layout import Layout
from megatron_neox.precision import AUTO, auto_overlap_comm, auto_zero_stage, choose_adam


@dataclass(frozen=True)
class Decision:
    key: str    # dotted config key, e.g. "zero.stage"
    value: Any  # what it became
    why: str    # for the start-up line, e.g. "auto: one data-parallel rank, nothing to shard"


@dataclass(frozen=True)
class Resolution:
    """What `resolve` attached to the config: the layout on this world and the decisions taken."""

    world_size: int
    layout: Layout
    decisions: Tuple[Decision, ...]

    def why(self, key: str) -> str:
        return next((d.why for d in self.decisions if d.key == key), "set")


def decide_zero_stage(cfg: Config, layout: Layout) -> List[Decision]:
    if cfg.zero.stage != AUTO:
        return []
    stage, why = auto_zero_stage(cfg, layout.dp)
    return [Decision("zero.stage", stage, why)]


def decide_overlap_comm(cfg: Config, layout: Layout) -> List[Decision]:
    if cfg.zero.overlap_comm is not None:
        return []
    on, why = auto_overlap_comm(cfg.zero.stage, layout.pp, layout.dp)
    return [Decision("zero.overlap_comm", on, why)]


def auto_compile(device_type: str, *, dropout: bool, zero3: bool) -> Tuple[bool, str]:
    """The one place `model.compile='auto'` is decided: compiled on CUDA (Inductor's GPU kernels
    fuse the layer's elementwise work), eager on CPU (compilation takes minutes on a few cores and
    buys little), and eager where config.compile_problems refuses `true` (dropout, ZeRO-3, torch < 2.5)."""
    if device_type != "cuda":
        return False, f"auto: eager on {device_type}"
    if dropout:
        return False, "auto: eager (dropout > 0)"
    if zero3:
        return False, "auto: eager (ZeRO-3 gathers parameters inside the forward)"
    if not regional_compile_ok():
        import torch

        return False, f"auto: eager (torch {torch.__version__} < 2.5 would compile every layer separately)"
    return True, "auto: regional torch.compile on cuda"


def decide_compile(cfg: Config, layout: Layout) -> List[Decision]:
    if cfg.model.compile != AUTO:
        return []
    from deepspeed.accelerator import get_accelerator

    m = cfg.model
    on, why = auto_compile(get_accelerator().device_name(), dropout=m.hidden_dropout > 0 or m.attention_dropout > 0,
                           zero3=cfg.zero.stage == 3)
    return [Decision("model.compile", on, why)]


Decide = Callable[[Config, Layout], List[Decision]]
DECISIONS: Tuple[Decide, ...] = (decide_zero_stage, decide_overlap_comm, decide_compile)


def with_values(cfg: Config, values: Dict[str, Any]) -> Config:
    """A new, validated config: `cfg` with dotted keys set ('zero.stage': 1)."""
    data = cfg.model_dump(mode="python")
    for key, value in values.items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    return config_from_dict(data, source="resolved config")


def resolve(cfg: Config, world_size: int, extra: Sequence[Decide] = ()) -> Config:
    """`cfg` for `world_size` ranks with every `auto` decided (DECISIONS, then `extra`) and the layout
    attached (`cfg.resolved`). A config already resolved for this world comes back as it is;
    ConfigError if the layout does not fit."""
    if cfg.is_resolved:
        if cfg.resolved.world_size != world_size:
            raise ConfigError(f"config resolved for {cfg.resolved.world_size} ranks, used on {world_size}")
        return cfg
    layout = cfg.layout(world_size)
    taken: List[Decision] = []
    for decide in (*DECISIONS, *extra):
        found = decide(cfg, layout)
        if found:
            cfg = with_values(cfg, {d.key: d.value for d in found})
            taken += found
    cfg = cfg.model_copy()  # this object alone carries the resolution
    cfg._resolution = Resolution(world_size, cfg.layout(world_size), tuple(taken))
    return cfg


def describe_setup(cfg: Config) -> str:
    """For the start-up line: the ZeRO stage (and why, when `auto` chose it) and the Adam that runs."""
    from deepspeed.accelerator import get_accelerator

    compiled = f"compiled layers ({cfg.resolved.why('model.compile')})" if cfg.model.compile else \
        f"eager layers ({cfg.resolved.why('model.compile')})"
    return (f"ZeRO-{cfg.zero.stage} ({cfg.resolved.why('zero.stage')}) | {compiled} | "
            f"{choose_adam(get_accelerator().device_name())[1]}")
