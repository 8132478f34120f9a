"""What the real training loop costs per step on top of `train_step` (CPU, one rank).

    python benchmarks/cli_overhead.py [--steps 30]

Runs `megatron_neox.training.trainer.train` (the loop `launch/train.py` runs: loader, plan,
spike check, metrics, logging, checkpoint and validation components) on the tests' tiny config
and random data, with `train_step` timed inside it. Loop overhead = loop wall time - time in
`train_step` (the loader, the metrics, the log line, the components' `after_step`), per step and
as a share of the step. The tiny config logs every step, so this is the worst case of logging.
The first 3 steps are warm-up and are not counted.
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
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
