"""Checks a maintainer runs on the code itself (not used by training): `python -m megatron_neox.devtools.imports`."""
