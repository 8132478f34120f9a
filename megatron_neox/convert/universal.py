"""DeepSpeed universal checkpoints: change pp, tp or dp between save and resume.

`ds_to_universal` (DeepSpeed) merges every parameter's fp32 weights and Adam moments across all
shards into one file per parameter, using the regexes our checkpoints carry in
`universal_checkpoint_info` (which tensors are TP-replicated, row-parallel, vocab-padded).
A run that loads the result (its complete.json says `universal`) has DeepSpeed slice them for
its own layout.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from megatron_neox.checkpoint_files import (COMPLETE, complete_tags, read_meta, verify_contents, verify_manifest,
                                            write_latest, write_meta)
from megatron_neox.errors import CheckpointError, ConfigError


def _check_out_holds_only_universal(out_dir: Path) -> None:
    """--out may be new, empty, or hold universal checkpoints written by this tool (a re-run adds
    or replaces one). Anything of a training run -- a checkpoint, complete or cut, or its logs --
    is never touched: its `latest` would point at another run's state."""
    if not out_dir.is_dir():
        return
    for step in sorted(out_dir.glob("global_step*/")):
        if not ((step / COMPLETE).is_file() and read_meta(step).get("universal")):
            raise ConfigError(f"--out {out_dir}: {step.name} there is a training checkpoint, not a universal one "
                              "written by tools/reshard.py; another run's directory is never changed, choose a new "
                              "directory")
    if (out_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"--out {out_dir}: holds a training run (metrics.jsonl); choose a new directory")


def to_universal(ckpt_dir: os.PathLike, out_dir: os.PathLike, tag: Optional[str] = None, workers: int = 2) -> Path:
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if tag is None:
        tags = complete_tags(ckpt_dir)
        if not tags:
            raise CheckpointError(f"{ckpt_dir}: no complete checkpoint (global_stepN/ with {COMPLETE})")
        tag = tags[-1]
    src = ckpt_dir / tag
    if out_dir.resolve() == ckpt_dir.resolve():
        raise ConfigError(f"--out {out_dir}: is the checkpoint directory itself; write the universal checkpoint "
                          "to a new directory")
    _check_out_holds_only_universal(out_dir)
    meta = read_meta(src)
    if meta.get("weights_only"):
        raise CheckpointError(f"{src}: holds weights only (no optimizer state); load it directly at any layout")
    verify_manifest(src, meta)  # a file listed at save time and missing now is named first
    if not any(src.glob("*_optim_states.pt")):
        raise CheckpointError(
            f"{src}: saved without ZeRO (zero.stage=0, which zero.stage='auto' picks for fp32 on one data-parallel "
            "rank): DeepSpeed's universal conversion needs the ZeRO optimizer files (*_optim_states.pt). Train "
            "with zero.stage=1 a run you plan to reshard")
    for f in sorted(src.rglob("*.pt")):  # DeepSpeed's converter asserts on a bad file: name it first
        verify_contents(f)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=out_dir))
    ok = False
    try:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp / tag), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise CheckpointError(f"{src}: DeepSpeed's ds_to_universal failed:\n{tail}")
        meta.update(universal=True, source=str(src))
        write_meta(tmp / tag, meta)  # its own files, not the source's
        final = out_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / tag, final)
        for name in ("latest", "latest_universal"):
            write_latest(out_dir, tag, name)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created:  # leave no empty --out behind
            shutil.rmtree(out_dir, ignore_errors=True)
    return out_dir / tag
