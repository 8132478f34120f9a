"""Build the model and the DeepSpeed engine for a (pp, tp, dp) layout.

pp > 1: the layer list becomes a DeepSpeed `PipelineModule` over our topology's grid;
`deepspeed.initialize` gets no mpu (the PipelineModule brings its own grid) and our topology is
handed to `deepspeed.checkpointing.configure` only. pp = 1: a plain `GPTNeoX` module and our
topology as the mpu, so ZeRO 2/3 work too.
"""
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from megatron_neox.config import Config
from megatron_neox.layout import Layout
from megatron_neox.model.gpt_neox import GPTNeoX, layer_specs, lm_loss
from megatron_neox.parallel.random import model_parallel_seed
from megatron_neox.topology import Topology
from megatron_neox.training.clipping import GlobalNormClipper


def check_precision_supported(cfg: Config) -> None:
    from megatron_neox.hardware import check_precision_supported as check

    check(cfg.precision)


def build_model(cfg: Config, topo: Topology, checkpoint_fn=None, ds_config: Optional[Dict[str, Any]] = None
                ) -> torch.nn.Module:
    """The model for this rank: a PipelineModule stage (pp > 1) or the whole GPTNeoX (pp = 1).

    Built on this rank's device (each tensor-parallel layer keeps only its shard); under ZeRO-3
    inside `deepspeed.zero.Init`, so each parameter is partitioned as its module is built instead
    of the whole model first existing on every rank.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        where = deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=topo)
    else:
        where = torch.device(get_accelerator().current_device_name())
    with where:
        return _build_model(cfg, topo, checkpoint_fn)


def _build_model(cfg: Config, topo: Topology, checkpoint_fn=None) -> torch.nn.Module:
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
            # ds_shape: under deepspeed.zero.Init a parameter's own data is an empty placeholder.
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class BuiltEngine(NamedTuple):
    """What `build_engine` returns: the DeepSpeed engine, the module it wraps, and our gradient
    clipper when this configuration needs one (`GlobalNormClipper.needed`), else None."""

    engine: Any
    model: torch.nn.Module
    clipper: Optional[GlobalNormClipper]


def build_engine(cfg: Config, topo: Topology, layout: Layout) -> BuiltEngine:
    """The engine for this rank; the DeepSpeed config is emitted from `cfg` on `layout`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron_neox.training.precision import choose_adam, resolve_for_world

    check_precision_supported(cfg)
    cfg = resolve_for_world(cfg, layout.world_size)  # zero.stage / overlap_comm 'auto' -> numbers
    if cfg.activation_checkpointing.interval == "auto":  # the trainer resolves it first (start-up line)
        from megatron_neox.plan import resolve_checkpoint_interval

        cfg, _ = resolve_checkpoint_interval(cfg, layout)
    ds_config = cfg.deepspeed_config(layout)
    for key, value in choose_adam(get_accelerator().device_name())[0].items():
        ds_config["optimizer"]["params"].setdefault(key, value)
    checkpoint_fn = None
    if cfg.activation_checkpointing.interval:
        deepspeed.checkpointing.configure(topo, deepspeed_config=ds_config)
        checkpoint_fn = deepspeed.checkpointing.checkpoint
    own_clip = GlobalNormClipper.needed(cfg)
    if own_clip:
        ds_config["gradient_clipping"] = 0.0
    model = build_model(cfg, topo, checkpoint_fn, ds_config)
    kwargs = {} if topo.pp > 1 else {"mpu": topo}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_config, **kwargs
    )
    clipper = GlobalNormClipper.install(engine, topo, cfg.optimizer.clip_grad) if own_clip else None
    if cfg.zero.stage == 0 and topo.dp == 1:
        # Nothing to average over one data-parallel rank; DeepSpeed would still flatten every
        # gradient into a temporary buffer and copy it back each step. (ZeRO >= 1 does its own
        # reduction through the optimizer and needs these calls.)
        engine.enable_backward_allreduce = False
        if topo.pp > 1:
            engine.pipeline_enable_backward_allreduce = False
    return BuiltEngine(engine, model, clipper)
