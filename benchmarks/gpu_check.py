#!/usr/bin/env python
"""One command for a GPU box: are the GPU paths right, and how fast are they?

    python benchmarks/gpu_check.py                   # one GPU (budget 6 minutes; not yet measured)
    python benchmarks/gpu_check.py --tiny            # the same logic on CPU, small shapes (a test runs it)
    python benchmarks/gpu_check.py --json out.json   # where the figures go (default gpu_check.json)
    python benchmarks/gpu_check.py --budget 420      # start no check, row or CLI run after 7 minutes

Checks, in order:
  parity      6 optimizer steps of a small model, each over 2 accumulated micro-batches: an
              independent CPU fp32 reference (plain torch AdamW + global-norm clipping, no
              DeepSpeed, eager) against the engine on the device in fp32 at ZeRO 0 and 1, and
              fp16 / bf16 at ZeRO 1 (ZeRO-0 with half precision must be refused at config time),
              with `model.compile` as `auto` sets it (compiled layers on a GPU; each run says).
              Same initial weights (drawn on the host), same batches.
  syncs       host syncs per training step: aten._local_scalar_dense calls (.item(), int(t),
              bool(t)) counted by a dispatch mode, in the model's forward+backward alone ("ours")
              and in a whole engine step (DeepSpeed's included); on a GPU also the warnings of
              torch.cuda.set_sync_debug_mode("warn").
  kernels     which attention kernels a forward pass of each attention flavour runs (torch
              profiler: CUDA kernel names on a GPU, aten ops on a CPU).
  decode      KV-cache decoding: logits equal a full recompute, and decode tokens/s.
  throughput  tokens/s, MFU and peak memory of Pythia-1B shapes (micro 8, seq 2048), bf16 (fp16
              where bf16 is not native), ZeRO as `auto` picks it: ours and Hugging Face's
              GPTNeoXForCausalLM on the same batches, eager and compiled, with activation
              checkpointing every layer and without; ours / HF per row. Figures, not a verdict.
  cli         Pythia-160M through the real loop (launch/train.py in a subprocess) in fp16 as
              shipped and in bf16, against our engine alone and HF eager in this process.
The verdict checks run first, the long figures last: a run stopped by a time limit keeps the
verdicts (the JSON is rewritten after every check).

Prints one line per check, a one-line verdict (PASS/FAIL), and writes everything as JSON.
On CPU (--tiny) fp16 runs with DeepSpeed's fp16 check patched (its scaler logic is device-free).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
if "--tiny" in sys.argv[1:]:  # the CPU paths even on a GPU box: hide the GPUs before torch looks
    os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")

import torch  # noqa: E402

# Parity: PARITY_STEPS optimizer steps on one repeated global batch at PARITY_LR, so the loss falls
# ~80% (5.4 -> 0.9 on the tiny model) and a wrong learning rate, a missing loss scale or an update
# that is never applied shows in every figure below (measured on CPU, --tiny: lr x0.5 moves the
# weights 0.60x as far, update difference 0.47, loss difference 18% of the movement; lr 0: 1.0).
PARITY_STEPS = 6
PARITY_LR = 1e-2
# Tolerances per precision on (a) the largest loss difference from the CPU fp32 reference, as a
# fraction of how far the reference loss moved; (b) the largest relative difference of the
# pre-clipping gradient norm (catches unscaled fp16 gradients: Adam and clipping would hide them);
# (c) |update - reference update| / |reference update| over all weights (the weights moved, and
# where the reference moved them). Measured on CPU (--tiny, 2026-12-04): fp32 5e-8, 1e-7, 2.2e-4
# (only summation order differs; Adam divides by sqrt(v), which magnifies it where gradients are
# ~0); fp16 8.7e-5, 3.4e-4, 2.3e-2; bf16 1.4e-3, 2.8e-3, 4.6e-2. The tolerances leave ~3-20x for
# GPU kernels (cuBLAS split-K, flash attention) and stay well below a halved learning rate.
PARITY_TOLERANCE = {
    "fp32": {"loss": 1e-4, "grad_norm": 1e-4, "update": 1e-2},
    "fp16": {"loss": 2e-3, "grad_norm": 5e-3, "update": 0.1},
    "bf16": {"loss": 1e-2, "grad_norm": 2e-2, "update": 0.15},
}

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
BIG_BATCH = {"full": (8, 6), "tiny": (2, 2)}  # (micro batch, timed steps)
# The CLI row: Pythia-160M (deepspeed_configs/pythia-160M.json) at micro 8 through launch/train.py.
CLI_MODEL = {"full": {}, "tiny": {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
                                  "model.seq_length": 64, "model.vocab_size": 200}}
CLI_STEPS = {"full": (30, 10), "tiny": (4, 2)}  # (steps, log interval: the last window is timed)
CLI_ACCUM = 4
FLAVOURS = {
    "dense_rotary": {},
    "alibi": {"position_embedding": "alibi"},
    "alternating_local": {"attention_pattern": "alternating_local", "local_window": 16,
                          "position_embedding": "learned"},
}
# The kernel each flavour must run (a substring of a profiled name). CPU: PyTorch's fused flash
# kernel for every flavour (it takes the additive ALiBi/band mask); not the math path
# (aten::_scaled_dot_product_attention_math). CUDA: cuDNN's or PyTorch's flash/memory-efficient
# kernel for dense causal attention, compiled FlexAttention (triton) for ALiBi and local bands
# (megatron_neox/model/attention.py `select_kernel`).
EXPECTED_KERNELS = {
    "cpu": {name: ("_scaled_dot_product_flash_attention_for_cpu",) for name in FLAVOURS},
    "cuda": {"dense_rotary": ("flash", "cudnn", "fmha", "efficient_attention"),
             "alibi": ("triton", "flex"), "alternating_local": ("triton", "flex")},
}
ATTENTION_NAME_PARTS = ("attention", "attn", "flash", "fmha", "flex", "softmax", "bmm", "sdpa", "triton", "cudnn")


def make_config(model: dict, precision: str, zero, micro: int, global_batch: int, **extra):
    from megatron_neox.config import config_from_dict

    data = {
        "model": {"rotary_pct": 0.5, "make_vocab_size_divisible_by": 8, **model},
        "train": {"iters": PARITY_STEPS, "micro_batch_size": micro, "global_batch_size": global_batch, "seed": 1234},
        "optimizer": {"lr": PARITY_LR, "weight_decay": 0.1, "clip_grad": 1.0},
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


def _flat_weights(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, by name, as one fp32 CPU vector."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for _, p in sorted(model.named_parameters())])


# ---- parity ----------------------------------------------------------------------------------


def reference_run(cfg) -> dict:
    """fp32 on the CPU without DeepSpeed (plain AdamW + global-norm clipping): what every engine
    run must reproduce. Losses, pre-clipping gradient norms, and the weights before and after."""
    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.training.engine import param_groups

    o = cfg.optimizer
    with torch.device("cpu"):
        model = GPTNeoX(cfg.model, cfg.model.padded_vocab(1), seed=cfg.train.seed)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    before, losses, norms = _flat_weights(model), [], []
    micro = batches(cfg, 0)
    for _ in range(PARITY_STEPS):
        total = 0.0
        for mb in micro:
            loss = model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"])
            (loss / len(micro)).backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(micro))
    return {"losses": losses, "grad_norms": norms, "before": before, "after": _flat_weights(model)}


def engine_run(cfg, steps: int = PARITY_STEPS, same_batch: bool = False, snapshot: Optional[list] = None):
    """Build the engine for `cfg` on this device and train `steps` steps (on batch 0 every step when
    `same_batch`); (losses, StepResults, a step function for more steps, the engine). `snapshot`
    receives the module's weights before the first step (in half precision DeepSpeed has rounded them)."""
    from functools import partial

    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    step_fn = partial(train_step, engine, topo=topo, clipper=clipper)
    if snapshot is not None:
        snapshot.append(_flat_weights(engine.module))
    losses, results = [], []
    for step in range(steps):
        r = step_fn(batches(cfg, 0 if same_batch else step))
        losses.append(r.loss)
        results.append(r)
    return losses, results, step_fn, engine


