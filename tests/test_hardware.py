"""GPU facts we can check without a GPU: data-sheet peaks by device name, the bf16 refusal on GPUs
without native bf16, the srun device binding, and the Adam choice."""
import pytest
import torch

from megatron_neox import hardware
from megatron_neox.errors import ConfigError


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),      # SXM5
    ("NVIDIA H100 PCIe", "bf16", 756.0),           # not the SXM figure
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200 NVL", "bf16", 835.0),
    ("NVIDIA H800", "fp16", 989.0),
    ("NVIDIA H800 PCIe", "bf16", 756.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-PCIE-16GB", "fp16", 112.0),
    ("Tesla V100-SXM2-32GB", "bf16", None),        # no bf16 tensor cores
    ("NVIDIA GeForce RTX 4090", "bf16", None),     # not in the table: the probe measures it
])
def test_datasheet_peak_matches_the_most_specific_name(name, precision, peak):
    assert hardware.datasheet_peak(name, precision) == peak


def test_bf16_refused_without_native_support(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    monkeypatch.setattr(acc, "device_name", lambda *a: "cuda")
    monkeypatch.setattr(acc, "is_bf16_supported", lambda: True)  # DeepSpeed counts emulation as support
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a V100: emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    with pytest.raises(ConfigError, match="V100.*no native bf16.*precision=fp16"):
        hardware.check_precision_supported("bf16")
    assert calls == [False]


def test_srun_per_task_binding_maps_local_rank_into_visible_devices(monkeypatch):
    from megatron_neox.training.launch import bind_local_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert bind_local_device() == 0
    assert current == [0]
    import os

    assert os.environ["LOCAL_RANK"] == "0"  # what DeepSpeed's process group and engine read
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # all of a node's GPUs visible
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert bind_local_device() == 2 and current == [0, 2]


def test_bind_local_device_without_gpus_changes_nothing(monkeypatch):
    from megatron_neox.training.launch import bind_local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert bind_local_device() is None
    import os

    assert os.environ["LOCAL_RANK"] == "5"


def test_adam_needs_no_compiler(monkeypatch):
    from megatron_neox import precision

    monkeypatch.setattr(precision, "fused_adam_prebuilt", lambda: False)  # a PyPI wheel
    assert precision.choose_adam("cuda") == ({"torch_adam": True, "fused": True}, "torch fused AdamW")
    monkeypatch.setattr(precision, "fused_adam_prebuilt", lambda: True)  # DS_BUILD_FUSED_ADAM=1
    assert precision.choose_adam("cuda") == ({}, "DeepSpeed FusedAdam (prebuilt)")
    assert precision.choose_adam("cpu")[1] == "torch fused AdamW"


def test_probe_reports_a_positive_rate_on_cpu():
    assert hardware.measure_peak_tflops("fp32", "cpu") > 0
