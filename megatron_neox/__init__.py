"""megatron_neox: a DeepSpeed-based, Megatron-style trainer for GPT-NeoX-family language models."""

__version__ = "0.1.0"