def release(*objects):
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parity_figures(run: dict, ref: dict) -> dict:
    """How far an engine run is from the reference, each as a fraction (see PARITY_TOLERANCE)."""
    moved = abs(ref["losses"][0] - ref["losses"][-1])
    d_ref = ref["after"] - ref["before"]
    d_run = run["after"] - run["before"]
    return {
        "loss": max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) / moved,
        "grad_norm": max(abs(a - b) / b for a, b in zip(run["grad_norms"], ref["grad_norms"])),
        "update": float((d_run - d_ref).norm() / d_ref.norm()),
        "moved": float(d_run.norm() / d_ref.norm()),
    }


def parity_ok(figures: dict, precision: str, losses) -> bool:
    tol = PARITY_TOLERANCE[precision]
    return (all(figures[k] <= tol[k] for k in tol) and abs(figures["moved"] - 1) <= tol["update"]
            and all(math.isfinite(x) for x in losses))


def check_parity(size: str) -> dict:
    from megatron_neox.errors import ConfigError

    base = PARITY_MODEL[size]
    ref = reference_run(make_config(base, "fp32", 0, 2, 4))
    runs = {}
    for precision, zero in (("fp32", 0), ("fp32", 1), ("fp16", 1), ("bf16", 1)):
        name = f"{precision}_zero{zero}"
        if precision == "bf16" and torch.cuda.is_available() and not _bf16_ok():
            runs[name] = {"skipped": "no native bf16 on this GPU"}
            continue
        cfg = make_config(base, precision, zero, 2, 4)
        before = []
        losses, results, _, engine = engine_run(cfg, same_batch=True, snapshot=before)
        run = {"losses": losses, "grad_norms": [r.grad_norm for r in results], "before": before[0],
               "after": _flat_weights(engine.module)}
        compiled = _layers_compiled(engine.module)
        release(engine)
        fig = parity_figures(run, ref)
        runs[name] = {"losses": losses, "grad_norms": run["grad_norms"], **fig, "tolerance": PARITY_TOLERANCE[precision],
                      "compiled": compiled, "loss_scale": results[-1].loss_scale,
                      "skipped_steps": sum(r.skipped for r in results),
                      "ok": parity_ok(fig, precision, losses) and not any(r.skipped for r in results)}
    for precision in ("fp16", "bf16"):
        try:
            make_config(base, precision, 0, 2, 4)
            runs[f"{precision}_zero0"] = {"ok": False, "refused": False}
        except ConfigError as e:
            runs[f"{precision}_zero0"] = {"ok": True, "refused": str(e).splitlines()[-1].strip()[:120]}
    ok = all(v.get("ok", True) for v in runs.values())
    return {"steps": PARITY_STEPS, "lr": PARITY_LR, "reference_cpu_fp32": ref["losses"],
            "reference_grad_norms": ref["grad_norms"], "runs": runs, "ok": ok}


