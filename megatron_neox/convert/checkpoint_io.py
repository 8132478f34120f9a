"""Read any training checkpoint as one full state dict, and write weights as a DeepSpeed checkpoint.

What DeepSpeed 0.19 writes into `DIR/global_stepN/` (measured; see training/checkpoint.py):

    pp > 1    layer_XX-model_YY-model_states.pt   layer XX's own keys (no layer-index prefix), TP rank YY;
                                                  a tied output head has no file (it is the embedding)
              mp_rank_ZZ_model_states.pt          one per pipe x tensor rank: `module` is None, client
                                                  state (our `megatron_neox` key) at the top level
    pp = 1    mp_rank_YY_model_states.pt          `module` = the TP rank's whole layer-indexed state dict
    ZeRO-3    zero_pp_rank_D_mp_rank_YY_model_states.pt  empty placeholders: the values are partitioned
                                                  over data-parallel ranks in the optimizer files
    universal zero/NAME/fp32.pt                   tools/reshard.py's output (`"universal": true` in
                                                  complete.json): each parameter whole, in fp32
    all       complete.json (ours, written last), zero_pp_rank_*_optim_states.pt

Model files hold only tensors, plain containers and strings, so they load with
`torch.load(weights_only=True)`; DeepSpeed's optimizer files do not (pickled enums), which only
the ZeRO-3 path reads.

A checkpoint written by `write_weights_checkpoint` has the model files alone and
`"weights_only": true` in complete.json: training then loads it with DeepSpeed's
`load_checkpoint(load_module_only=True)` and starts at step 0 with a fresh optimizer. DeepSpeed's
module-only load needs, per file, `module` (the state dict, or None under a pipeline, whose
layers read their layer files) and `dp_world_size`; the rest of what we write mirrors a real
save so DeepSpeed's own tools recognise the files.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
from pydantic import BaseModel, ValidationError

from megatron_neox.checkpoint_files import (CLIENT_KEY, COMPLETE, read_meta, resolve_tag_dir, verify_contents,
                                            verify_files, write_latest, write_meta)
from megatron_neox.config import Config, ModelConfig, config_from_dict
from megatron_neox.convert.hf import chmod_like_umask
from megatron_neox.errors import CheckpointError, ConfigError
from megatron_neox.layout import split_problems
from megatron_neox.model.gpt_neox import state_dict_shapes
from megatron_neox.outputs import replace_dir
from megatron_neox.parallel.sharding import merge_state_dicts, shard_state_dict, split_key

WEIGHTS_TAG = "global_step0"


class LoadedCheckpoint(NamedTuple):
    """What `load_full_state_dict` returns."""

    model: ModelConfig          # the model section of complete.json: what the weights are
    run: Optional[Config]       # the run config saved with the checkpoint (tokenizer, data), if any
    padded_vocab: int
    state_dict: Dict[str, torch.Tensor]


def _load_pt(path: Path) -> Any:
    """torch.load (tensors and plain containers only) with the failure named: missing, truncated or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint's layout says this file must exist)")
    verify_contents(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/zip errors
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {first_line}); "
                              "the file is truncated or corrupt") from None


# ---- reading -----------------------------------------------------------------------------------


def check_full_state_dict(sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int, where: str) -> None:
    """Every key the model has, with its shape, and nothing else."""
    want = state_dict_shapes(cfg, padded_vocab)
    problems = [f"missing {k}" for k in want if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in want]
    problems += [f"{k}: shape {tuple(sd[k].shape)}, the model needs {tuple(s)}"
                 for k, s in want.items() if k in sd and sd[k].shape != s]
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{where}: weights do not match the model config:\n  " + "\n  ".join(problems[:8]) + more)


