"""Run a test function in N real ranks on CPU with gloo.

    from _dist import run_distributed

    def _check_allreduce(rank, world_size, scale):      # module level: the children import it
        ...                                               # torch.distributed is initialised here
        return some_picklable_value

    def test_allreduce():
        results = run_distributed(_check_allreduce, 2, 3.0)   # one entry per rank

Each rank is a fresh `spawn`ed process (so start-up costs ~2 s: run many checks inside one call).
The rendezvous is a FileStore in a temporary directory, so no port can collide between concurrent
test runs. RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are also set, so code that
calls `deepspeed.init_distributed()` inside the function finds the world it expects.

If any rank raises, every rank is stopped and the parent raises `RuntimeError` whose message holds
the failing rank's traceback; a rank that hangs past `timeout` seconds is killed the same way.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_neox.ranks import free_port

__all__ = ["run_distributed"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_distributed(fn, world_size: int, *args, timeout: float = 120):
    """Call `fn(rank, world_size, *args)` in `world_size` gloo ranks; return the per-rank results.

    `fn` and `args` must be picklable (a module-level function). The return values are collected
    in rank order; they must be picklable too. Raises RuntimeError with the child's traceback if a
    rank fails, or if the ranks do not finish within `timeout` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="mnx_dist_") as tmp:
        env = {
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),  # only for code that reads it; our rendezvous is the FileStore
            # Ranks share 2 cores here: more threads per rank only adds contention.
            "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", os.path.join(_REPO, ".cache", "torch_extensions")),
        }
        ctx = mp.start_processes(
            _worker, args=(fn, world_size, args, tmp, env, timeout), nprocs=world_size,
            join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            # join() raises ProcessRaisedException / ProcessExitedException (with the child's
            # traceback) as soon as one rank fails, after terminating the others.
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                        f"did not finish within {timeout} s")
        except RuntimeError:
            raise
        except Exception as exc:  # ProcessRaisedException / ProcessExitedException
            raise RuntimeError(f"a rank of {getattr(fn, '__name__', fn)} failed:\n{exc}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"result_{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _worker(rank, fn, world_size, args, tmp, env, timeout):
    os.environ.update(env)
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(tmp, "store"), rank=rank,
        world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        # Name the rank: the parent only sees the message of the first failure.
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    with open(os.path.join(tmp, f"result_{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # A barrier before teardown: a rank that exits early would break the others' last collective.
    dist.barrier()
    dist.destroy_process_group()


