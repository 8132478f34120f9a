"""Small rules for code that every rank runs: rank 0 first, a free port for a world of one."""
from __future__ import annotations

import socket
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def _dist():
    """torch.distributed when it is initialised; None otherwise (no torch import just for this:
    the data modules run in tools that never start a world)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_of() -> int:
    """This process's rank (0 without a world)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def rank0_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (which then find what rank 0 cached: index
    arrays, a token-range scan); returns this rank's result. A failure on rank 0 still reaches the
    barrier, so no rank is left waiting, and is raised on rank 0 (the others stop at theirs)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return fn()
    failure, result = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            failure = e
    dist.barrier()
    if failure is not None:
        raise failure
    if dist.get_rank() != 0:
        result = fn()
    return result


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for MASTER_PORT of a world started here)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
