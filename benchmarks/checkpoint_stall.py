"""How long a checkpoint save stalls training, and the host memory it takes: sync vs async.

    python benchmarks/checkpoint_stall.py                  # the demo model and GPT-3 350M
    python benchmarks/checkpoint_stall.py --models demo    # one of them

For each model and each mode (checkpoint.async_save false / true) a fresh process (one rank,
fp32, ZeRO-1, micro-batch 1, AdamW) trains a few steps, saves once through the trainer's
Checkpointer and trains on until the checkpoint is complete (complete.json written). Reported:

    step_s        median step time without a save
    save_call_s   how long the save call held the training loop (sync: the whole durable write;
                  async: DeepSpeed's bookkeeping and the host copy)
    overlap       steps trained while the background writer was still writing (async)
    stall_s       save_call_s + the extra time of the overlapped steps over step_s: what the save
                  cost the run in wall-clock time
    complete_s    from the save call to the checkpoint being durable and declared complete
    ckpt_mib      size of the checkpoint on disk
    extra_rss_mib peak resident memory during the save above the resident memory before it
                  (sampled every 5 ms): the host copy of the state in async mode

"350M" is GPT-3 350M (deepspeed_configs/350M.json) at sequence length 128 and fp32 (fp16 does not
run on this CPU), the largest GPT-3 table size whose training state (~20 B/parameter with fp32
AdamW and ZeRO-1) plus an asynchronous host copy (16 B/parameter) fits this 24 GiB machine
next to other work. Timings on this shared 2-core machine move with its load: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

MODELS = {"demo": ("demo.json", {}), "350M": ("350M.json", {"seq_length": 128})}


def _config(model: str, ckpt_dir: str, async_save: bool):
    from megatron_neox.config import config_from_dict, read_config_file, resolve_config_path

    name, overrides = MODELS[model]
    base = read_config_file(resolve_config_path(name))
    return config_from_dict({
        "model": {**base["model"], **overrides},
        "train": {"iters": 1000, "micro_batch_size": 1, "global_batch_size": 1},
        "checkpoint": {"dir": ckpt_dir, "async_save": async_save},
        "zero": {"stage": 1},
    }, source=name)


class _RssSampler(threading.Thread):
    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)


def _worker(job: dict) -> dict:
    import psutil
    import torch

    from parallel_overhead import micro_batches
    from megatron_neox.training.checkpointer import Checkpointer, StopSignal, TrainState
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg = _config(job["model"], job["dir"], job["async"])
    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    ckpt = Checkpointer(cfg, engine, topo, StopSignal())
    state = TrainState()

    def step():
        t0 = time.perf_counter()
        train_step(engine, micro_batches(cfg, state.iteration, 1, 0), topo, clipper)
        state.iteration += 1
        return time.perf_counter() - t0

    step()  # warm-up
    base = statistics.median(step() for _ in range(job["steps"]))
    rss0 = psutil.Process().memory_info().rss
    sampler = _RssSampler()
    t0 = time.perf_counter()
    ckpt.save(state, wait=False)
    call = time.perf_counter() - t0
    overlapped = []
    while ckpt.pending is not None and ckpt.writer.pending():
        overlapped.append(step())
    ckpt.flush()
    complete = time.perf_counter() - t0
    sampler.running = False
    sampler.join()
    size = sum(f.stat().st_size for f in Path(job["dir"]).rglob("*") if f.is_file())
    params = sum(p.numel() for p in engine.module.parameters())
    return {"model": job["model"], "mode": "async" if job["async"] else "sync", "params_m": params / 1e6,
            "step_s": base, "save_call_s": call, "overlap": len(overlapped),
            "stall_s": call + sum(max(0.0, s - base) for s in overlapped), "complete_s": complete,
            "ckpt_mib": size / 2**20, "extra_rss_mib": (sampler.peak - rss0) / 2**20,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=3, help="steps timed without a save (median)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    print(f"{'model':>6} {'params':>8} {'mode':>5} {'step_s':>7} {'save_call_s':>11} {'overlap':>7} "
          f"{'stall_s':>8} {'complete_s':>10} {'ckpt_mib':>9} {'extra_rss_mib':>13}")
    for model in args.models:
        for async_save in (False, True):
            tmp = tempfile.mkdtemp(prefix="mnx_ckpt_stall_")
            try:
                job = {"model": model, "async": async_save, "dir": os.path.join(tmp, "ckpt"), "steps": args.steps}
                r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                                   capture_output=True, text=True, cwd=str(REPO))
                lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
                if r.returncode or not lines:
                    sys.exit(f"{model} async={async_save} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
                x = json.loads(lines[-1][len("RESULT "):])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"{x['model']:>6} {x['params_m']:>7.1f}M {x['mode']:>5} {x['step_s']:>7.3f} {x['save_call_s']:>11.3f} "
                  f"{x['overlap']:>7} {x['stall_s']:>8.3f} {x['complete_s']:>10.3f} {x['ckpt_mib']:>9.0f} "
                  f"{x['extra_rss_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