# ---- host syncs ------------------------------------------------------------------------------


def _site(stack) -> str:
    """Where a sync came from: the innermost frame in this project or DeepSpeed (`file:line`),
    marked '(backward)' when it happened inside autograd's backward pass, whose ops Python does not
    see one by one (the site is then the line that called backward)."""
    torch_dir = str(Path(torch.__file__).parent)
    backward = any(f.filename.startswith(torch_dir) and f.name in ("backward", "run_backward", "_engine_run_backward")
                   for f in stack)
    frame = next((f for f in reversed(stack) if not f.filename.startswith(torch_dir) and f.filename != __file__
                  and ("megatron_neox" in f.filename or "deepspeed" in f.filename)), None)
    if frame is None:
        frame = next((f for f in reversed(stack) if not f.filename.startswith(torch_dir)), None)
    where = "?" if frame is None else f"{_short(frame.filename)}:{frame.lineno}"
    return where + (" (backward)" if backward else "")


def _in_model(site: str) -> bool:
    return site.startswith(("megatron_neox/model/", "megatron_neox/parallel/"))


class SyncWatch:
    """Both views of the host syncs a region asks for, each by site (`_site`):

    dispatch  aten._local_scalar_dense calls (.item(), int(t), float(t), bool(t)), counted by a
              TorchDispatchMode on any device (so also on CPU). Blind to syncs below the dispatcher.
    cuda      torch.cuda.set_sync_debug_mode("warn") warnings (GPU only). c10 raises them where
              the host waits for the device: a blocking device<->host copy (`memcpy_and_sync`:
              .item()/.cpu(), a tensor copied to the GPU from pageable memory without
              non_blocking, torch.tensor(..., device='cuda')), a stream or device synchronize, and
              ops whose output size depends on the data (nonzero, boolean-mask indexing). Not
              covered (torch's docstring): torch.distributed and torch.sparse; nor syncs inside
              other libraries (NCCL, DeepSpeed's own kernels) or an implicit sync of cudaFree.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    watch._add(watch.dispatch, traceback.extract_stack()[:-1])
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.dispatch, self.cuda = {}, {}
        self._warnings = None

    @staticmethod
    def _add(sites: dict, stack) -> None:
        site = _site(stack)
        sites[site] = sites.get(site, 0) + 1

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            self._add(self.cuda, traceback.extract_stack()[:-1])

    def __enter__(self):
        self.dispatch, self.cuda = {}, {}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # work queued before the region is not the region's
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._on_warning  # called where the warning is raised: the stack is the op's
            torch.cuda.set_sync_debug_mode("warn")
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self._warnings = None

    def summary(self) -> dict:
        out = {"dispatch": sum(self.dispatch.values()), "dispatch_sites": dict(self.dispatch)}
        if torch.cuda.is_available():
            out.update(cuda=sum(self.cuda.values()), cuda_sites=dict(self.cuda),
                       cuda_in_model=sum(n for s, n in self.cuda.items() if _in_model(s)))
        out["dispatch_in_model"] = sum(n for s, n in self.dispatch.items() if _in_model(s))
        return out


def check_syncs(size: str) -> dict:
    """Host syncs of the model's forward+backward and of a whole engine step, each at its first call
    (lazy set-up: caches filled, kernels chosen, optimizer state allocated) and in steady state.
    Verdict: none in the model's steady-state forward+backward, by either view."""
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    precision = "bf16" if not torch.cuda.is_available() or _bf16_ok() else "fp16"
    cfg = make_config(PARITY_MODEL[size], precision, "auto", 2, 4)
    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    model, device = engine.module, engine.device
    watch, out = SyncWatch(), {"precision": precision}
    for phase in ("model_first", "model_steady"):
        mb = {k: v.to(device) for k, v in batches(cfg, 0)[0].items()}
        with watch:
            loss = model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"])
            loss.backward()
        out[phase] = watch.summary()
    model.zero_grad(set_to_none=True)
    for phase, step in (("engine_first", 1), ("engine_steady", 2)):
        micro = batches(cfg, step)
        with watch:
            train_step(engine, micro, topo, clipper)
        out[phase] = watch.summary()
    out["micro_batches_per_step"] = len(batches(cfg, 0))
    steady = out["model_steady"]
    out["ok"] = steady["dispatch"] == 0 and steady.get("cuda", 0) == 0
    release(engine)
    return out


