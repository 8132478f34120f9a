"""Save and load training checkpoints: DeepSpeed's engine files plus our client state and RNG states.

The directory layout, `latest` and the completion marker are the checkpoint file format
(megatron_neox/checkpoint_files.py). Every file is written to a temporary name, fsynced and renamed
(training/writer.py), in the training thread or, with checkpoint.async_save, in a background
writer; `finalize_tag` writes complete.json and then `latest` only once every rank's files are on
disk. A crash at any moment of a save (even kill -9 or a power loss) leaves no complete.json and an
unchanged `latest`, so the run resumes from the previous checkpoint. A damaged checkpoint is
reported by name and resuming falls back to the newest older checkpoint that is intact.
"""
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_neox.checkpoint_files import (CLIENT_KEY, COMPLETE, LATEST, complete_tags, read_latest, read_meta, tag_of,
                                            verify_contents, verify_files, verify_manifest, write_latest, write_meta)
from megatron_neox.config import Config
from megatron_neox.durable import fsync_dir
from megatron_neox.errors import CheckpointError, CheckpointMismatch
from megatron_neox.topology import Topology
from megatron_neox.training.writer import DurableWriter, naming_failures, write_failure

# Model-shape fields that must agree between a checkpoint and the run that loads it.
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
               "activation", "norm", "position_embedding", "tie_embeddings", "attention_bias", "mlp_bias",
               "shared_norm", "rotary_dims", "rotary_pct", "num_kv_heads")


