"""What the accelerator can do: data-sheet peak TFLOP/s (for MFU), a matmul probe, native bf16.

Peaks are dense (no structured sparsity) tensor-core figures from NVIDIA's data sheets; the fp32
column is plain (non-TF32) fp32. A device name is matched against the most specific entry first,
so "H100 PCIe" (756) is not taken for the SXM part (989).
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch

from megatron_neox.errors import ConfigError

# (substring of torch.cuda.get_device_name(), upper-cased) -> {precision: dense TFLOP/s}.
# Sources: NVIDIA H100 Tensor Core GPU data sheet (H100 SXM: 989 bf16/fp16, 67 fp32; H100 PCIe: 756,
# 51; H100 NVL: 835, 60 -- the sheet lists 2x "with sparsity"); NVIDIA H200 data sheet (H200 SXM: 989,
# 67; H200 NVL: 835, 60); NVIDIA H800 data sheet (SXM: 989, 67; PCIe: 756, 51); NVIDIA GH200 Grace
# Hopper Superchip data sheet (the Hopper GPU: 989 dense bf16/fp16, 67 fp32); NVIDIA A100 data sheet
# (312 bf16/fp16, 19.5 fp32, SXM and PCIe alike); NVIDIA V100 data sheet (SXM2: 125 fp16, 15.7 fp32;
# PCIe: 112, 14; no bf16).
PEAK_TFLOPS: Tuple[Tuple[str, Dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H800 PCIE", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIE", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100 PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def regional_compile_ok() -> bool:
    """Whether one compiled function serves every identical layer (`model.compile`): dynamo must
    inline built-in nn.Modules, treating their parameters as graph inputs. That is the default from
    torch 2.5 (PyTorch's regional-compilation recipe; 2.4 has it behind
    torch._dynamo.config.inline_inbuilt_nn_modules). Without it each layer object is a guard of its
    own: a 16-layer model recompiles per layer and passes dynamo's cache limit (8), so the rest
    runs eagerly."""
    from torch import _dynamo
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) >= (2, 5):
        return True

    return bool(getattr(_dynamo.config, "inline_inbuilt_nn_modules", False))


def datasheet_peak(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of a GPU by its name, or None when the table does not know it."""
    name = device_name.upper()
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def measure_peak_tflops(precision: str = "fp32", device: Optional[str] = None) -> float:
    """Attainable matmul TFLOP/s of this device.

    On a GPU an 8192^2 matmul (1.1 TFLOP, ~1 ms on an H100) timed with CUDA events over 10 runs
    after a warm-up: big enough that kernel-launch latency does not count. On a CPU half precision
    is emulated (~300x slower), so the probe runs 1024^2 fp32 matmuls for half a second.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        n = 8192 if precision != "fp32" else 4096
        a = torch.randn(n, n, dtype=DTYPES[precision], device=device)
        b = torch.randn(n, n, dtype=DTYPES[precision], device=device)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        runs = 10
        start.record()
        for _ in range(runs):
            a @ b
        end.record()
        end.synchronize()
        return 2 * n**3 * runs / (start.elapsed_time(end) / 1e3) / 1e12
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def peak_tflops(precision: str) -> Tuple[float, str]:
    """(peak TFLOP/s per device, where it came from) for MFU: the data sheet, else the probe."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        value = datasheet_peak(name, precision)
        if value is not None:
            return value, f"{name} data sheet"
        return measure_peak_tflops(precision), f"{name} matmul probe"
    return measure_peak_tflops("fp32", "cpu"), "CPU matmul probe"


def bf16_native() -> bool:
    """bf16 tensor cores (compute capability >= 8.0): V100 only emulates bf16, at fp32 speed or worse."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def check_attention_kernel_trains(kernel: str) -> None:
    """ConfigError when the requested attention kernel cannot run a backward pass here: torch's
    FlexAttention has no CPU backward (it raises NotImplementedError at the first backward)."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    if kernel == "flex" and device == "cpu":
        raise ConfigError("model.attention_kernel='flex' cannot train on the CPU: torch's FlexAttention has no CPU "
                          "backward; use attention_kernel 'auto' (SDPA with an explicit mask on CPU) or 'sdpa'")


def check_precision_supported(precision: str) -> None:
    """ConfigError when this machine's accelerator cannot train in `precision`."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if precision == "fp16" and not acc.is_fp16_supported():
        raise ConfigError(f"precision='fp16' is not supported on the {acc.device_name()} accelerator; "
                          "use precision=fp32 (or bf16 on GPUs that have it: A100, H100 and later)")
    if precision == "bf16":
        if acc.device_name() == "cuda" and not bf16_native():
            raise ConfigError(f"precision='bf16': {torch.cuda.get_device_name()} has no native bf16 (compute "
                              "capability < 8.0; torch would emulate it, slower than fp32); use precision=fp16 "
                              "(with zero.stage >= 1) or fp32")
        if not acc.is_bf16_supported():
            raise ConfigError(f"precision='bf16' is not supported on the {acc.device_name()} accelerator; use fp32")


def device_memory_bytes() -> float:
    """Memory one rank may plan with: the current GPU's total memory, or on CPU the host's physical
    memory shared by the ranks of this node (LOCAL_WORLD_SIZE/LOCAL_SIZE, as the launchers set them)."""
    import os

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    local = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if os.environ.get(k, "").isdigit()), 1)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local)