def _short(filename: str) -> str:
    for root in ("megatron_neox", "deepspeed", "benchmarks"):
        marker = os.sep + root + os.sep
        if marker in filename:
            return root + os.sep + filename.split(marker, 1)[1]
    return filename


def _bf16_ok() -> bool:
    from megatron_neox.hardware import bf16_native

    return bf16_native()


# ---- attention kernels ---------------------------------------------------------------------


def kernel_verdict(device_type: str, flavour: str, names) -> bool:
    """Did a profile with these kernel/op `names` run the kernel EXPECTED_KERNELS names?"""
    return any(part in n.lower() for n in names for part in EXPECTED_KERNELS[device_type][flavour])


def check_kernels(size: str, device: torch.device) -> dict:
    """Which attention kernels a forward pass of each flavour runs (torch profiler: CUDA kernel names
    on a GPU, aten ops on a CPU), against the one it must run (EXPECTED_KERNELS)."""
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
        out[name] = {"kernels": sorted(names), "expected": list(EXPECTED_KERNELS[device.type][name]),
                     "ok": kernel_verdict(device.type, name, names)}
        release(model)
    return {"flavours": out, "ok": all(v["ok"] for v in out.values())}


# ---- throughput: ours and the Hugging Face peer, same shapes, same batches -------------------------


def _layers_compiled(module: torch.nn.Module) -> bool:
    """Whether the transformer layers of `module` ran compiled (`model.compile`, decided on their
    first forward)."""
    from megatron_neox.model.transformer import TransformerLayer

    return any(getattr(m, "_compiled", False) for m in module.modules() if isinstance(m, TransformerLayer))


