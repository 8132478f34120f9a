#!/usr/bin/env python
"""One command for a GPU box: are the GPU paths right, and how fast are they?

    python benchmarks/gpu_check.py                   # one GPU, < 8 minutes
    python benchmarks/gpu_check.py --tiny            # the same logic on CPU, small shapes (a test runs it)
    python benchmarks/gpu_check.py --json out.json   # where the figures go (default gpu_check.json)

Checks, in order:
  parity      3 optimizer steps of a small model: an independent CPU fp32 reference (plain torch
              AdamW + global-norm clipping, no DeepSpeed) against the engine on the device in fp32
              at ZeRO 0 and 1, and fp16 / bf16 at ZeRO 1 (ZeRO-0 with half precision must be
              refused at config time). Same initial weights (drawn on the host), same batches.
  syncs       host syncs per training step: aten._local_scalar_dense calls (.item(), int(t),
              bool(t)) counted by a dispatch mode, in the model's forward+backward alone ("ours")
              and in a whole engine step (DeepSpeed's included); on a GPU also the warnings of
              torch.cuda.set_sync_debug_mode("warn").
  kernels     which attention kernels a forward pass of each attention flavour runs (torch
              profiler: CUDA kernel names on a GPU, aten ops on a CPU).
  throughput  tokens/s and MFU of a ~1B model (Pythia-1B shapes) with activation checkpointing,
              bf16 (fp16 where bf16 is not native), ZeRO as `auto` picks it.
  decode      KV-cache decoding: logits equal a full recompute, and decode tokens/s.

Prints one line per check, a one-line verdict (PASS/FAIL), and writes everything as JSON.
On CPU (--tiny) fp16 runs with DeepSpeed's fp16 check patched (its scaler logic is device-free).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
if "--tiny" in sys.argv[1:]:  # the CPU paths even on a GPU box: hide the GPUs before torch looks
    os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")

import torch  # noqa: E402

STEPS = 3
# Relative loss tolerance against the CPU fp32 reference (see tests/test_precision.py for the
# reasoning): fp32 differs only by reduction order (1e-4 leaves room for cuBLAS' split-K sums),
# fp16/bf16 by 10x their unit roundoff.
LOSS_RTOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 4e-2}

PARITY_MODEL = {
    "full": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "seq_length": 128, "vocab_size": 1000},
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 200},
}
# Pythia-1B's shapes (deepspeed_configs/pythia-1B.json): 1.01B parameters.
BIG_MODEL = {
    "full": {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 8, "seq_length": 2048,
             "vocab_size": 50277, "rotary_pct": 0.25},
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
             "vocab_size": 200, "rotary_pct": 0.25},
}
BIG_BATCH = {"full": (8, 10), "tiny": (2, 2)}  # (micro batch, timed steps)
FLAVOURS = {
    "dense_rotary": {},
    "alibi": {"position_embedding": "alibi"},
    "alternating_local": {"attention_pattern": "alternating_local", "local_window": 16,
                          "position_embedding": "learned"},
}
ATTENTION_NAME_PARTS = ("attention", "attn", "flash", "fmha", "flex", "softmax", "bmm", "sdpa", "triton")


def make_config(model: dict, precision: str, zero, micro: int, global_batch: int, **extra):
    from megatron_neox.config import config_from_dict

    data = {
        "model": {"rotary_pct": 0.5, "make_vocab_size_divisible_by": 8, **model},
        "train": {"iters": STEPS, "micro_batch_size": micro, "global_batch_size": global_batch, "seed": 1234},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.1, "clip_grad": 1.0},
        "precision": precision, "zero": {"stage": zero}, "log": {"peak_tflops": 1.0},
    }
    for key, value in extra.items():
        node = data
        *path, last = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return config_from_dict(data)


def batches(cfg, step: int):
    """The global batch of `step` as micro-batches (random tokens, seeded by step)."""
    m, t = cfg.model, cfg.train
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(t.global_batch_size // t.micro_batch_size):
        rows = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
        out.append({"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                    "loss_mask": torch.ones(t.micro_batch_size, m.seq_length),
                    "position_ids": torch.arange(m.seq_length).expand(t.micro_batch_size, -1).contiguous()})
    return out


# ---- parity ----------------------------------------------------------------------------------


def reference_losses(cfg):
    """fp32 on the CPU without DeepSpeed: what every engine run must reproduce."""
    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.training.engine import param_groups

    o = cfg.optimizer
    with torch.device("cpu"):
        model = GPTNeoX(cfg.model, cfg.model.padded_vocab(1), seed=cfg.train.seed)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    losses = []
    for step in range(STEPS):
        micro = batches(cfg, step)
        total = 0.0
        for mb in micro:
            loss = model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"])
            (loss / len(micro)).backward()
            total += float(loss)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(micro))
    return losses, norm


def engine_run(cfg, steps: int = STEPS):
    """Build the engine for `cfg` on this device and train `steps` steps; (losses, last StepResult,
    a step function for more steps, the engine)."""
    from functools import partial

    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    step_fn = partial(train_step, engine, topo=topo, clipper=clipper)
    losses, r = [], None
    for step in range(steps):
        r = step_fn(batches(cfg, step))
        losses.append(r.loss)
    return losses, r, step_fn, engine


def release(*objects):
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_parity(size: str) -> dict:
    from megatron_neox.errors import ConfigError

    base = PARITY_MODEL[size]
    ref_cfg = make_config(base, "fp32", 0, 2, 4)
    ref, ref_norm = reference_losses(ref_cfg)
    runs = {}
    for precision, zero in (("fp32", 0), ("fp32", 1), ("fp16", 1), ("bf16", 1)):
        name = f"{precision}_zero{zero}"
        if precision == "bf16" and torch.cuda.is_available():
            from megatron_neox.hardware import bf16_native

            if not bf16_native():
                runs[name] = {"skipped": "no native bf16 on this GPU"}
                continue
        cfg = make_config(base, precision, zero, 2, 4)
        losses, r, _, engine = engine_run(cfg)
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        runs[name] = {"losses": losses, "max_rel_diff": worst, "tolerance": LOSS_RTOL[precision],
                      "grad_norm_last": r.grad_norm, "loss_scale": r.loss_scale,
                      "ok": worst <= LOSS_RTOL[precision] and all(math.isfinite(x) for x in losses)}
        release(engine)
    for precision in ("fp16", "bf16"):
        try:
            make_config(base, precision, 0, 2, 4)
            runs[f"{precision}_zero0"] = {"ok": False, "refused": False}
        except ConfigError as e:
            runs[f"{precision}_zero0"] = {"ok": True, "refused": str(e).splitlines()[-1].strip()[:120]}
    ok = all(v.get("ok", True) for v in runs.values())
    return {"reference_cpu_fp32": ref, "reference_last_grad_norm": ref_norm, "runs": runs, "ok": ok}


# ---- host syncs ------------------------------------------------------------------------------


class SyncCounter:
    """Counts the host syncs that tensor code asks for (.item(), int(t), float(t), bool(t) all
    dispatch to aten._local_scalar_dense), on any device, by the line that asked (the innermost
    frame outside torch)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        torch_dir = str(Path(torch.__file__).parent)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                                  if not f.filename.startswith(torch_dir) and f.filename != __file__), None)
                    where = "?" if frame is None else f"{_short(frame.filename)}:{frame.lineno}"
                    counter.sites[where] = counter.sites.get(where, 0) + 1
                return func(*args, **(kwargs or {}))

        self.sites = {}
        self.mode = Mode()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __enter__(self):
        self.sites = {}
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@contextlib.contextmanager
def cuda_sync_warnings():
    """Yields a list that collects torch.cuda.set_sync_debug_mode('warn') warnings (GPU only)."""
    caught = []
    if not torch.cuda.is_available():
        yield caught
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught.extend(str(w.message).splitlines()[0] for w in records if "synchroniz" in str(w.message))


