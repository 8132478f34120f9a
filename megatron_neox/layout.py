"""The parallel layout of a run: every rule about (world size, pp, tp, dp, batch) in one place.

`Layout.from_config(cfg, world_size)` is the one validated object (torchtitan's `ParallelDims`
plays this part there) that the process grid (`Topology.from_layout`), the DeepSpeed config, the
batch schedule and the planning tools are built from. The rules that do not depend on the world
size (heads, MLP width and vocab divisible by tp, a layer per stage, sequence length under
sequence parallelism) are `split_problems`, which the config validator
runs as soon as a config is read, so a bad config fails before any rank starts.

Messages name the config keys, the numbers and a fix. A `cfg` here is a `megatron_neox.config.Config`;
this module sits below config.py (which builds its `Layout` from here) and does not import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron_neox.errors import ConfigError


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def data_parallel_size(world_size: int, pp: int, tp: int) -> int:
    """world_size / (pp * tp), refusing a world that the grid does not tile."""
    _check_positive_ints(world_size=world_size, pp=pp, tp=tp)
    if world_size % (pp * tp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by pp * tp = {pp} * {tp} = {pp * tp}: "
            f"launch a multiple of {pp * tp} ranks or change parallel.pp/parallel.tp")
    return world_size // (pp * tp)


def split_problems(*, pp: int, tp: int, num_layers: int, num_heads: int, ffn_size: Optional[int] = None,
                   padded_vocab: Optional[int] = None, vocab_multiple: int = 128,
                   seq_length: Optional[int] = None, sequence_parallel: bool = False) -> List[str]:
    """What keeps this model from being split pp x tp ways (any world size); [] when it can be."""
    problems = []
    if num_heads % tp:
        problems.append(
            f"model.num_attention_heads={num_heads} is not divisible by parallel.tp={tp}: every tensor-parallel "
            f"rank must hold whole attention heads; use a tp that divides {num_heads}")
    if ffn_size is not None and ffn_size % tp:
        problems.append(f"MLP width {ffn_size} is not divisible by parallel.tp={tp}")
    if padded_vocab is not None and padded_vocab % tp:
        problems.append(
            f"padded vocab {padded_vocab} is not divisible by parallel.tp={tp}: the embedding and output layer "
            f"split the vocabulary evenly; pad it to a multiple of model.make_vocab_size_divisible_by * tp = "
            f"{vocab_multiple} * {tp} = {vocab_multiple * tp} (leave model.padded_vocab_size unset to get that)")
    if pp > num_layers:
        problems.append(
            f"parallel.pp={pp} is more pipeline stages than the model.num_layers={num_layers} transformer layers: "
            f"a stage needs at least one layer; use pp <= {num_layers}")
    if sequence_parallel and seq_length is not None and seq_length % tp:
        problems.append(f"sequence parallelism needs model.seq_length={seq_length} divisible by parallel.tp={tp}")
    return problems


def validate_layout(world_size: int, pp: int, tp: int, *, num_layers: int, num_heads: int,
                    padded_vocab: Optional[int] = None, **shape) -> int:
    """Check that a (world size, pp, tp) layout can run a model of this shape (the keywords of
    `split_problems`); return dp. ConfigError with the first problem."""
    _check_positive_ints(num_layers=num_layers, num_heads=num_heads, pp=pp, tp=tp)
    if padded_vocab is not None:
        _check_positive_ints(padded_vocab=padded_vocab)
    problems = split_problems(pp=pp, tp=tp, num_layers=num_layers, num_heads=num_heads, padded_vocab=padded_vocab,
                              **shape)
    if problems:
        raise ConfigError(problems[0])
    return data_parallel_size(world_size, pp, tp)


def _config_shape(cfg) -> Dict[str, Any]:
    """The `split_problems` keywords of a config."""
    m, p = cfg.model, cfg.parallel
    return dict(pp=p.pp, tp=p.tp, num_layers=m.num_layers, num_heads=m.num_attention_heads, ffn_size=m.ffn_size,
                padded_vocab=m.padded_vocab(p.tp), vocab_multiple=m.make_vocab_size_divisible_by, seq_length=m.seq_length,
                sequence_parallel=p.sequence_parallel)


def config_split_problems(cfg) -> List[str]:
    """`split_problems` for a whole config (what its validator runs)."""
    return split_problems(**_config_shape(cfg))


@dataclass(frozen=True)
class Layout:
    """What a config becomes on a given number of ranks."""

    pp: int
    tp: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    padded_vocab: int

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "Layout":
        """Data-parallel size and batch identity for `world_size` ranks; ConfigError if it does not fit."""
        t = cfg.train
        dp = validate_layout(world_size, **_config_shape(cfg))
        per_step = t.micro_batch_size * dp
        if t.global_batch_size is not None:
            if t.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"micro_batch_size*dp = {t.micro_batch_size}*{dp} = {per_step}"
                )
            gas = t.global_batch_size // per_step
            if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps != gas:
                raise ConfigError(
                    f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} disagrees with "
                    f"global_batch_size/(micro*dp) = {gas} at dp={dp}; set only one of them"
                )
        else:
            gas = t.gradient_accumulation_steps or 1
        return cls(pp=cfg.parallel.pp, tp=cfg.parallel.tp, dp=dp, micro_batch_size=t.micro_batch_size, grad_accum=gas,
                   global_batch_size=per_step * gas, padded_vocab=cfg.model.padded_vocab(cfg.parallel.tp))
