"""What the real training loop costs per step on top of `train_step` (CPU, one rank).

    python benchmarks/cli_overhead.py [--steps 30]

Runs `megatron_neox.training.trainer.train` (the loop `launch/train.py` runs: loader, plan,
spike check, metrics, logging, checkpoint and validation components) on the tests' tiny config
and random data, with `train_step` timed inside it. Loop overhead = loop wall time - time in
`train_step` (the loader, the metrics, the log line, the components' `after_step`), per step and
as a share of the step. The tiny config logs every step, so this is the worst case of logging.
The first 3 steps are warm-up and are not counted.

    python benchmarks/cli_overhead.py --loader [--global-batch 1024 --micro 32]

times the loader alone at Pythia-160M shapes instead: the next global batch of seq-2048 samples
from a random indexed dataset (3000 documents of 100-4000 tokens), per batch and per sample. Run it
with OMP_NUM_THREADS=1 for the loader's own cost (torch's intra-op threads wait on busy cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from megatron_neox.ranks import free_port  # noqa: E402

WARMUP = 3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--loader", action="store_true", help="time the data loader alone (Pythia-160M shapes)")
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=32)
    args = ap.parse_args(argv)
    if args.loader:
        return time_loader(args.global_batch, args.micro)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    from _train import config_dict, make_dataset

    from megatron_neox.config import config_from_dict
    from megatron_neox.training import trainer

    step_s, ends = [], []
    inner = trainer.train_step

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        r = inner(*a, **k)
        step_s.append(time.perf_counter() - t0)
        ends.append(time.perf_counter())
        return r

    trainer.train_step = timed_step
    with tempfile.TemporaryDirectory(prefix="mnx_cli_overhead_") as tmp:
        make_dataset(os.path.join(tmp, "data", "rand"))
        cfg = config_from_dict(config_dict(tmp, **{"train.iters": args.steps + WARMUP}))
        trainer.train(cfg)
    loop = ends[-1] - ends[WARMUP - 1]  # from the end of warm-up to the end of the last step
    inside = sum(step_s[WARMUP:])
    n = len(step_s) - WARMUP
    over = (loop - inside) / n
    print(f"steps {n}: loop {1e3 * loop / n:.2f} ms/step, train_step {1e3 * inside / n:.2f} ms/step, "
          f"loop overhead {1e3 * over:.2f} ms/step ({100 * over / (loop / n):.1f}% of the step)")


def time_loader(global_batch: int, micro: int, repeats: int = 5) -> None:
    import numpy as np

    from megatron_neox.config import load_config
    from megatron_neox.data.indexed import IndexedDatasetBuilder
    from megatron_neox.data.loader import BatchLoader, build_datasets

    with tempfile.TemporaryDirectory(prefix="mnx_loader_") as tmp:
        rng = np.random.default_rng(0)
        builder = IndexedDatasetBuilder(os.path.join(tmp, "d"), np.uint16)
        for _ in range(3000):
            builder.add_document(np.append(rng.integers(1, 50000, rng.integers(100, 4000)), 0))
        builder.finalize()
        cfg = load_config("pythia-160M.json", [f'data.prefixes=["{tmp}/d"]', "data.split=100"])
        train, _, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=1,
                                     num_samples=(global_batch * (repeats + 1), 0, 0), cache_dir=os.path.join(tmp, "c"))
        loader = BatchLoader(train, micro_batch_size=micro, dp_rank=0, dp_size=1)
        loader.next_global_batch(global_batch)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            loader.next_global_batch(global_batch)
        per = (time.perf_counter() - t0) / repeats
    print(f"loader: global batch {global_batch} x seq {cfg.model.seq_length} (micro {micro}): {1e3 * per:.1f} ms "
          f"per global batch, {1e6 * per / global_batch:.0f} us per sample "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


if __name__ == "__main__":
    main()