def _has_compile_key() -> bool:
    from megatron_neox.config import ModelConfig

    return "compile" in ModelConfig.model_fields


def _compile_layers(module: torch.nn.Module, layer_type) -> int:
    """Regional compilation: each `layer_type` submodule compiled in place (identical layers share
    one compiled graph); the number compiled."""
    layers = [m for m in module.modules() if isinstance(m, layer_type)]
    for m in layers:
        m.compile()
    return len(layers)


def _timed(step, step_batches, warmup: int) -> dict:
    """tokens/s of `step(micro_batches)` over step_batches after `warmup` untimed steps, and the
    peak device memory of the timed steps."""
    on_gpu = torch.cuda.is_available()
    t_warm = time.perf_counter()
    for b in step_batches[:warmup]:
        step(b)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    warmup_s = t0 - t_warm  # compilation happens here: what a row costs beyond its timed steps
    for b in step_batches[warmup:]:
        step(b)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(mb["tokens"].numel() for b in step_batches[warmup:] for mb in b)
    return {"tokens_per_sec": tokens / seconds,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            "warmup_s": round(warmup_s, 1), "timed_s": round(seconds, 1)}


def time_ours(cfg, timed: int, compiled: Optional[bool], warmup: int = 2) -> dict:
    """Our engine on synthetic batches: train_step exactly as the trainer calls it; `compiled` None:
    `model.compile` as `cfg` has it."""
    from megatron_neox.model.transformer import TransformerLayer

    if compiled is not None and _has_compile_key():
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": compiled})})
    _, _, step_fn, engine = engine_run(cfg, steps=0)
    how = "model.compile" if compiled and _has_compile_key() else None
    if compiled and how is None:  # before model.compile existed: the same regional compilation, applied here
        how = f"{_compile_layers(engine.module, TransformerLayer)} layers compiled by gpu_check"
    out = _timed(step_fn, [batches(cfg, s) for s in range(warmup + timed)], warmup)
    out["compiled"] = how if compiled is not None else _layers_compiled(engine.module)
    release(engine)
    return out


def time_hf(cfg, timed: int, compiled: bool, recompute: bool, warmup: int = 2) -> dict:
    """Hugging Face GPTNeoXForCausalLM of the same shapes: fp32 weights, autocast to the run's half
    precision on a GPU, SDPA attention, torch (fused on CUDA) AdamW, global-norm clipping; gradient
    checkpointing through transformers, compilation of each decoder layer in place."""
    import torch.nn.functional as F
    import transformers

    from megatron_neox.convert.hf import to_hf_config
    from megatron_neox.training.engine import param_groups

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    hf_cfg = to_hf_config(cfg.model, cfg.model.padded_vocab(1))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    hf.train()
    if recompute:
        # Newer transformers 5.x renamed gradient_checkpointing_enable (kept, deprecated).
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        _compile_layers(hf, type(hf.gpt_neox.layers[0]))
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(hf, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=on_gpu or None)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler("cuda") if half is torch.float16 else None

    def step(micro):
        for mb in micro:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                logits = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), mb["labels"].view(-1)) / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_grad)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)

    out = _timed(step, [batches(cfg, s) for s in range(warmup + timed)], warmup)
    release(hf, opt)
    return out


