"""Conversion: Hugging Face GPT-NeoX import/export (hf.py), weights-only checkpoints at any layout and
merged state dicts (checkpoint_io.py, through the sharding table in parallel/sharding.py), and
DeepSpeed universal checkpoints for resharding (universal.py). Reads and writes the checkpoint file
format of megatron_neox/checkpoint_files.py; imports nothing from training/."""