def _known_keys_only(data: Dict[str, Any], section: type) -> Dict[str, Any]:
    """`data` without the keys `section` (a pydantic config class) does not know, recursively."""
    out = {}
    for key, value in data.items():
        field = section.model_fields.get(key)
        if field is None:
            continue
        sub = next((a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        out[key] = _known_keys_only(value, sub) if sub is not None and isinstance(value, dict) else value
    return out


def _client_config(client: Any) -> Optional[Config]:
    """The run config saved with the checkpoint. It was valid when saved; keys that a later version
    of the config dropped are ignored so old checkpoints stay usable by the tools."""
    state = client.get(CLIENT_KEY) if isinstance(client, dict) else None
    run = state.get("config") if isinstance(state, dict) else None
    if not isinstance(run, dict):
        return None
    for data in (run, _known_keys_only(run, Config)):
        try:
            return config_from_dict(data)
        except ConfigError:
            continue
    return None  # the model section of complete.json still describes the weights


def _layer_files(tag_dir: Path, idx: int, tp: int) -> List[Path]:
    files = sorted(tag_dir.glob(f"layer_{idx:02d}-*model_states.pt"))
    if len(files) != tp:
        expected = ", ".join(f"layer_{idx:02d}-model_{r:02d}-model_states.pt" for r in range(tp))
        raise CheckpointError(f"{tag_dir}: found {len(files)} file(s) for layer {idx}, expected {tp}: {expected} "
                              "(missing files: the checkpoint is incomplete)")
    return files


def load_full_state_dict(ckpt: Union[str, os.PathLike]) -> LoadedCheckpoint:
    """The whole model of a checkpoint (`DIR`, following `latest`, or `DIR/global_stepN`) as one
    layer-indexed state dict: pipeline layer files gathered, tensor-parallel shards merged."""
    tag_dir = resolve_tag_dir(ckpt)
    meta = read_meta(tag_dir)  # CheckpointError when the save never finished (no complete.json)
    try:
        cfg = ModelConfig(**meta["model"])
        padded = int(meta["padded_vocab"])
        layout = meta.get("layout") or {}
        pp, tp = int(layout.get("pp", 1)), int(layout.get("tp", 1))
    except Exception as e:
        raise CheckpointError(f"{tag_dir / COMPLETE}: missing or invalid model/padded_vocab/layout ({e})") from None

    if meta.get("universal"):
        client = _load_pt(tag_dir / "mp_rank_00_model_states.pt")
        shards = [_load_universal(tag_dir, cfg, padded)]
    elif pp > 1:
        client = _load_pt(tag_dir / "mp_rank_00_model_states.pt")
        L = cfg.num_layers
        indices = list(range(L + 2)) + ([] if cfg.tie_embeddings else [L + 2])
        shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for idx in indices:
            for r, f in enumerate(_layer_files(tag_dir, idx, tp)):
                layer_sd = _load_pt(f)
                shards[r].update({f"{idx}.{k}": v for k, v in layer_sd.items()})
    elif (tag_dir / "mp_rank_00_model_states.pt").exists() or not list(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
        loaded = [_load_pt(f) for f in files]
        client = loaded[0]
        shards = []
        for f, sd in zip(files, loaded):
            if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
                raise CheckpointError(f"{f}: no 'module' state dict (not a DeepSpeed pp=1 model file)")
            shards.append(sd["module"])
    else:
        client, shards = _load_zero3(tag_dir, tp)

    full = merge_state_dicts(shards, cfg)
    check_full_state_dict(full, cfg, padded, str(tag_dir))
    return LoadedCheckpoint(cfg, _client_config(client), padded, full)


def _load_universal(tag_dir: Path, cfg: ModelConfig, padded: int) -> Dict[str, torch.Tensor]:
    """A universal checkpoint (tools/reshard.py) holds every parameter whole, in fp32, as
    `zero/NAME/fp32.pt` = {"param": tensor}, NAME being the engine's parameter name: our
    layer-indexed key, except a pipeline's tied embedding, which lives in `tied_modules.embed`."""
    out = {}
    for key in state_dict_shapes(cfg, padded):
        idx, name = split_key(key)
        candidates = [key] + ([f"tied_modules.embed.{name}"] if idx == 0 else [])
        path = next((tag_dir / "zero" / c / "fp32.pt" for c in candidates if (tag_dir / "zero" / c).is_dir()), None)
        if path is None:
            raise CheckpointError(f"{tag_dir / 'zero' / key}: missing (a universal checkpoint has one directory "
                                  "per parameter)")
        out[key] = _load_pt(path)["param"]
    return out


def _load_zero3(tag_dir: Path, tp: int):
    """ZeRO-3 partitions every parameter over the data-parallel ranks; DeepSpeed's zero_to_fp32
    puts them back together from the optimizer files."""
    if tp > 1:
        raise CheckpointError(f"{tag_dir}: merging a ZeRO-3 checkpoint with tp={tp} is not supported (DeepSpeed's "
                              "zero_to_fp32 gathers one tensor-parallel rank); train with zero.stage <= 2 to export")
    model_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    client = _load_pt(model_file)
    # Name a truncated shard before DeepSpeed trips over it (checking the zip directory is enough
    # and does not read the optimizer states twice).
    verify_files(tag_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's optimizer files are pickles, which zero_to_fp32 loads with weights_only=False;
    # they come from the checkpoint directory the user pointed at.
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{tag_dir}: cannot gather the ZeRO-3 partitions ({e})") from None
    return client, [dict(sd)]


# ---- writing -----------------------------------------------------------------------------------


def _fit_vocab(sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded: int) -> Dict[str, torch.Tensor]:
    """Pad (zero rows) or trim the vocab rows to `padded`. Rows past model.vocab_size are padding
    that no token id reaches, so trimming them loses nothing; trimming real rows is refused."""
    out = dict(sd)
    keys = ["0.word_embeddings.weight"] + ([] if cfg.tie_embeddings else [f"{cfg.num_layers + 2}.final_linear.weight"])
    for k in keys:
        if k not in out:
            continue
        t = out[k]
        if t.shape[0] < padded:
            out[k] = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
        elif t.shape[0] > padded:
            if padded < cfg.vocab_size:
                raise CheckpointError(f"{k}: {t.shape[0]} rows do not fit the padded vocab {padded} "
                                      f"(model.vocab_size={cfg.vocab_size})")
            out[k] = t[:padded]
    return out


def _ds_file(module, pp: int, tp: int, client: Dict[str, Any]) -> Dict[str, Any]:
    import deepspeed

    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": None,
        "skipped_steps": 0,
        "global_steps": 0,
        "global_samples": 0,
        # DeepSpeed's loader asserts the number of mp_rank files equals this.
        "dp_world_size": 1,
        "mp_world_size": pp * tp if pp > 1 else tp,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
        "ds_version": deepspeed.__version__,
        **client,
    }


def write_weights_checkpoint(full_sd: Dict[str, torch.Tensor], model_cfg: Union[ModelConfig, Dict[str, Any]],
                             out_dir: Union[str, os.PathLike], pp: int = 1, tp: int = 1, *,
                             run_config: Optional[Dict[str, Any]] = None,
                             extra_files: Optional[Dict[str, os.PathLike]] = None, source: Optional[str] = None,
                             overwrite: bool = False) -> Path:
    """Write `full_sd` (our full layer-indexed names) as a weights-only checkpoint in DeepSpeed's
    layout for `pp` x `tp`: `OUT/global_step0/` + `OUT/latest`.

    `launch/train.py --set checkpoint.load=OUT` with the same model section and parallel.pp/tp
    loads it (any data-parallel size, ZeRO 0-2; ZeRO-3 reads only its own partitioned files).
    `run_config` (a config dict) is stored as client state so tools find the tokenizer and data;
    `extra_files` (name -> source path) are copied into OUT. Everything is written in a temporary
    directory beside OUT and renamed into place, so OUT is complete or absent.
    """
    out_dir = Path(out_dir)
    try:
        cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig(**model_cfg)
    except ValidationError as e:
        raise ConfigError(f"invalid model section: {e}") from None
    if pp < 1 or tp < 1:
        raise ConfigError(f"pp={pp} and tp={tp} must be >= 1")
    padded = cfg.padded_vocab(tp)
    problems = split_problems(pp=pp, tp=tp, num_layers=cfg.num_layers, num_heads=cfg.num_attention_heads,
                              ffn_size=cfg.ffn_size, padded_vocab=padded, vocab_multiple=cfg.make_vocab_size_divisible_by)
    if problems:
        raise ConfigError(problems[0])
    full = _fit_vocab(full_sd, cfg, padded)
    check_full_state_dict(full, cfg, padded, "write_weights_checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists and is not empty; choose a new output directory")

    client = {CLIENT_KEY: {"iteration": 0, "weights_only": True, **({"config": run_config} if run_config else {})}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        chmod_like_umask(tmp)
        tag_dir = tmp / WEIGHTS_TAG
        tag_dir.mkdir()
        shards = [shard_state_dict(full, cfg, tp, r) for r in range(tp)]
        if pp > 1:
            for r, shard in enumerate(shards):
                by_layer: Dict[int, Dict[str, torch.Tensor]] = {}
                for key, t in shard.items():
                    idx, name = split_key(key)
                    by_layer.setdefault(idx, {})[name] = t
                for idx, layer_sd in by_layer.items():
                    torch.save(layer_sd, tag_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            for m in range(pp * tp):  # one per pipe x tensor rank, as DeepSpeed writes them
                torch.save(_ds_file(None, pp, tp, client), tag_dir / f"mp_rank_{m:02d}_model_states.pt")
        else:
            for r, shard in enumerate(shards):
                torch.save(_ds_file(shard, pp, tp, client), tag_dir / f"mp_rank_{r:02d}_model_states.pt")
        meta = {"iteration": 0, "weights_only": True, "layout": {"pp": pp, "tp": tp, "dp": 1},
                "model": cfg.model_dump(mode="json"), "padded_vocab": padded}
        if source:
            meta["source"] = source
        write_meta(tag_dir, meta)
        write_latest(tmp, WEIGHTS_TAG)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
