"""The survey's 3D example on one 2-core machine: pp=4 x tp=4 x dp=2 = 32 ranks, against 1 rank.

    python benchmarks/layout_3d.py [--steps 3] [--pp 4 --tp 4 --dp 2]

A tiny model (8 layers, d=64, 4 heads, seq 32) trains 3 fp32 steps (AdamW, clip 1.0, ZeRO-1) on
the same global batch at 1 rank and at pp x tp x dp ranks; each layout's loss and gradient norm
per step are printed with their relative difference, and the script exits 1 when any exceeds
1e-5. The vocab (500, make_vocab_size_divisible_by=128) pads to 512 at tp=1 and tp=4 alike, so
both runs hold the same model.

32 processes on 2 cores: every rank runs 1 thread (OMP_NUM_THREADS=1) and the model is tiny, so
memory and start-up are the interpreter + torch + DeepSpeed per process. By default (--start fork)
this script imports them once and forks the ranks, which then share those pages copy-on-write;
--start exec runs 32 fresh interpreters as a launcher would. Printed: wall time of each run
(first process started to last one exited), rank 0's time to import / join the world / build the
engine / train, the per-rank peak RSS (max and sum over ranks: the sum counts shared pages once
per process) and the peak of the summed PSS (each shared page split among the processes mapping
it, the forking parent included: what the run really takes from the machine's RAM).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import parallel_overhead as po  # the rank launcher (run_ranks / write_result) and batch order

MODEL = {
    "num_layers": 8, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "vocab_size": 500, "make_vocab_size_divisible_by": 128, "rotary_pct": 0.25,
}
TOLERANCE = 1e-5


def worker(job: dict) -> None:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg = po.make_config(pp=job["pp"], tp=job["tp"], zero=1, micro=job["micro"],
                         global_batch=job["global_batch"], model=MODEL)
    t_import = time.perf_counter()
    cfg, topo = setup(cfg)
    t_world = time.perf_counter()
    engine, _, clipper = build_engine(cfg, topo)
    t_engine = time.perf_counter()
    losses, norms = [], []
    for step in range(job["steps"]):
        r = train_step(engine, po.micro_batches(cfg, step, topo.dp, topo.dp_rank), topo, clipper)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    t_train = time.perf_counter()
    po.write_result({
        "losses": losses, "norms": norms, "peak_rss_mib": po.peak_rss_mib(),
        "coord": [topo.pp_rank, topo.tp_rank, topo.dp_rank],
        "phases": {"import": t_import - t0, "join world": t_world - t_import,
                   "build engine": t_engine - t_world, "train": t_train - t_engine},
    })


def _run(world: int, pp: int, tp: int, args) -> dict:
    job = {"pp": pp, "tp": tp, "micro": args.micro, "global_batch": args.global_batch, "steps": args.steps}
    return po.run_ranks(os.path.abspath(__file__), world, job, threads=1, timeout=args.timeout,
                        sample_memory=True, fork_target=worker if args.start == "fork" else None)


def _summary(name: str, out: dict) -> None:
    ranks = out["ranks"]
    rss = [r["peak_rss_mib"] for r in ranks]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in ranks[0]["phases"].items())
    print(f"  {name}: wall {out['wall_s']:.1f} s (rank 0: {phases} s)")
    print(f"  {'':{len(name)}}  peak RSS per rank max {max(rss):.0f} MiB, sum {sum(rss) / 1024:.2f} GiB; "
          f"peak summed PSS {out['peak_pss_total_mib'] / 1024:.2f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step (grad_accum 4 at dp=2)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--start", choices=["fork", "exec"], default="fork",
                    help="fork ranks from this process after importing torch/DeepSpeed, or exec fresh ones")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    world = args.pp * args.tp * args.dp
    if args.start == "fork":
        po.preload()
    m = MODEL
    print(f"model: L={m['num_layers']} d={m['hidden_size']} heads={m['num_attention_heads']} "
          f"seq={m['seq_length']} vocab {m['vocab_size']} (padded 512); global batch {args.global_batch} "
          f"sequences, micro {args.micro}; fp32, ZeRO-1, AdamW, clip 1.0; {args.steps} steps; "
          f"1 thread per rank; ranks started by {args.start}")
    ref = _run(1, 1, 1, args)
    _summary("1 rank", ref)
    big = _run(world, args.pp, args.tp, args)
    _summary(f"pp={args.pp} tp={args.tp} dp={args.dp} ({world} ranks)", big)

    # Every rank reports the step's loss and norm (the pipeline engine broadcasts them); they must
    # agree among themselves and with the single rank.
    ref_l, ref_n = ref["ranks"][0]["losses"], ref["ranks"][0]["norms"]
    worst = 0.0
    print(f"  {'step':>4s} {'loss 1 rank':>13s} {f'loss {world} ranks':>14s} {'rel diff':>9s}  "
          f"{'norm 1 rank':>12s} {f'norm {world} ranks':>14s} {'rel diff':>9s}")
    for s in range(args.steps):
        l1, n1 = ref_l[s], ref_n[s]
        rel_l = max(abs(r["losses"][s] - l1) / abs(l1) for r in big["ranks"])
        rel_n = max(abs(r["norms"][s] - n1) / abs(n1) for r in big["ranks"])
        worst = max(worst, rel_l, rel_n)
        l32, n32 = big["ranks"][0]["losses"][s], big["ranks"][0]["norms"][s]
        print(f"  {s:4d} {l1:13.8f} {l32:14.8f} {rel_l:9.1e}  {n1:12.8f} {n32:14.8f} {rel_n:9.1e}")
    ok = worst <= TOLERANCE
    print(f"  max relative difference over all {world} ranks: {worst:.1e} "
          f"({'OK' if ok else 'FAIL'}: tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
