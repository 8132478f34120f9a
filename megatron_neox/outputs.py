"""Output directories of the tools and the trainer: checked before the work starts, never
deleted unless asked, and replaced only whole (built beside them, then renamed into place)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megatron_neox.checkpoint_files import COMPLETE, has_checkpoint
from megatron_neox.errors import ConfigError


def check_writable_dir(path: os.PathLike, what: str, hint: str = "") -> Path:
    """Create `path` if missing and prove a file can be made in it; else a ConfigError that names
    `what` (e.g. 'checkpoint.dir'), the path and the reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        # Name the path that failed when it is not `path` or our probe file inside it (a parent, a file).
        where = f" ({e.filename})" if e.filename and path not in (Path(e.filename), Path(e.filename).parent) else ""
        raise ConfigError(f"{what} {path}: cannot write there: {reason}{where}{'; ' + hint if hint else ''}") from None
    return path


def check_run_dirs(cfg) -> None:
    """The trainer's outputs (checkpoint.dir, log.dir), checked at start-up before the model is built."""
    for what, path in (("checkpoint.dir", cfg.checkpoint.dir), ("log.dir", cfg.log.dir)):
        if path:
            check_writable_dir(path, what)


def protected_kind(path: os.PathLike) -> Optional[str]:
    """What a directory holds that an output must never replace: a checkpoint or a training run."""
    path = Path(path)
    # A global_stepN/ without its marker is a save in progress or one that was cut: still a checkpoint.
    if has_checkpoint(path) or (path / COMPLETE).is_file() or any(path.glob("global_step*/")):
        return "a checkpoint"
    if (path / "metrics.jsonl").is_file():
        return "a training run (metrics.jsonl)"
    return None


def check_output_dir(out: os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Validate a directory a tool will write whole: not a file, not a checkpoint or a run; an
    existing non-empty one only with `overwrite`. Its parent must be writable (the new tree is
    built there and renamed into place)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: is a file, expected a directory to write")
    if out.is_dir() and any(out.iterdir()):
        kind = protected_kind(out)
        if kind is not None:
            raise ConfigError(f"{flag} {out}: holds {kind}; it is never replaced, choose another directory")
        if not overwrite:
            raise ConfigError(f"{flag} {out}: exists and is not empty; choose a new directory or pass --overwrite "
                              "to replace it")
    check_writable_dir(out.resolve().parent, f"{flag} {out}: parent directory")
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tree `tmp` to `out`, replacing what `check_output_dir` allowed there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # put the user's directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
