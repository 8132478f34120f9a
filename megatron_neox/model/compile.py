"""Regional compilation of the transformer layers (`model.compile`).

Each transformer layer's full-sequence forward (training and evaluation; not the KV-cache decode
steps, whose shapes change every token) runs through one `torch.compile`d function that takes the
layer as an argument. torch >= 2.5 inlines built-in modules and treats their parameters as graph
inputs (`torch._dynamo.config.inline_inbuilt_nn_modules`), so identical layers share one compiled
graph: a 16-layer model compiles once (per layer flavour -- GPT-3's banded layers are a second --
and per grad mode: DeepSpeed's re-entrant recompute runs the first forward without grad).

What runs where:
- Activation checkpointing (ours and the pipeline's): the compiled layer is called inside the
  checkpointed function, so recompute reruns the compiled code.
- Tensor / sequence parallelism: the communication functions (parallel/mappings.py) are excluded
  from tracing (`torch.compiler.disable`); the graph breaks there and the pieces between the
  collectives are compiled.
- Pipeline stages: each stage compiles its own layers (TransformerLayerPipe calls the same path).
- ZeRO 0/1/2 leave parameters in place: compiled. ZeRO-3 gathers each parameter in module hooks
  during the forward, which the compiled graph would have to trace: refused with `true`, and
  `auto` stays eager when it finds ZeRO-3 partitioned parameters.
- Dropout: Inductor draws dropout masks from its own generator, not the eager op's: a compiled run
  is a different (equally valid) random run than the eager reference, and whether DeepSpeed's
  recompute replays those masks is unproven here. `true` with dropout > 0 is refused; `auto` stays
  eager.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch

from megatron_neox.resolve import auto_compile

CompileSetting = Union[bool, str]


def use_compile(setting: CompileSetting, device_type: str, *, dropout: bool, zero3: bool) -> bool:
    """Whether this layer runs compiled: the resolved `model.compile` (set-up decides `auto` in
    megatron_neox/resolve.py); a model built from an unresolved config decides `auto` the same way."""
    if setting == "auto":
        return auto_compile(device_type, dropout=dropout, zero3=zero3)[0]
    return bool(setting)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)`, made once per function: every layer calls the same compiled object, so
    dynamo's cache (guarded on the layers' structure, not their identity) serves all of them."""
    return torch.compile(fn)
