"""Weight initialisation schemes of the GPT-NeoX family.

- normal:        N(0, init_std), init_std = 0.02 (GPT-2/GPT-3).
- small_init:    N(0, sqrt(2 / (5 d))) -- Nguyen & Salazar 2019, "Transformers without Tears";
                 used by GPT-NeoX-20B and Pythia for most weights.
- wang_init:     N(0, 2 / (L sqrt(d))) -- Ben Wang's Mesh-Transformer-JAX (GPT-J); GPT-NeoX-20B
                 uses it for the two projections that write into the residual stream.
- scaled_normal: N(0, init_std / sqrt(2 L)) -- GPT-2's residual-projection scaling.
"""
import math
from functools import partial
from typing import Callable

import torch

InitFn = Callable[[torch.Tensor], torch.Tensor]


def _normal(std: float, tensor: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.normal_(tensor, mean=0.0, std=std)


def init_std(method: str, *, hidden_size: int, num_layers: int, base_std: float = 0.02) -> float:
    if method == "normal":
        return base_std
    if method == "small_init":
        return math.sqrt(2.0 / (5.0 * hidden_size))
    if method == "wang_init":
        return 2.0 / (num_layers * math.sqrt(hidden_size))
    if method == "scaled_normal":
        return base_std / math.sqrt(2.0 * num_layers)
    raise ValueError(f"unknown init method {method!r}")


def init_fn(method: str, *, hidden_size: int, num_layers: int, base_std: float = 0.02) -> InitFn:
    return partial(_normal, init_std(method, hidden_size=hidden_size, num_layers=num_layers, base_std=base_std))