def check_syncs(size: str) -> dict:
    precision = "bf16" if not torch.cuda.is_available() or _bf16_ok() else "fp16"
    cfg = make_config(PARITY_MODEL[size], precision, "auto", 2, 4)
    _, _, step_fn, engine = engine_run(cfg, steps=1)  # warm-up step outside the count
    micro = batches(cfg, 1)
    model = engine.module
    device = engine.device
    mb = {k: v.to(device) for k, v in micro[0].items()}
    counter = SyncCounter()
    with cuda_sync_warnings() as ours_cuda, counter:
        loss = model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"])
        loss.backward()
    ours, ours_sites = counter.count, dict(counter.sites)
    model.zero_grad(set_to_none=True)
    with cuda_sync_warnings() as step_cuda, counter:
        step_fn(micro)
    out = {"precision": precision, "model_forward_backward": ours, "model_sites": ours_sites,
           "engine_step": counter.count, "engine_step_sites": dict(counter.sites),
           "micro_batches_per_step": len(micro)}
    if torch.cuda.is_available():
        out.update(cuda_warnings_model=len(ours_cuda), cuda_warnings_step=len(step_cuda),
                   cuda_warning_examples=sorted(set(step_cuda))[:5])
    out["ok"] = ours == 0 and (not torch.cuda.is_available() or len(ours_cuda) == 0)
    release(engine)
    return out


