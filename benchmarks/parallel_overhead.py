"""What our training step costs on CPU, and what 2-rank parallelism costs.

    python benchmarks/parallel_overhead.py            # both parts
    python benchmarks/parallel_overhead.py --part a   # ours vs Hugging Face, 1 rank, 2 threads
    python benchmarks/parallel_overhead.py --part b   # pp=2 / tp=2 / dp=2 on 2 ranks vs 1 rank

(a) Tokens/s of one optimizer step of our DeepSpeed engine (`build_engine`, fp32, AdamW, clip 1.0)
    against Hugging Face `GPTNeoXForCausalLM` (SDPA attention) trained by a plain torch AdamW loop
    with `clip_grad_norm_(1.0)`: same shapes, same weights (copied from ours, so the losses agree:
    printed as a check), same thread count, in the same process. Contenders:
      ours ZeRO-1          the default config (DeepSpeed's flat fp32 partition and reduce buckets,
                           which at dp=1 shard nothing and only copy)
      ours ZeRO-0          the 1-rank configuration: our global-norm clipper (chunked float64
                           norm), no gradient all-reduce at dp=1, torch's fused AdamW on CPU
      HF default / fused   torch.optim.AdamW as is (a per-parameter loop on CPU), and fused=True
    Steps are interleaved round-robin so that load from other processes on this shared machine
    hits every contender alike; warm-up rounds are dropped; the median and the fastest step are
    reported. Ratio > 1 means ours is faster.

(b) Median step time of pp=2, tp=2 and dp=2 on two ranks (1 thread each) relative to one rank
    (2 threads), same model, same config (ZeRO-1) and the same global batch. Ranks are started as
    subprocesses with RANK/WORLD_SIZE/MASTER_* in their environment (`run_ranks`, also used by
    the other benchmarks), which starts much faster than the deepspeed launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# DeepSpeed builds its CPU shared-memory comm extension at start-up: one stable cache for all runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

from megatron_neox.ranks import free_port  # noqa: E402

# ~36M parameters: 6 layers of d=512 (19M) plus a 16k-vocab embedding and untied head (17M).
# make_vocab_size_divisible_by=64 keeps the padded vocab at 16384 for tp=1 and tp=2 alike, so
# every layout trains the same model. Seq 256 x micro 2 = 512 tokens, ~110 GFLOP: about 1-2 s per
# step on two cores.
MODEL = {
    "num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "seq_length": 256,
    "vocab_size": 16384, "make_vocab_size_divisible_by": 64, "rotary_pct": 0.25,
}
OPTIMIZER = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0}


def make_config(pp: int = 1, tp: int = 1, zero: int = 1, micro: int = 2, global_batch: int = 2,
                model: Optional[dict] = None, **sections):
    from megatron_neox.config import config_from_dict

    data = {
        "model": dict(model or MODEL),
        "parallel": {"pp": pp, "tp": tp},
        "train": {"iters": 100, "micro_batch_size": micro, "global_batch_size": global_batch, "seed": 1234},
        "optimizer": dict(OPTIMIZER),
        "zero": {"stage": zero},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def micro_batches(cfg, step: int, dp: int, dp_rank: int) -> List[Dict]:
    """This rank's micro-batches of global batch `step`, in the data loader's order: the global
    batch is G rows; micro-step k of dp rank r takes rows [(k*dp + r)*micro, +micro). Every layout
    therefore averages the loss over the same G sequences."""
    import torch

    from megatron_neox.data.loader import micro_batch

    m, micro, G = cfg.model, cfg.train.micro_batch_size, cfg.train.global_batch_size
    g = torch.Generator().manual_seed(1_000 + step)
    rows = torch.randint(0, m.vocab_size, (G, m.seq_length + 1), generator=g)
    starts = [(k * dp + dp_rank) * micro for k in range(G // (micro * dp))]
    return [micro_batch(rows[s:s + micro].numpy()) for s in starts]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- starting ranks as subprocesses --------------------------------------------------------------


class RanksFailed(RuntimeError):
    pass


def run_ranks(script: str, world: int, job: dict, threads: int = 1, timeout: float = 900,
              sample_memory: bool = False, fork_target: Optional[Callable[[dict], None]] = None) -> dict:
    """Run `world` ranks of `script`'s worker on `job`; return their results and the wall time.

    Each rank gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and OMP_NUM_THREADS=`threads`,
    and must write a JSON result to $MNX_RESULT_DIR/rank{RANK}.json (see `write_result`).
    By default a rank is a fresh `python script --worker JOB_JSON`. With `fork_target` this process
    forks the ranks instead and each calls `fork_target(job)`: the modules already imported here
    (torch, DeepSpeed: ~4 s of CPU and ~250 MiB per process) are shared copy-on-write rather than
    loaded 32 times. The caller must not have run any torch op or started a thread before (OpenMP
    and locks do not survive fork).

    If a rank fails or the time runs out, the other ranks are killed (only the processes started
    here) and RanksFailed carries the tail of the failing rank's log. With `sample_memory` the
    summed PSS of the ranks (and of this process when it forked them; each shared page is counted
    once across all of them) is sampled every ~0.5 s.
    """
    with tempfile.TemporaryDirectory(prefix="mnx_bench_") as tmp:
        base = {
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "MNX_RESULT_DIR": tmp, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        log_paths = [os.path.join(tmp, f"rank{rank}.log") for rank in range(world)]
        t0 = time.perf_counter()
        if fork_target is None:
            procs = []
            for rank in range(world):
                env = dict(os.environ, **base, RANK=str(rank), LOCAL_RANK=str(rank))
                with open(log_paths[rank], "w") as log:
                    procs.append(subprocess.Popen([sys.executable, script, "--worker", json.dumps(job)],
                                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)))
            ranks = [_Child(p.pid, p) for p in procs]
        else:
            ranks = [_Child(_fork_rank(fork_target, job, dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                                       threads, log_paths[r])) for r in range(world)]
        pids = [c.pid for c in ranks] + ([os.getpid()] if fork_target is not None else [])
        sampler = _PssSampler(pids) if sample_memory else None
        failed = None
        try:
            while True:
                codes = [c.poll() for c in ranks]
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                    break
                if all(c == 0 for c in codes):
                    break
                if time.perf_counter() - t0 > timeout:
                    failed = -1
                    break
                time.sleep(0.2)
        finally:
            wall = time.perf_counter() - t0
            if sampler is not None:
                sampler.stop()
            for c in ranks:
                c.kill()
        if failed is not None:
            which = max(failed, 0)
            with open(log_paths[which]) as f:
                tail = "".join(f.readlines()[-40:])
            what = f"rank {failed} exited with code {ranks[failed].poll()}" if failed >= 0 \
                else f"ranks did not finish within {timeout:.0f} s"
            raise RanksFailed(f"{script} {job}: {what}; log of rank {which}:\n{tail}")
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return {"ranks": results, "wall_s": wall,
                "peak_pss_total_mib": sampler.peak_mib if sampler is not None else None}


def _fork_rank(target: Callable[[dict], None], job: dict, env: dict, threads: int, log_path: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never return into the parent's code
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(env)
        import torch

        torch.set_num_threads(threads)
        target(job)
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Child:
    """A rank process, started by Popen or by os.fork: poll() and kill() for both."""

    def __init__(self, pid: int, popen: Optional[subprocess.Popen] = None):
        self.pid, self._popen, self._code = pid, popen, None

    def poll(self) -> Optional[int]:
        if self._popen is not None:
            return self._popen.poll()
        if self._code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, 9)
            if self._popen is not None:
                self._popen.wait()
            else:
                os.waitpid(self.pid, 0)
                self._code = -9


class _PssSampler:
    """Peak of the summed proportional set size of a group of processes, sampled in a thread."""

    def __init__(self, pids: List[int], interval: float = 0.5):
        import psutil

        self._procs = [psutil.Process(pid) for pid in pids]
        self._interval = interval
        self.peak_mib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._done.is_set():
            total = 0
            for p in self._procs:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self._done.wait(self._interval)

    def stop(self):
        self._done.set()
        self._thread.join()


def preload() -> None:
    """Import what a rank needs to build an engine: before forking ranks (see `run_ranks`), or
    before measuring memory, which should not count modules that load lazily."""
    import deepspeed  # noqa: F401
    import deepspeed.pipe  # noqa: F401
    import torch._dynamo  # noqa: F401  torch.optim's constructors import it lazily (~100 MiB)

    import megatron_neox.training.engine  # noqa: F401
    import megatron_neox.training.step  # noqa: F401

    try:  # deepspeed.initialize imports it lazily (ZeRO's optimizer check); version dependent
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:
        pass


def write_result(result: dict) -> None:
    """Called by a worker rank: hand its JSON result to `run_ranks`."""
    path = os.path.join(os.environ["MNX_RESULT_DIR"], f"rank{os.environ['RANK']}.json")
    from megatron_neox.durable import write_json

    write_json(path, result)


# ---- (a) ours vs Hugging Face on one rank --------------------------------------------------------


def _hf_twin(cfg, model, fused: Optional[bool] = None):
    """GPTNeoXForCausalLM with our model's initial weights, and the same AdamW param groups."""
    import torch
    import transformers

    from megatron_neox.convert.hf import to_hf_config, to_hf_state_dict

    hf_cfg = to_hf_config(cfg.model, cfg.model.padded_vocab(1))
    hf_cfg._attn_implementation = "sdpa"  # the same kernel our attention calls
    hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    sd = to_hf_state_dict(model.state_dict(), cfg.model)
    sd["lm_head.weight"] = sd.pop("embed_out.weight")  # transformers 5.x name of the head
    hf.load_state_dict(sd, strict=True)
    hf.train()
    o = cfg.optimizer
    decay = [p for p in hf.parameters() if p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    return hf, opt


def _hf_step(hf, opt, batches, clip: float):
    """The textbook loop: zero_grad, forward/backward per micro-batch, clip, step."""
    import torch
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    total = 0.0
    for mb in batches:
        logits = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), mb["labels"].view(-1)) / len(batches)
        loss.backward()
        total += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)
    opt.step()
    return total, float(norm)