def universal_checkpoint_info(cfg: Config, padded_vocab: int) -> Dict[str, Any]:
    """What DeepSpeed's ds_to_universal needs to merge and re-split our parameters: the sharding
    table (parallel/sharding.py) as regexes over the engine's parameter names. Tensors in no list
    (column-parallel QKV, h->4h) are split on dim 0, DeepSpeed's default."""
    from deepspeed.checkpoint import constants as C

    from megatron_neox.parallel.sharding import universal_patterns
    from megatron_neox.model.gpt_neox import state_dict_shapes

    m = cfg.model
    pat = universal_patterns(m, state_dict_shapes(m, padded_vocab), cfg.parallel.tp)
    info = {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: pat["replicated"],
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: pat["row_parallel"],
        C.VOCABULARY_PARAMETER_PATTERNS: pat["vocabulary"],
        # Rows beyond this are padding; the padded size is kept so a reshard at the same padding
        # changes nothing.
        "original_vocab_size": padded_vocab,
    }
    if m.tie_embeddings:  # the head is the embedding, held by the first and the last stage
        info[C.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = [p for p in pat["vocabulary"] if "word_embeddings" in p]
    if pat["fused_swiglu"]:
        info[C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = pat["fused_swiglu"]
    return info


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    from megatron_neox.parallel.random import get_rng_tracker

    # Only tensors, ints, floats and strings, so loading needs no pickle (weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron_neox.parallel.random import get_rng_tracker

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class PendingSave:
    """A checkpoint whose files are handed to the writers; `finalize_tag` declares it complete."""

    ckpt_dir: Path
    tag: str
    meta: Dict[str, Any]


def use_durable_writer(engine, background: bool) -> DurableWriter:
    """Make `engine` write its checkpoint files through a DurableWriter (see training/writer.py)."""
    writer = DurableWriter(background)
    engine.checkpoint_engine = writer
    return writer


def begin_save(engine, cfg: Config, topo: Topology, ckpt_dir: os.PathLike, state: Dict[str, Any]) -> PendingSave:
    """Hand this rank's files of a checkpoint of `engine` with our client `state` (iteration,
    consumed samples, ...) to the engine's checkpoint writer. Every rank calls it."""
    ckpt_dir = Path(ckpt_dir)
    iteration = int(state["iteration"])
    tag = tag_of(iteration)
    padded = cfg.model.padded_vocab(topo.tp)
    if _rank0():
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            stale = ckpt_dir / tag
            if stale.exists():  # an earlier crashed save of the same step: start it afresh
                shutil.rmtree(stale)
        except OSError as e:  # reported with every rank's writer state (the others are at the barrier)
            engine.checkpoint_engine.fail(write_failure(ckpt_dir / tag, e, "preparing the checkpoint directory"))
    _barrier()
    # The resolved config (every 'auto' decided: megatron_neox/resolve.py) is what ran.
    state = {**state, "config": cfg.to_dict()}
    client = {CLIENT_KEY: state, "universal_checkpoint_info": universal_checkpoint_info(cfg, padded)}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.checkpoint_engine.save(_rng_state(), str(ckpt_dir / tag / f"rng_state_{rank}.pt"))
    meta = {"iteration": iteration, "layout": {"pp": topo.pp, "tp": topo.tp, "dp": topo.dp},
            "model": cfg.model.model_dump(mode="json"), "padded_vocab": padded, "config": state["config"],
            "data_setup": data_setup(cfg)}
    return PendingSave(ckpt_dir, tag, meta)


def finalize_tag(pending: PendingSave, keep_last: Optional[int]) -> Path:
    """Declare a checkpoint complete; rank 0 only, once every rank's files are durable: complete.json,
    then `latest` (each durable before the next), then checkpoints beyond `keep_last` are removed."""
    ckpt_dir, tag = pending.ckpt_dir, pending.tag
    with naming_failures(ckpt_dir / tag / COMPLETE):
        fsync_dir(ckpt_dir / tag)
        write_meta(ckpt_dir / tag, pending.meta)
    with naming_failures(ckpt_dir / LATEST):
        write_latest(ckpt_dir, tag)
    if keep_last:
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            # The marker goes first: a crash mid-removal leaves a partial checkpoint, never one
            # that claims to be complete.
            with naming_failures(ckpt_dir / old / COMPLETE, "removing an old checkpoint (keep_last)"):
                (ckpt_dir / old / COMPLETE).unlink()
                fsync_dir(ckpt_dir / old)
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    return ckpt_dir / tag


def _verify_contents_on_all_ranks(tag_dir: Path) -> Optional[str]:
    """`verify_contents` for every .pt file of `tag_dir`, the files shared out over the ranks;
    returns the first problem found (the same on every rank), or None."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = None
    for f in sorted(tag_dir.rglob("*.pt"))[rank::world]:
        try:
            verify_contents(f)
        except CheckpointError as e:
            problem = str(e)
            break
    if world == 1:
        return problem
    found = [None] * world
    dist.all_gather_object(found, problem)
    return next((p for p in found if p is not None), None)


def data_setup(cfg: Config) -> Dict[str, Any]:
    """What the saved data position (consumed samples and batches) counts in: the sample order is
    a function of these, so a resume under other values would silently read other data."""
    return {"model.seq_length": cfg.model.seq_length, "data.prefixes": [str(p) for p in cfg.data.prefixes],
            "data.weights": cfg.data.weights, "data.preset": cfg.data.preset, "data.split": cfg.data.split,
            "train.seed": cfg.train.seed}


def _check_data_setup(meta: Dict[str, Any], cfg: Config, tag_dir: Path, say: bool = True) -> None:
    """A resume under another data setup is refused (a CheckpointMismatch: every rank raises it, and
    no older checkpoint is tried), naming each key with both values, unless
    checkpoint.allow_data_change; then the log names what changed."""
    saved = meta.get("data_setup")
    if saved is None:  # written before the data setup was recorded
        return
    now = json.loads(json.dumps(data_setup(cfg)))  # as the checkpoint's JSON holds it
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if not diffs:
        return
    if not cfg.checkpoint.allow_data_change:
        raise CheckpointMismatch(f"{tag_dir}: resuming with another data setup would read other samples from the saved "
                          "data position:\n  " + "\n  ".join(diffs) + "\nrestore these values, or set "
                          "checkpoint.allow_data_change=true to continue from the same position anyway")
    if say:
        _log("checkpoint.allow_data_change: resuming with a changed data setup: " + "; ".join(diffs))


def _check_compatible(meta: Dict[str, Any], cfg: Config, topo: Topology, tag_dir: Path, universal: bool,
                      weights_only: bool, say: bool = True) -> None:
    if not weights_only:  # a weights-only load starts a fresh data order
        _check_data_setup(meta, cfg, tag_dir, say)
    saved, now = meta["model"], cfg.model.model_dump(mode="json")
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
             for k in _SHAPE_KEYS if saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointMismatch(f"{tag_dir}: checkpoint does not match the model:\n  " + "\n  ".join(diffs))
    lay = meta.get("layout", {})
    saved_layout = (lay.get("pp"), lay.get("tp"), lay.get("dp"))
    now_layout = (topo.pp, topo.tp, topo.dp)
    if weights_only and cfg.zero.stage == 3:
        raise CheckpointMismatch(
            f"{tag_dir}: loading weights alone (a converted checkpoint or checkpoint.finetune) is not supported "
            "with zero.stage=3, whose loader reads only its own partitioned files; start the run at zero.stage 1 "
            "or 2 (pp=1), save, and resume that checkpoint at ZeRO-3"
        )
    if weights_only:  # no optimizer state: any data-parallel size can load the weights
        saved_layout, now_layout = saved_layout[:2], now_layout[:2]
    if not universal and lay and saved_layout != now_layout:
        raise CheckpointMismatch(
            f"{tag_dir}: saved with pp={lay.get('pp')} tp={lay.get('tp')} dp={lay.get('dp')}, this run is "
            f"pp={topo.pp} tp={topo.tp} dp={topo.dp}. To change the layout: python tools/reshard.py "
            f"--checkpoint {tag_dir.parent} --out NEW_DIR, then --set checkpoint.load=NEW_DIR"
        )


def _candidates(load_dir: Path) -> Tuple[List[str], List[str]]:
    """Tags to try, newest first, and the warnings met choosing them."""
    warnings, tag = [], None
    try:
        tag = read_latest(load_dir)
    except CheckpointError as e:
        warnings.append(str(e))
    order = [tag] if tag is not None else []
    order += [t for t in reversed(complete_tags(load_dir)) if t != tag]
    return order, warnings


def _log(msg: str) -> None:
    if _rank0():
        print(f"[checkpoint] {msg}", file=sys.stderr, flush=True)


def load(engine, cfg: Config, topo: Topology, load_dir: os.PathLike, *, required: bool) -> Optional[Dict[str, Any]]:
    """Resume from the newest intact checkpoint in `load_dir`; returns our client state, or None
    when there is nothing to resume from and `required` is False (a fresh run)."""
    load_dir = Path(load_dir)
    order, warnings = _candidates(load_dir)
    for w in warnings:
        _log(f"warning: {w}")
    if not order:
        if required:
            raise CheckpointError(f"{load_dir}: no checkpoint to load (no 'latest' and no complete global_stepN/)")
        return None
    errors = []
    for tag in order:
        problem, meta = _broadcast(_check_tag(load_dir / tag, cfg, topo) if _rank0() else None)
        if isinstance(problem, CheckpointMismatch):
            raise problem  # a wrong checkpoint, not a damaged one: no fallback
        if problem is None:
            problem = _verify_contents_on_all_ranks(load_dir / tag)
        if problem is not None:
            errors.append(str(problem))
            _log(f"cannot resume from {tag}: {problem}; trying an older checkpoint")
            continue
        return _load_tag(engine, cfg, load_dir, tag, _weights_only(cfg, meta), bool(meta.get("universal")))
    raise CheckpointError(f"{load_dir}: no intact checkpoint to resume from:\n  " + "\n  ".join(errors))


def check_resumable(cfg: Config, topo: Topology, load_dir: os.PathLike) -> None:
    """The checks `load` makes before it reads a tensor (model shape, layout, data setup), made at
    start-up before the data and the model are built: a resume `load` would refuse (a
    CheckpointMismatch) is refused in seconds, not after the engine is built. Damage (a missing or
    truncated file) is left to `load`, which falls back to an older checkpoint."""
    load_dir = Path(load_dir)
    for tag in _candidates(load_dir)[0]:
        problem, _ = _broadcast(_check_tag(load_dir / tag, cfg, topo, say=False) if _rank0() else None)
        if isinstance(problem, CheckpointMismatch):
            raise problem
        if problem is None:
            return


def _check_tag(tag_dir: Path, cfg: Config, topo: Topology,
               say: bool = True) -> Tuple[Optional[CheckpointError], Optional[dict]]:
    """(None, complete.json's contents) when `tag_dir` can be resumed, else (the problem, None)."""
    try:
        if not tag_dir.is_dir():
            raise CheckpointError(f"{tag_dir}: named by 'latest' but missing")
        meta = read_meta(tag_dir)
        verify_manifest(tag_dir, meta)
        verify_files(tag_dir)
        _check_compatible(meta, cfg, topo, tag_dir, bool(meta.get("universal")), _weights_only(cfg, meta), say)
        return None, meta
    except CheckpointError as e:
        return e, None


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _weights_only(cfg: Config, meta: Optional[Dict[str, Any]]) -> bool:
    """Load the module alone: asked for (checkpoint.finetune), or all the checkpoint has (one
    written by tools/convert_from_hf.py carries weights but no optimizer or data state)."""
    return cfg.checkpoint.finetune or bool((meta or {}).get("weights_only"))


def _load_tag(engine, cfg: Config, load_dir: Path, tag: str, finetune: bool,
              universal: bool) -> Optional[Dict[str, Any]]:
    # A universal checkpoint (tools/reshard.py) is re-sliced by DeepSpeed for this run's layout;
    # the flag lives in the engine's config and is only read while loading.
    if universal and not finetune and engine.zero_optimization_stage() == 0:
        raise CheckpointError(f"{load_dir / tag}: a universal checkpoint, whose optimizer state DeepSpeed loads only "
                              "into a ZeRO optimizer; set zero.stage=1 (or 'auto', which picks it for this load)")
    engine._config.load_universal_checkpoint = universal
    path, client = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=not finetune, load_lr_scheduler_states=False,
        load_module_only=finetune,
    )
    if path is None:
        raise CheckpointError(f"{load_dir / tag}: DeepSpeed found no checkpoint files for this rank")
    if finetune:
        _log(f"loaded the weights of {load_dir / tag}; starting at step 0 with a fresh optimizer and data order")
        return None
    state = (client or {}).get(CLIENT_KEY)
    if state is None:
        raise CheckpointError(f"{load_dir / tag}: not a megatron_neox checkpoint (no '{CLIENT_KEY}' client state)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = load_dir / tag / f"rng_state_{rank}.pt"
    if not universal and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    _log(f"resumed from {load_dir / tag} (iteration {state['iteration']})")
    return state