def check_throughput(size: str, compile_rows: bool) -> dict:
    """Pythia-1B shapes: ours and HF, eager and compiled, with activation checkpointing every layer
    and without, the same batches; tokens/s, MFU, peak memory and ours / HF per row. A row that
    fails is reported with its error and the others still run."""
    from megatron_neox import hardware
    from megatron_neox.training.metrics import flops_per_token
    from megatron_neox.resolve import describe_setup, resolve

    on_gpu = torch.cuda.is_available()
    precision = ("bf16" if _bf16_ok() else "fp16") if on_gpu else "fp32"
    micro, timed = BIG_BATCH[size]
    peak, source = hardware.peak_tflops(precision)
    rows = {}
    # First what a user gets on a 141 GB card (compiled, no recompute: `auto` for both), so that a
    # time limit (--budget) cuts the least telling rows.
    for recompute in (False, True):
        cfg = make_config(BIG_MODEL[size], precision, "auto", micro, micro,
                          activation_checkpointing__interval=1 if recompute else 0)
        flops = flops_per_token(cfg)
        for compiled in (True, False):
            name = f"{'compiled' if compiled else 'eager'}_{'recompute' if recompute else 'no_recompute'}"
            if compiled and not compile_rows:
                rows[name] = {"skipped": "compiled rows run on a GPU (or with --compile): Inductor compiles each layer"}
                continue
            if _out_of_time():
                rows[name] = dict(OVER_BUDGET)
                continue
            row = {}
            for who, fn in (("ours", lambda: time_ours(cfg, timed, compiled)),
                            ("hf", lambda: time_hf(cfg, timed, compiled, recompute))):
                try:
                    r = fn()
                    r["mfu"] = r["tokens_per_sec"] * flops["model"] / 1e12 / peak
                    row[who] = r
                except Exception as e:  # one row's failure (e.g. a compile error) must not hide the others
                    row[who] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            if "tokens_per_sec" in row["ours"] and "tokens_per_sec" in row["hf"]:
                row["ours_over_hf"] = row["ours"]["tokens_per_sec"] / row["hf"]["tokens_per_sec"]
            rows[name] = row
    cfg = make_config(BIG_MODEL[size], precision, "auto", micro, micro)
    return {"precision": precision, "params": _count(cfg), "micro_batch": micro, "seq_length": cfg.model.seq_length,
            "setup": describe_setup(resolve(cfg, 1)), "peak_tflops": peak, "peak_source": source, "rows": rows}


def _count(cfg) -> int:
    from megatron_neox.model.gpt_neox import count_parameters

    return count_parameters(cfg.model, 1)["total"]


# ---- the real CLI loop -----------------------------------------------------------------------------


def _write_random_dataset(prefix: Path, vocab: int, seq_length: int, samples: int) -> None:
    """An indexed dataset of `samples` random documents of seq_length tokens (+ EOD 0)."""
    import numpy as np

    from megatron_neox.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix), np.uint16 if vocab < 65500 else np.int32)
    for _ in range(samples):
        builder.add_document(np.append(rng.integers(1, vocab, seq_length), 0))
    builder.finalize()


def _cli_run(tmp: Path, precision: str, size: str, overrides: list) -> dict:
    """launch/train.py in a subprocess (a world of one): tokens/s of its last logged window."""
    import subprocess

    log_dir = tmp / f"log_{precision}"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "pythia-160M.json",
           "--set", *overrides, f"precision={precision}", f"log.dir={log_dir}"]
    # A world of its own: not the rendezvous this process joined for the engine checks.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp,
                          env={**env, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "tokens_per_sec" in r][-1]
    return {"tokens_per_sec": last["tokens_per_sec"], "mfu": last.get("mfu"), "step": last.get("step"),
            "data_wait_s": last.get("data_wait_s")}