def part_a(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from megatron_neox.model.gpt_neox import count_parameters
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    contenders = []  # (label, step(round) -> (loss, grad norm))

    def ours(label, zero):
        cfg = make_config(zero=zero, micro=args.micro, global_batch=args.micro)
        cfg, topo = setup(cfg)
        engine, model, clipper = build_engine(cfg, topo)
        contenders.append((label, lambda s: _as_pair(train_step(engine, micro_batches(cfg, s, 1, 0), topo, clipper))))
        return cfg, model

    cfg, model = ours("ours ZeRO-1 (default config)", 1)
    ours("ours ZeRO-0 (own clipper)", 0)
    clip = cfg.optimizer.clip_grad
    for label, fused in (("HF + torch AdamW (default)", None), ("HF + torch AdamW fused", True)):
        hf, opt = _hf_twin(cfg, model, fused)
        contenders.append((label, lambda s, hf=hf, opt=opt: _hf_step(hf, opt, micro_batches(cfg, s, 1, 0), clip)))

    n_params = count_parameters(cfg.model)["total"]
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"(a) 1 rank, {torch.get_num_threads()} threads, fp32, {n_params / 1e6:.1f}M parameters "
          f"(L={cfg.model.num_layers} d={cfg.model.hidden_size} V={cfg.model.padded_vocab(1)}), "
          f"batch {cfg.train.global_batch_size} x seq {cfg.model.seq_length} = {tokens} tokens/step, "
          f"AdamW + clip {clip}; {args.warmup} warm-up + {args.steps} measured rounds, interleaved")
    n = len(contenders)
    wall: List[List[float]] = [[] for _ in range(n)]
    cpu: List[List[float]] = [[] for _ in range(n)]
    results: List[List[tuple]] = [[] for _ in range(n)]
    for rnd in range(args.warmup + args.steps):
        # Rotate who goes first so a burst of outside load does not always hit the same one.
        for i in [(rnd + k) % n for k in range(n)]:
            t0, c0 = time.perf_counter(), time.process_time()
            results[i].append(contenders[i][1](rnd))
            if rnd >= args.warmup:
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    hf = next(i for i, (label, _) in enumerate(contenders) if label.startswith("HF"))
    ref_med, ref_min, ref_cpu = statistics.median(wall[hf]), min(wall[hf]), statistics.median(cpu[hf])
    print(f"  {'':30s} {'median s':>8s} {'tokens/s':>8s} {'vs HF':>6s} {'min s':>6s} {'vs HF':>6s} "
          f"{'CPU s':>6s} {'vs HF':>6s}   loss step 0 -> last     norm step 0")
    for i, (label, _) in enumerate(contenders):
        med, low, c = statistics.median(wall[i]), min(wall[i]), statistics.median(cpu[i])
        (l0, n0), (ll, _) = results[i][0], results[i][-1]
        print(f"  {label:30s} {med:8.3f} {tokens / med:8.0f} {ref_med / med:5.2f}x {low:6.3f} {ref_min / low:5.2f}x "
              f"{c:6.2f} {ref_cpu / c:5.2f}x   {l0:.6f} -> {ll:.6f}   {n0:.6f}")
    print("  vs HF = HF default's time / this one (>1: faster than HF) for the median and the fastest "
          "step, and for the median CPU time of all threads. Other processes on this shared machine add "
          "time to some steps: the min is the least disturbed figure.")
    worst = max(abs(results[i][-1][0] - results[hf][-1][0]) for i in range(n))
    print(f"  same weights and batches: max |loss - loss(HF)| at the last step = {worst:.1e} "
          "(HF's clip_grad_norm_ sums squares in fp32, hence its slightly different norm)")


