"""The GPT-NeoX-family model: attention kernels and masks (attention.py), rotary and ALiBi
(rotary.py), norms, init, the transformer layer (transformer.py) and the layer list as one module or
as pipeline specs (gpt_neox.py). Built from a `ModelConfig` and the tensor-parallel layers of
`megatron_neox.parallel`; no I/O, no logging."""