def check_cli(size: str) -> dict:
    """Pythia-160M (micro 8, grad accumulation CLI_ACCUM) through the real CLI loop (launch/train.py:
    data loader, LR schedule, metrics, the trainer) in fp16 as shipped and in bf16, against our engine
    alone and HF eager on the same shapes in this process."""
    import tempfile

    from megatron_neox.config import load_config

    on_gpu = torch.cuda.is_available()
    steps, interval = CLI_STEPS[size]
    micro = 8 if size == "full" else 2
    shapes = CLI_MODEL[size]
    precisions = (["fp16", "bf16"] if _bf16_ok() else ["fp16"]) if on_gpu else ["fp32"]
    out = {"steps": steps, "micro_batch": micro, "grad_accum": CLI_ACCUM,
           # as shipped: the published recipe's recompute (HF's row below runs without)
           "recompute_interval": load_config("pythia-160M.json").activation_checkpointing.interval}
    with tempfile.TemporaryDirectory(prefix="gpu_check_cli_") as tmp:
        tmp = Path(tmp)
        base = [f"{k}={v}" for k, v in shapes.items()] + [
            f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * CLI_ACCUM}",
            f"train.iters={steps}", f"log.interval={interval}", "data.split=100", "data.check_token_ids=false",
            f"data.prefixes=[\"{tmp / 'data'}\"]", "eval.interval=null", "checkpoint.save_interval=null",
            "lr_schedule.decay_iters=null"]
        cfg = load_config("pythia-160M.json", base)
        m = cfg.model
        _write_random_dataset(tmp / "data", m.vocab_size, m.seq_length, steps * micro * CLI_ACCUM + 64)
        for precision in precisions:
            out[f"cli_{precision}"] = dict(OVER_BUDGET) if _out_of_time() else _cli_run(tmp, precision, size, base)
        half = precisions[-1]
        run_cfg = load_config("pythia-160M.json", base + [f"precision={half}", "zero.stage=1"])
        # The engine as the CLI builds it (model.compile as configured: auto), and HF eager, the peer.
        for key, fn in ((f"engine_{half}", lambda: time_ours(run_cfg, timed=interval, compiled=None)),
                        (f"hf_eager_{half}", lambda: time_hf(run_cfg, timed=interval, compiled=False,
                                                             recompute=False))):
            try:
                out[key] = dict(OVER_BUDGET) if _out_of_time() else fn()
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    hf = out[f"hf_eager_{half}"].get("tokens_per_sec")
    first = out[f"cli_{precisions[0]}"].get("tokens_per_sec")
    if hf and first:
        out[f"cli_{precisions[0]}_over_hf_{half}"] = first / hf
    if len(precisions) == 2 and "tokens_per_sec" in out["cli_bf16"] and first:
        out["cli_bf16_over_fp16"] = out["cli_bf16"]["tokens_per_sec"] / first
    eng = out[f"engine_{half}"].get("tokens_per_sec")
    if eng and out[f"cli_{half}"].get("tokens_per_sec"):
        out[f"cli_over_engine_{half}"] = out[f"cli_{half}"]["tokens_per_sec"] / eng
    out["ok"] = all("error" not in v for v in out.values() if isinstance(v, dict))
    return out


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

# --budget: past this perf_counter() time, the checks and figures not yet started are skipped.
_DEADLINE = math.inf
OVER_BUDGET = {"skipped": "over --budget"}


def _out_of_time() -> bool:
    return time.perf_counter() > _DEADLINE