def _as_pair(result):
    return result.loss, result.grad_norm


# ---- (b) 2-rank layouts vs 1 rank -----------------------------------------------------------------

LAYOUTS_B = [  # (name, world, pp, tp, threads per rank)
    ("1 rank", 1, 1, 1, 2),
    ("pp=2", 2, 2, 1, 1),
    ("tp=2", 2, 1, 2, 1),
    ("dp=2", 2, 1, 1, 1),
]


def worker_b(job: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg = make_config(pp=job["pp"], tp=job["tp"], zero=job["zero"], micro=job["micro"],
                      global_batch=job["global_batch"])
    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    times, losses = [], []
    for step in range(job["warmup"] + job["steps"]):
        batches = micro_batches(cfg, step, topo.dp, topo.dp_rank)
        dist.barrier()
        t0 = time.perf_counter()
        r = train_step(engine, batches, topo, clipper)
        dist.barrier()  # the step is over when the slowest rank is done
        if step >= job["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    write_result({"times": times, "losses": losses})


def part_b(args) -> None:
    G = args.global_batch
    print(f"(b) same global batch of {G} x {MODEL['seq_length']} tokens (micro {args.micro_b}), fp32, "
          f"ZeRO-{args.zero_b}; 1 rank x 2 threads vs 2 ranks x 1 thread; "
          f"{args.warmup_b} warm-up + {args.steps_b} measured steps")
    print(f"  {'layout':8s} {'ranks x threads':>15s} {'grad_accum':>10s} {'median s/step':>13s} "
          f"{'vs 1 rank':>9s} {'tokens/s':>9s}   last loss")
    base = None
    for name, world, pp, tp, threads in LAYOUTS_B:
        job = {"pp": pp, "tp": tp, "zero": args.zero_b, "micro": args.micro_b, "global_batch": G,
               "warmup": args.warmup_b, "steps": args.steps_b}
        out = run_ranks(__file__, world, job, threads=threads)
        med = statistics.median(out["ranks"][0]["times"])
        base = base or med
        dp = world // (pp * tp)
        print(f"  {name:8s} {f'{world} x {threads}':>15s} {G // (args.micro_b * dp):10d} {med:13.3f} "
              f"{med / base:8.2f}x {G * MODEL['seq_length'] / med:9.0f}   {out['ranks'][0]['losses'][-1]:.6f}")
    m = G // args.micro_b
    print(f"  vs 1 rank: step time relative to 1 rank x 2 threads (<1: faster). The 1F1B pipeline idles "
          f"(pp-1)/(m+pp-1) = {1 / (m + 1):.0%} of a step with m={m} micro-batches on 2 stages.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2, help="(a) torch threads")
    ap.add_argument("--micro", type=int, default=2, help="(a) sequences per step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=8, help="(b) sequences per step")
    ap.add_argument("--micro-b", type=int, default=1, help="(b) micro-batch size")
    ap.add_argument("--zero-b", type=int, default=1, help="(b) ZeRO stage")
    ap.add_argument("--warmup-b", type=int, default=1)
    ap.add_argument("--steps-b", type=int, default=4)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_b(json.loads(args.worker))
        return
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args)


if __name__ == "__main__":
    main()