def _short(filename: str) -> str:
    for root in ("megatron_neox", "deepspeed"):
        marker = os.sep + root + os.sep
        if marker in filename:
            return root + os.sep + filename.split(marker, 1)[1]
    return filename


def _bf16_ok() -> bool:
    from megatron_neox.hardware import bf16_native

    return bf16_native()


# ---- attention kernels ---------------------------------------------------------------------


def check_kernels(size: str, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from megatron_neox.model.gpt_neox import GPTNeoX

    dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if _bf16_ok() else torch.float16)
    out = {}
    for name, extra in FLAVOURS.items():
        cfg = make_config({**PARITY_MODEL[size], **extra}, "fp32", 0, 2, 2)
        with torch.device(device):
            model = GPTNeoX(cfg.model, cfg.model.padded_vocab(1)).to(dtype).eval()
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), device=device)
        with torch.no_grad():
            model(tokens)  # warm-up (kernel selection, compilation)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                model(tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        names = set()
        for e in prof.events():
            on_device = device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA
            if (on_device or device.type == "cpu") and any(p in e.name.lower() for p in ATTENTION_NAME_PARTS):
                names.add(e.name[:100])
        out[name] = sorted(names)
        release(model)
    return out


# ---- throughput ------------------------------------------------------------------------------


def check_throughput(size: str) -> dict:
    from megatron_neox import hardware
    from megatron_neox.training.metrics import flops_per_token
    from megatron_neox.resolve import describe_setup, resolve

    on_gpu = torch.cuda.is_available()
    precision = ("bf16" if _bf16_ok() else "fp16") if on_gpu else "fp32"
    micro, timed = BIG_BATCH[size]
    cfg = make_config(BIG_MODEL[size], precision, "auto", micro, micro, activation_checkpointing__interval=1)
    _, _, step_fn, engine = engine_run(cfg, steps=2)  # warm-up: allocator, kernel choice

    step_batches = [batches(cfg, s) for s in range(timed)]
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for micro_batches in step_batches:
        step_fn(micro_batches)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = timed * cfg.train.global_batch_size * cfg.model.seq_length
    peak, source = hardware.peak_tflops(precision)
    flops = flops_per_token(cfg)
    tps = tokens / seconds
    out = {"precision": precision, "params": _count(cfg), "micro_batch": micro, "seq_length": cfg.model.seq_length,
           "setup": describe_setup(resolve(cfg, 1)), "tokens_per_sec": tps,
           "tflops_per_gpu": tps * flops["hardware"] / 1e12, "mfu": tps * flops["model"] / 1e12 / peak,
           "peak_tflops": peak, "peak_source": source,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
    release(engine)
    return out


def _count(cfg) -> int:
    from megatron_neox.model.gpt_neox import count_parameters

    return count_parameters(cfg.model, 1)["total"]


# ---- decode --------------------------------------------------------------------------------


def check_decode(size: str, device: torch.device) -> dict:
    from megatron_neox.model.gpt_neox import GPTNeoX

    cfg = make_config(PARITY_MODEL[size], "fp32", 0, 2, 2)
    with torch.device(device):
        model = GPTNeoX(cfg.model, cfg.model.padded_vocab(1)).eval()
    prompt, new = 8, min(32, cfg.model.seq_length - 8)
    seq = torch.randint(0, cfg.model.vocab_size, (1, prompt), device=device)
    with torch.no_grad():
        logits, cache = model(seq, use_cache=True)
        steps = [logits]
        nxt = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            seq = torch.cat([seq, nxt], dim=1)
            logits, cache = model(nxt, kv_cache=cache, use_cache=True)
            steps.append(logits)
            nxt = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        full = model(seq)
    diff = float((torch.cat(steps, dim=1) - full).abs().max())
    release(model)
    return {"new_tokens": new, "max_abs_diff_vs_recompute": diff, "decode_tokens_per_sec": new / seconds,
            "ok": diff <= 1e-4}


# ---- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (the logic, not the speed)")
    p.add_argument("--json", default="gpu_check.json", help="where to write the figures")
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if not args.tiny:
            print("error: no GPU visible; `--tiny` runs the same checks on CPU", file=sys.stderr)
            return 2
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True  # the scaler's logic is device-free
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    device = torch.device("cuda" if on_gpu else "cpu")
    report = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
              "mode": size}
    import deepspeed

    report["deepspeed"] = deepspeed.__version__
    t0 = time.perf_counter()
    for name, fn in (("parity", lambda: check_parity(size)), ("syncs", lambda: check_syncs(size)),
                     ("kernels", lambda: check_kernels(size, device)),
                     ("throughput", lambda: check_throughput(size)), ("decode", lambda: check_decode(size, device))):
        start = time.perf_counter()
        report[name] = fn()
        report[name + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name:<10} {_summary(name, report[name])}", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [k for k in ("parity", "syncs", "decode") if not report[k]["ok"]]
    report["verdict"] = "PASS" if not failed else "FAIL: " + ", ".join(failed)
    out = Path(args.json)
    from megatron_neox.durable import write_json

    write_json(out, report, indent=1)
    t = report["throughput"]
    print(f"gpu_check {report['verdict']} | {report['device']} | parity "
          f"{'ok' if report['parity']['ok'] else 'FAIL'} | host syncs/step ours "
          f"{report['syncs']['model_forward_backward']} | {t['tokens_per_sec']:,.0f} tok/s, MFU "
          f"{100 * t['mfu']:.1f}% ({t['precision']}) | decode {report['decode']['decode_tokens_per_sec']:,.0f} tok/s | "
          f"{report['seconds']:.0f} s | {out}", flush=True)
    return 0 if not failed else 1