# Each check's result says "ok" but throughput's (figures, not a verdict), which fails only by raising.
CHECKS = ("parity", "syncs", "kernels", "decode", "throughput", "cli")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (the logic, not the speed)")
    p.add_argument("--json", default="gpu_check.json", help="where to write the figures")
    p.add_argument("--only", help=f"comma-separated checks to run (default all: {','.join(CHECKS)})")
    p.add_argument("--compile", action="store_true", help="with --tiny: the compiled throughput rows too (slow on CPU)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="start no check, throughput row or CLI run after this many seconds (they are reported "
                        "as skipped), so the run ends within a device's time limit with its JSON complete")
    args = p.parse_args(argv)
    # On CPU the CLI row (a second process training through launch/train.py) is opt-in: --only cli.
    default = CHECKS if torch.cuda.is_available() else tuple(c for c in CHECKS if c != "cli")
    only = default if not args.only else tuple(c.strip() for c in args.only.split(","))
    if set(only) - set(CHECKS):
        p.error(f"--only: unknown check(s) {sorted(set(only) - set(CHECKS))}; choose from {','.join(CHECKS)}")
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
    checks = {"parity": lambda: check_parity(size), "syncs": lambda: check_syncs(size),
              "kernels": lambda: check_kernels(size, device),
              "throughput": lambda: check_throughput(size, compile_rows=on_gpu or args.compile),
              "cli": lambda: check_cli(size), "decode": lambda: check_decode(size, device)}
    out = Path(args.json)
    from megatron_neox.durable import write_json

    global _DEADLINE
    t0 = time.perf_counter()
    _DEADLINE = t0 + args.budget if args.budget is not None else math.inf
    for name in only:
        start = time.perf_counter()
        if _out_of_time():
            report[name] = dict(OVER_BUDGET)
            print(f"{name:<10} skipped: over --budget", flush=True)
            continue
        try:
            report[name] = checks[name]()
            line = _summary(name, report[name])
        except Exception as e:  # a GPU run is one shot: a check that breaks must not take the others' figures
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            line = f"FAIL | {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        report[name + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name:<10} {line}", flush=True)
        write_json(out, report, indent=1)  # so far: what a run stopped by its time limit leaves
    report["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [k for k in CHECKS if k in report and not report[k].get("ok", True)]
    skipped = [k for k in CHECKS if report.get(k) == OVER_BUDGET]
    report["verdict"] = ("PASS" if not failed else "FAIL: " + ", ".join(failed)) + (
        f" (skipped over --budget: {', '.join(skipped)})" if skipped else "")
    write_json(out, report, indent=1)
    parts = [f"gpu_check {report['verdict']}", report["device"]]
    if "model_steady" in report.get("syncs", {}):
        parts.append(f"host syncs in the model's steady fwd+bwd {report['syncs']['model_steady']['dispatch']}"
                     + (f" + {report['syncs']['model_steady']['cuda']} CUDA" if on_gpu else ""))
    rows = report.get("throughput", {}).get("rows", {})
    measured = [(k, v) for k, v in rows.items() if "ours_over_hf" in v]
    if measured:  # the first row measured: the default on a big card when it ran
        name, row = measured[0]
        parts.append(f"{name} {row['ours']['tokens_per_sec']:,.0f} tok/s (ours/HF {row['ours_over_hf']:.2f})")
    parts += [f"{report['seconds']:.0f} s", str(out)]
    print(" | ".join(parts), flush=True)
    return 0 if not failed else 1


def _tps(r: dict) -> str:
    if "tokens_per_sec" in r:
        mem = f", {r['peak_mem_gb']:.1f} GiB" if r.get("peak_mem_gb") else ""
        warm = f", warm-up {r['warmup_s']:.0f} s" if r.get("warmup_s", 0) >= 1 else ""  # compilation shows here
        return f"{r['tokens_per_sec']:,.0f} tok/s{mem}{warm}"
    return r.get("error") or r.get("skipped") or "?"


def _summary(name: str, r: dict) -> str:
    ok = "ok" if r.get("ok", True) else "FAIL"
    if name == "parity":
        parts = [f"{k}{' compiled' if v.get('compiled') else ''} loss {v['loss']:.1e} norm {v['grad_norm']:.1e} "
                 f"update {v['update']:.1e} moved {v['moved']:.2f}"
                 if "loss" in v else f"{k} " + ("refused" if v.get("refused") else v.get("skipped", "NOT refused"))
                 for k, v in r["runs"].items()]
        return f"{ok} | {r['steps']} steps at lr {r['lr']:g} | " + " | ".join(parts)
    if name == "syncs":
        def phase(k):
            v = r[k]
            sites = ", ".join(f"{s} x{n}" for s, n in {**v["dispatch_sites"], **v.get("cuda_sites", {})}.items())
            cuda = f" + {v['cuda']} CUDA ({v['cuda_in_model']} in the model)" if "cuda" in v else ""
            return f"{k} {v['dispatch']} dispatch ({v['dispatch_in_model']} in the model){cuda}" + (
                f" [{sites}]" if sites else "")
        return f"{ok} | " + " | ".join(phase(k) for k in ("model_first", "model_steady", "engine_first", "engine_steady"))
    if name == "kernels":
        return f"{ok} | " + " | ".join(f"{k}: {'ok' if v['ok'] else 'FAIL'} {', '.join(v['kernels'][:3]) or '-'}"
                                       for k, v in r["flavours"].items())
    if name == "throughput":
        rows = [f"{k}: ours {_tps(v['ours'])} / HF {_tps(v['hf'])}"
                + (f" = {v['ours_over_hf']:.2f}x" if "ours_over_hf" in v else "") if "ours" in v else f"{k}: {_tps(v)}"
                for k, v in r["rows"].items()]
        return (f"{r['params'] / 1e6:,.1f}M params {r['precision']} micro {r['micro_batch']} | "
                f"peak {r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']}) | " + " | ".join(rows))
    if name == "cli":
        parts = [f"{k} {_tps(v)}" for k, v in r.items() if isinstance(v, dict)]
        ratios = [f"{k} {v:.2f}" for k, v in r.items() if "_over_" in k]
        return f"{ok} | recompute every {r['recompute_interval']} (ours, as shipped) | " + " | ".join(parts + ratios)
    return (f"{ok} | max |diff| {r['max_abs_diff_vs_recompute']:.1e} | "
            f"{r['decode_tokens_per_sec']:,.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
