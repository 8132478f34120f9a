"""Compiled layers (model.compile=true) against eager under tensor parallelism, on CPU with gloo.

    python benchmarks/compiled_layers.py [--tp 2]

A tiny model (2 layers, d=32, 4 heads, rotary 25%) at tp ranks, without and with sequence
parallelism: one forward + backward eager and one compiled (Inductor; the collectives run eagerly
between the compiled pieces, parallel/mappings.py). Prints, per rank, the loss difference and the
largest gradient difference, and exits 1 when one exceeds 1e-5. Not a test: every rank compiles,
which takes minutes on 2 shared cores (the single-process check is in tests/test_lean_layer.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank: int, tp: int, store: str, queue) -> None:
    from torch._inductor import config as inductor_config

    from megatron_neox.config import ModelConfig
    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.parallel.random import model_parallel_seed
    from megatron_neox.topology import Topology

    torch.set_num_threads(1)
    inductor_config.compile_threads = 1
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
    topo = Topology(pp=1, tp=tp)
    model_parallel_seed(1234, topo)
    out = {}
    for sp in (False, True):
        runs = []
        for setting in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, vocab_size=64,
                              make_vocab_size_divisible_by=8, rotary_pct=0.25, compile=setting)
            model = GPTNeoX(cfg, cfg.padded_vocab(tp), topo.tp_group, sp).train()
            tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
            loss = model(tokens, labels=tokens)
            loss.backward()
            runs.append((loss.detach(), [p.grad for p in model.parameters()]))
        (l0, g0), (l1, g1) = runs
        out[sp] = (float((l0 - l1).abs()), max(float((a - b).abs().max()) for a, b in zip(g0, g1)))
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, args.tp, os.path.join(tmp, "store"), queue))
                 for r in range(args.tp)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
    worst = 0.0
    for rank in sorted(results):
        for sp, (dloss, dgrad) in results[rank].items():
            print(f"rank {rank} tp={args.tp} sequence_parallel={sp}: |loss diff| {dloss:.3g}, max |grad diff| {dgrad:.3g}")
            worst = max(worst, dloss, dgrad)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
