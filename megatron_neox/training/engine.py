"""Build the model and the DeepSpeed engine for a (pp, tp, dp) layout.

pp > 1: the layer list becomes a DeepSpeed `PipelineModule` over our topology's grid;
`deepspeed.initialize` gets no mpu (the PipelineModule brings its own grid) and our topology is
handed to `deepspeed.checkpointing.configure` only. pp = 1: a plain `GPTNeoX` module and our
topology as the mpu, so ZeRO 2/3 work too. The DeepSpeed config dict is emitted here from our config
(`deepspeed_config`): nobody maintains a second file.
"""
import copy
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from megatron_neox.config import Config
from megatron_neox.errors import ConfigError
from megatron_neox.model.gpt_neox import GPTNeoX, layer_specs, lm_loss
from megatron_neox.parallel.random import model_parallel_seed
from megatron_neox.topology import Topology
from megatron_neox.training.clipping import GlobalNormClipper
from megatron_neox.training.launch import check_trains_here


def build_model(cfg: Config, topo: Topology, checkpoint_fn=None, ds_config: Optional[Dict[str, Any]] = None,
                objective=None) -> torch.nn.Module:
    """The model for this rank: a PipelineModule stage (pp > 1) or the whole GPTNeoX (pp = 1).

    Built on this rank's device (each tensor-parallel layer keeps only its shard); under ZeRO-3
    inside `deepspeed.zero.Init`, so each parameter is partitioned as its module is built instead
    of the whole model first existing on every rank. `objective` (training/objectives.py) gives
    the pipeline's loss function; None is the pretraining loss.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        where = deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=topo)
    else:
        where = torch.device(get_accelerator().current_device_name())
    with where:
        return _build_model(cfg, topo, checkpoint_fn, objective)


def _build_model(cfg: Config, topo: Topology, checkpoint_fn=None, objective=None) -> torch.nn.Module:
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
        loss_fn=objective.loss if objective is not None else partial(lm_loss, tp_group=topo.tp_group),
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


def deepspeed_config(cfg: Config) -> Dict[str, Any]:
    """The DeepSpeed config dict of a resolved config (megatron_neox/resolve.py: the layout is
    attached, the ZeRO stage and overlap_comm concrete), merged with the `deepspeed` passthrough section."""
    lay, zero = cfg.resolved.layout, cfg.zero
    o = cfg.optimizer
    ds: Dict[str, Any] = {
        "train_batch_size": lay.global_batch_size,
        "train_micro_batch_size_per_gpu": lay.micro_batch_size,
        "gradient_accumulation_steps": lay.grad_accum,
        "optimizer": {
            "type": "AdamW" if o.type == "adamw" else "Adam",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        },
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {
            "stage": zero.stage,
            "reduce_bucket_size": cfg.zero.reduce_bucket_size,
            "allgather_bucket_size": cfg.zero.allgather_bucket_size,
            "overlap_comm": zero.overlap_comm,
            "contiguous_gradients": cfg.zero.contiguous_gradients,
        },
        # We print our own progress lines; DeepSpeed's would interleave with them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.zero.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if cfg.precision == "fp16":
        ls = cfg.loss_scale
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": ls.static_scale,
            "initial_scale_power": ls.initial_scale_power,
            "loss_scale_window": ls.window,
            "hysteresis": ls.hysteresis,
            "min_loss_scale": ls.min_scale,
        }
    elif cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if zero.stage >= 1:
            # Accumulate gradients in fp32 (bf16 accumulation loses small updates; gpt-neox users
            # reported pipeline + ZeRO-1 needs this key). DeepSpeed 0.19 rejects it without ZeRO.
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    ac = cfg.activation_checkpointing
    if ac.interval:
        ds["activation_checkpointing"] = {
            # At tp = 1 there is nothing to shard across, but DeepSpeed would still clone every
            # checkpointed layer input (a copy of the hidden state per layer per micro-batch).
            "partition_activations": ac.partition_activations and lay.tp > 1,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    return _deep_merge(ds, cfg.deepspeed)


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class BuiltEngine(NamedTuple):
    """What `build_engine` returns: the DeepSpeed engine, the module it wraps, and our gradient
    clipper when this configuration needs one (`GlobalNormClipper.needed`), else None."""

    engine: Any
    model: torch.nn.Module
    clipper: Optional[GlobalNormClipper]


def build_engine(cfg: Config, topo: Topology, objective=None) -> BuiltEngine:
    """The engine for this rank, from the config set-up resolved (training/launch.py `setup`). Pass
    the `objective` that train_step will get (training/objectives.py; None: the pretraining loss)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron_neox.precision import choose_adam

    check_trains_here(cfg)  # setup() has refused it already; again for callers that skip setup
    if cfg.activation_checkpointing.interval == "auto":
        raise ConfigError("activation_checkpointing.interval 'auto' is decided in set-up: build the engine from the "
                          "config training/launch.py `setup` returns")
    ds_config = deepspeed_config(cfg)
    for key, value in choose_adam(get_accelerator().device_name())[0].items():
        ds_config["optimizer"]["params"].setdefault(key, value)
    checkpoint_fn = None
    if cfg.activation_checkpointing.interval:
        deepspeed.checkpointing.configure(topo, deepspeed_config=ds_config)
        checkpoint_fn = deepspeed.checkpointing.checkpoint
    own_clip = GlobalNormClipper.needed(cfg)
    if own_clip:
        ds_config["gradient_clipping"] = 0.0
    model = build_model(cfg, topo, checkpoint_fn, ds_config, objective)
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
