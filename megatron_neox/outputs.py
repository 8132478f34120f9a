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


def check_run_dirs(cfg) -> "RunLock":
    """The trainer's outputs (checkpoint.dir, log.dir), checked at start-up before the model is
    built; returns the run's hold on checkpoint.dir (release it when the run ends)."""
    for what, path in (("checkpoint.dir", cfg.checkpoint.dir), ("log.dir", cfg.log.dir)):
        if path:
            check_writable_dir(path, what)
    return RunLock(cfg.checkpoint.dir)


LOCK = ".run.lock"


class RunLock:
    """One run per checkpoint.dir: the first rank of a run holds an advisory `flock` on
    checkpoint.dir/.run.lock, which names its pid, host and start time. A second run is refused
    with those named; the kernel drops the lock when the holder exits, however it ends (a crash,
    kill -9), so nothing is left stuck. On network file systems flock is as good as the server's
    lock support (NFSv4: yes)."""

    def __init__(self, ckpt_dir: Optional[os.PathLike]):
        self.fd: Optional[int] = None
        if not ckpt_dir or _launch_rank() != 0:
            return
        import fcntl
        import json
        import socket
        import time

        path = Path(ckpt_dir) / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise ConfigError(
                f"checkpoint.dir {ckpt_dir}: in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}; {path}); two runs saving to one "
                "directory prune each other's checkpoints. Wait for it to end, stop it, or choose another "
                "checkpoint.dir") from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me + b"\n", 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _launch_rank() -> int:
    """This process's global rank before torch.distributed is joined (the launchers' variables)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


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
