"""Durable checkpoint files, written now or by a background thread.

`DurableWriter` is the checkpoint engine DeepSpeed writes every checkpoint file through
(`engine.checkpoint_engine`: model, layer, ZeRO optimizer files) and our own files go through
too. Each file is written to a temporary name, fsynced, renamed into place, and its directory is
fsynced (megatron_neox/durable.py), so a file under its final name is whole and on disk. With
`background=True` the training thread only copies the state to host memory (a snapshot: training may change the tensors right
after) and a writer thread does the serialisation and the I/O; `pending()` and `wait()` tell when
this rank's files are durable. A checkpoint is declared complete elsewhere (checkpoint.finalize_tag),
only after every rank's writer has finished.

Why not DeepSpeed's DecoupledCheckpointEngine (deepspeed 0.19.8, runtime/checkpoint_engine/): it
hands the live tensors to a subprocess through shared memory (no snapshot), blocks the next
optimizer step until the write is done (commit in `DeepSpeedEngine.step`, which the pipeline
engine does not call), writes `latest` itself without fsync, and its FastCheckpointEngine writer
needs the async_io op.
"""
import copy
import errno
import os
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from megatron_neox.durable import atomic_write
from megatron_neox.errors import CheckpointError


def save_durable(obj: Any, path: os.PathLike) -> None:
    """`torch.save(obj)` to `path`, durable (megatron_neox/durable.py). A failed write is a
    CheckpointError naming the file and why (`write_failure`); the temporary is removed."""
    try:
        with atomic_write(path, durable=True) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        raise write_failure(path, e) from None


def write_failure(path: os.PathLike, e: BaseException, action: str = "writing the checkpoint file") -> CheckpointError:
    """What went wrong `action` (writing, creating) `path`, said plainly. torch's zip writer reports a
    full disk as `[enforce fail at inline_container.cc] ... file write failed` or `unexpected pos N vs
    M` (no errno), so the directory is probed with a small write of our own: its OSError names the
    cause (no space left, not writable, read-only)."""
    reason = _cause(e) if isinstance(e, OSError) and e.strerror else None
    if reason is None:
        probe = os.path.join(os.path.dirname(os.path.abspath(path)), f".write-probe-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            reason = _cause(err)
        finally:
            try:
                os.remove(probe)
            except OSError:
                pass
    reason = reason or f"{type(e).__name__}: {e}"
    return CheckpointError(f"{path}: {action} failed: {reason}; `latest` still names the last complete "
                           "checkpoint (free space or fix the permissions, then resume)")


def _cause(e: OSError) -> str:
    # EPERM is what an immutable directory (chattr +i) gives even root; EACCES mode bits; EROFS a
    # read-only mount.
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({e.strerror})"
    return e.strerror or str(e)


@contextmanager
def naming_failures(path: os.PathLike, action: str = "writing the checkpoint file") -> Iterator[None]:
    """An OSError inside becomes `write_failure(path, ...)`: the file the user knows (`latest`), not
    the temporary name the write was using."""
    try:
        yield
    except OSError as e:
        raise write_failure(path, e, action) from None


def host_copy(obj: Any) -> Any:
    """A snapshot of a (nested) state dict: every tensor copied to host memory, containers rebuilt."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps the dict's type (OrderedDict, defaultdict's factory)
        for k, v in obj.items():
            new[k] = host_copy(v)
        return new
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    # Numbers, strings, torch.Size: immutable. (A mutable object other than these containers would
    # be written as it is when the writer reaches it; DeepSpeed's state dicts hold none.)
    return obj


class DurableWriter(TorchCheckpointEngine):
    """A DeepSpeed checkpoint engine whose files are durable; see the module docstring."""

    def __init__(self, background: bool):
        super().__init__(None)
        self.name = "megatron_neox.DurableWriter"
        self.background = background
        self._queue: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()

    def preserves_storage_sharing(self) -> bool:
        # In the background the snapshot copies every tensor on its own, so DeepSpeed need not
        # clone views out of their flat buffers first (that would be a second copy).
        return not self.background

    def makedirs(self, path, exist_ok=False) -> None:
        # DeepSpeed makes each file's directory through here and, on an OSError, only logs
        # "Failed saving model checkpoint" and goes on: keep the cause for the training thread.
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.fail(write_failure(path, e, "creating the checkpoint directory"))
            raise

    def save(self, state_dict, path: str) -> None:
        # Never raises: a failure is kept (`error`) and reported where every rank looks for it
        # (training/checkpointer.py), not inside DeepSpeed's save_checkpoint, whose closing barrier
        # the other ranks would wait in for this one. The rest of a failed save is not written.
        if self._error is not None:
            return
        if not self.background:
            try:
                save_durable(state_dict, path)
            except CheckpointError as e:
                self.fail(e)
            return
        snapshot = host_copy(state_dict)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are complete before training changes the tensors
        self._queue.put((snapshot, path))

    def _run(self) -> None:
        while True:
            snapshot, path = self._queue.get()
            try:
                if self._error is None:
                    save_durable(snapshot, path)
            except CheckpointError as e:  # reported on the training thread
                self.fail(e)
            except BaseException as e:
                self.fail(CheckpointError(f"{path}: writing the checkpoint file failed: {e}"))
            finally:
                del snapshot
                self._queue.task_done()

    def fail(self, error: CheckpointError) -> None:
        """Record a failure of this rank's part of the save (the first one is kept)."""
        if self._error is None:
            self._error = error

    @property
    def error(self) -> Optional[CheckpointError]:
        """This rank's first failed write, or None."""
        return self._error

    def pending(self) -> bool:
        """True while this rank still has files to write."""
        return self._queue.unfinished_tasks > 0

    def drain(self) -> None:
        """Until every file handed over so far is written (or its failure recorded)."""
        self._queue.join()

    def wait(self) -> None:
        """Until every file handed over so far is durable; the first failure raised."""
        self.drain()
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error
