"""megatron_neox: a DeepSpeed-based, Megatron-style trainer for GPT-NeoX-family models."""
from setuptools import find_packages, setup

# tools/evaluate.py --tasks and eval.tasks: lm-evaluation-harness (0.4.13 is the version our
# parity test checks against) and accelerate, which lm-eval's own `hf` backend needs (the test
# compares our numbers with it).
EVAL = ["lm_eval>=0.4.13,<0.5", "accelerate>=0.26"]
# tests/test_finetune.py compares our DPO loss and statistics with TRL's DPOTrainer (1.16 checked).
TRL = ["trl>=1.16,<2"]

setup(
    name="megatron_neox",
    version="0.1.0",
    description="DeepSpeed + Megatron-style 3D-parallel trainer for GPT-NeoX-family language models",
    packages=find_packages(include=["megatron_neox", "megatron_neox.*"]),
    python_requires=">=3.9",
    # Ranges only: GPU users install their CUDA torch first and keep it.
    # apex is optional and GPU-only; the PyPI package named "apex" is unrelated: never depend on it.
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.14",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "pydantic>=2.7",
        "numpy>=1.24",
        "zstandard>=0.21",
        "tqdm>=4.60",
        "wandb>=0.16",
        "tensorboard>=2.14",
        "tiktoken>=0.6",
        "matplotlib>=3.7",
    ],
    extras_require={
        "eval": EVAL,
        "test": ["pytest>=7", "pytest-timeout>=2.1", *EVAL, *TRL],
    },
)
