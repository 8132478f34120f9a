"""The GPT-NeoX transformer layer: attention, MLP and the (parallel or sequential) residual.

Shapes: activations are batch-first [B, T, C]; attention works on [B, heads, T, head_dim].
Under tensor parallelism each rank holds `heads / tp` whole heads and `ffn / tp` MLP columns
(Megatron: column-parallel in, row-parallel out), so a layer needs one all-reduce with the
parallel residual (attention and MLP partial sums are added before the reduce) and two with the
sequential one.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_neox.config import ModelConfig
from megatron_neox.model.init import init_fn
from megatron_neox.model.norms import make_norm
from megatron_neox.model.rotary import RotaryEmbedding, alibi_slopes, apply_rotary
from megatron_neox.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_neox.parallel.mappings import (
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_neox.parallel.random import tensor_parallel_rng
from megatron_neox.parallel.utils import divide, group_rank, group_size, sum_grads_over_tensor_parallel_group

KVCache = Tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        tp, tp_rank = group_size(tp_group), group_rank(tp_group)
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.num_heads = divide(cfg.num_attention_heads, tp)  # heads on this rank
        self.dropout = cfg.attention_dropout
        init = init_fn(cfg.init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std)
        out_init = init_fn(
            cfg.output_layer_init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std
        )
        # Fused QKV with rows interleaved per head ([head][q|k|v][head_dim]), the HF GPTNeoX layout:
        # a contiguous row block per TP rank then holds whole heads.
        self.query_key_value = ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, group=tp_group, bias=cfg.attention_bias, gather_output=False,
            init_method=init, sequence_parallel=sequence_parallel,
        )
        self.dense = RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, group=tp_group, bias=cfg.attention_bias, input_is_parallel=True,
            init_method=out_init, skip_bias_add=True, reduce_output=False,
        )
        self.rotary = (
            RotaryEmbedding(cfg.rotary_ndims, cfg.seq_length, cfg.rotary_base)
            if cfg.position_embedding == "rotary" else None
        )
        if cfg.position_embedding == "alibi":
            slopes = alibi_slopes(cfg.num_attention_heads)[tp_rank * self.num_heads:(tp_rank + 1) * self.num_heads]
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None
        # GPT-3 alternates dense and locally banded layers; the odd layers are the banded ones.
        self.local_window = (
            cfg.local_window if cfg.attention_pattern == "alternating_local" and layer_number % 2 == 1 else None
        )

    def _mask(self, q_len: int, k_len: int, position_offset: int, device, dtype) -> Optional[torch.Tensor]:
        """Additive [heads|1, q, k] mask, or None when plain causal SDPA suffices."""
        if self.alibi_slopes is None and self.local_window is None and (q_len == k_len or q_len == 1):
            return None
        q_pos = torch.arange(position_offset, position_offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        dist = q_pos - k_pos  # >= 0 for visible keys
        allowed = dist >= 0
        if self.local_window is not None:
            allowed &= dist < self.local_window
        mask = torch.zeros(q_len, k_len, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
        if self.alibi_slopes is not None:
            mask = mask[None] - self.alibi_slopes.to(device=device, dtype=dtype)[:, None, None] * dist.to(dtype)[None]
        return mask

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_past: Optional[KVCache] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, KVCache]:
        """Returns this rank's un-reduced output partial sum, the output bias, and the KV cache."""
        qkv = self.query_key_value(x)
        B, T = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(position_ids, q.dtype)
            q, k = apply_rotary(q, k, cos, sin, self.rotary.rotary_ndims)
        past_len = 0
        if layer_past is not None:
            past_len = layer_past[0].shape[2]
            k = torch.cat([layer_past[0], k], dim=2)
            v = torch.cat([layer_past[1], v], dim=2)
        mask = self._mask(T, k.shape[2], past_len, q.device, q.dtype)
        dropout = self.dropout if self.training else 0.0
        # Each TP rank has different heads: their dropout masks come from the rank's own stream.
        with tensor_parallel_rng() if dropout > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1,
            )
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        partial_out, bias = self.dense(out)
        return partial_out, bias, (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.tanh_gelu = cfg.activation == "gelu_tanh"
        init = init_fn(cfg.init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std)
        out_init = init_fn(
            cfg.output_layer_init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std
        )
        # SwiGLU fuses [gate | up] into one matrix; stride 2 splits each half separately across TP
        # so every rank gets matching gate and up columns.
        width = cfg.ffn_size * (2 if self.swiglu else 1)
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, width, group=tp_group, bias=cfg.mlp_bias, gather_output=False, init_method=init,
            stride=2 if self.swiglu else 1, sequence_parallel=sequence_parallel,
        )
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, group=tp_group, bias=cfg.mlp_bias, input_is_parallel=True,
            init_method=out_init, skip_bias_add=True, reduce_output=False,
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            # Exact (erf) GELU as GPT-NeoX and HF's "gelu"; GPT-2/3 and GPT-J used the tanh form.
            h = F.gelu(h, approximate="tanh" if self.tanh_gelu else "none")
        return self.dense_4h_to_h(h)


class TransformerLayer(nn.Module):
    """One pre-norm block. Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)); sequential:
    h = x + attn(ln1(x)); h + mlp(ln2(h))."""

    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.shared_norm = cfg.shared_norm
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.hidden_dropout = cfg.hidden_dropout
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        if not self.shared_norm:
            self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_number, tp_group, self.sequence_parallel)
        self.mlp = MLP(cfg, tp_group, self.sequence_parallel)
        if self.sequence_parallel:
            # Norms and the row-parallel output biases act on this rank's sequence slice only.
            replicated = [self.input_layernorm] + ([] if self.shared_norm else [self.post_attention_layernorm])
            for module in replicated:
                sum_grads_over_tensor_parallel_group(module.parameters(), tp_group)
            row_biases = [self.attention.dense.bias, self.mlp.dense_4h_to_h.bias]
            sum_grads_over_tensor_parallel_group([b for b in row_biases if b is not None], tp_group)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(x, self.tp_group)
        return reduce_from_tensor_parallel_region(x, self.tp_group)

    def _dropout_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # The reduced activation is replicated across the TP group: the default RNG (same seed on
        # every TP rank) gives every rank the same mask.
        return residual + F.dropout(x, p=self.hidden_dropout, training=self.training)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_past: Optional[KVCache] = None
    ) -> Tuple[torch.Tensor, KVCache]:
        ln1 = self.input_layernorm(x)
        attn, attn_bias, present = self.attention(ln1, position_ids, layer_past)
        if self.parallel_residual:
            ln2 = ln1 if self.shared_norm else self.post_attention_layernorm(x)
            mlp, mlp_bias = self.mlp(ln2)
            # One all-reduce for both branches; row-parallel biases are added once, after it.
            out = self._reduce(attn + mlp)
            out = _add_bias(_add_bias(out, attn_bias), mlp_bias)
            return self._dropout_add(out, x), present
        h = self._dropout_add(_add_bias(self._reduce(attn), attn_bias), x)
        mlp, mlp_bias = self.mlp(self.post_attention_layernorm(h))
        return self._dropout_add(_add_bias(self._reduce(mlp), mlp_bias), h), present


def _add_bias(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x if bias is None else x + bias