def _summary(name: str, r: dict) -> str:
    if name == "parity":
        parts = [f"{k} {v['max_rel_diff']:.1e}" if "max_rel_diff" in v else f"{k} "
                 + ("refused" if v.get("refused") else v.get("skipped", "?")) for k, v in r["runs"].items()]
        return ("ok | " if r["ok"] else "FAIL | ") + " | ".join(parts)
    if name == "syncs":
        sites = ", ".join(f"{k} x{v}" for k, v in r["model_sites"].items())
        return (f"{'ok' if r['ok'] else 'FAIL'} | model fwd+bwd {r['model_forward_backward']}"
                f"{' (' + sites + ')' if sites else ''} | engine step {r['engine_step']} "
                f"({r['micro_batches_per_step']} micro-batches, DeepSpeed's and the loss read-out included)")
    if name == "kernels":
        return " | ".join(f"{k}: {', '.join(v[:3]) or '-'}" for k, v in r.items())
    if name == "throughput":
        return (f"{r['params'] / 1e6:,.1f}M params {r['precision']} | {r['tokens_per_sec']:,.0f} tok/s | "
                f"{r['tflops_per_gpu']:.3g} TFLOP/s | MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.3g} "
                f"({r['peak_source']}) | {r['setup']}")
    return (f"{'ok' if r['ok'] else 'FAIL'} | max |diff| {r['max_abs_diff_vs_recompute']:.1e} | "
            f"{r['decode_tokens_per_sec']:,.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
