"""Compiled layers (model.compile=true) against eager, on CPU with gloo: under tensor parallelism,
and through the DeepSpeed engine (pipeline stages, ZeRO 0/1/2, recompute, gradient accumulation).

    python benchmarks/compiled_layers.py [--only tp,engine] [--tp 2]

tp      A tiny model (2 layers, d=32, 4 heads, rotary 25%) at `--tp` ranks, without and with sequence
        parallelism: two micro-batches' forward + backward (gradients accumulated in .grad) eager
        and compiled (Inductor; the collectives run eagerly between the compiled pieces,
        parallel/mappings.py). Per rank: the loss difference and the largest gradient difference.
engine  The tests' tiny model (tests/_layouts.py: 4 layers, global batch 8 of micro-batches of 2;
        also in the Llama and Qwen2 forms of tests/test_model_families_parallel.py) trained 3 steps
        by the engine, eager and compiled, in the layouts below; per layout the
        largest relative difference of the losses and of the gradient norms. Gradient accumulation
        is where compiled parallel-residual layers once went wrong (both output biases shared one
        .grad, so the second micro-batch counted twice: 5% off in the first step's norm at ZeRO 0/1).

Exits 1 when a difference exceeds TOLERANCE (1e-4). Not a test: every rank compiles, which takes minutes on
2 shared cores (single-process checks: tests/test_lean_layer.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # _dist, _layouts: the multi-rank test helpers

TOLERANCE = 1e-4  # fp32 rounding, after Adam, reaches ~5e-6 by step 3; the shared-bias bug was 0.05
# name: (pp, tp, world, overrides)
ENGINE_LAYOUTS = {
    "1 rank, ZeRO-0": (1, 1, 1, {"zero.stage": 0}),
    "1 rank, ZeRO-1, recompute every layer": (1, 1, 1, {"activation_checkpointing.interval": 1}),
    "pp=2, ZeRO-1, recompute every layer": (2, 1, 2, {"activation_checkpointing.interval": 1}),
    "dp=2, ZeRO-2": (1, 1, 2, {"zero.stage": 2}),
    "Llama (GQA, sliding window, llama3 rope) tp=2": (1, 2, 2, "LLAMA"),
    "Qwen2 (q/k/v biases, tied) tp=4 + sequence parallel, KV heads replicated": (1, 4, 4, "QWEN2"),
}


def _quiet_compile() -> None:
    from torch._inductor import config as inductor_config

    torch.set_num_threads(1)
    inductor_config.compile_threads = 1  # no worker pool on 2 shared cores


def _tp_rank(rank: int, tp: int, store: str, queue) -> None:
    from megatron_neox.config import ModelConfig
    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.parallel.random import model_parallel_seed
    from megatron_neox.topology import Topology

    _quiet_compile()
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
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(2):
                tokens = torch.randint(0, 64, (2, 12), generator=g)
                loss = model(tokens, labels=tokens)
                loss.backward()
                losses.append(loss.detach())
            runs.append((torch.stack(losses), [p.grad for p in model.parameters()]))
        (l0, g0), (l1, g1) = runs
        out[sp] = (float((l0 - l1).abs().max()), max(float((a - b).abs().max()) for a, b in zip(g0, g1)))
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def check_tp(tp: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_tp_rank, args=(r, tp, os.path.join(tmp, "store"), queue)) for r in range(tp)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
    worst = 0.0
    for rank in sorted(results):
        for sp, (dloss, dgrad) in results[rank].items():
            print(f"tp     rank {rank} tp={tp} sequence_parallel={sp}: |loss diff| {dloss:.3g}, "
                  f"max |grad diff| {dgrad:.3g}", flush=True)
            worst = max(worst, dloss, dgrad)
    return worst


def _engine_rank(rank: int, world: int, pp: int, tp: int, overrides: dict):
    from _layouts import run_steps, tiny_config

    _quiet_compile()
    if isinstance(overrides, str):  # a family's keys, as the family tests train it
        import test_model_families_parallel as families

        overrides = {**getattr(families, overrides),
                     **({"parallel.sequence_parallel": True} if overrides == "QWEN2" else {})}
    runs = {}
    for setting in (False, True):
        losses, norms = run_steps(tiny_config(pp, tp, {**overrides, "model.compile": setting}), 3)
        runs[setting] = (losses, norms)
    return runs


def check_engine() -> float:
    from _dist import run_distributed

    worst = 0.0
    for name, (pp, tp, world, overrides) in ENGINE_LAYOUTS.items():
        runs = run_distributed(_engine_rank, world, pp, tp, overrides, timeout=1800)[-1]  # the last stage's
        (e_loss, e_norm), (c_loss, c_norm) = runs[False], runs[True]
        dloss = max(abs(a - b) / abs(a) for a, b in zip(e_loss, c_loss))
        dnorm = max(abs(a - b) / abs(a) for a, b in zip(e_norm, c_norm))
        print(f"engine {name}: losses {[round(x, 6) for x in c_loss]} compiled vs {[round(x, 6) for x in e_loss]} "
              f"eager, max rel diff {dloss:.2g}; grad norms max rel diff {dnorm:.2g}", flush=True)
        worst = max(worst, dloss, dnorm)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tp,engine", help="comma-separated: tp, engine")
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",")}
    if parts - {"tp", "engine"}:
        parser.error(f"--only: unknown part(s) {sorted(parts - {'tp', 'engine'})}; choose from tp, engine")
    worst = 0.0
    if "tp" in parts:
        worst = max(worst, check_tp(args.tp))
    if "engine" in parts:
        worst = max(worst, check_engine())
    print(f"compiled_layers {'PASS' if worst <= TOLERANCE else 'FAIL'}: largest difference {worst:.2g} "
          f"(tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
