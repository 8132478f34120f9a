"""The transformer layer as it was before issue 17 (commit 11a43fe), kept as the reference that the
lean layer (model/transformer.py) must equal: same parameter names and layout, so one state dict
loads into both. Only the forward matters here; it is the old code verbatim except that rotary
cos/sin come in the old full-width [B, 1, T, rotary_ndims] form (`old_cos_sin`)."""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_neox.config import ModelConfig
from megatron_neox.model.attention import attend
from megatron_neox.model.norms import make_norm
from megatron_neox.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_neox.parallel.mappings import (
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_neox.parallel.random import tensor_parallel_rng
from megatron_neox.parallel.utils import divide, group_size, sum_grads_over_tensor_parallel_group


def old_cos_sin(position_ids: torch.Tensor, rotary_ndims: int, base: float, dtype: torch.dtype):
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float64) / rotary_ndims))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(q, k, cos, sin, ndims):
    q_rot, q_pass = q[..., :ndims], q[..., ndims:]
    k_rot, k_pass = k[..., :ndims], k[..., ndims:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        tp = group_size(tp_group)
        self.head_dim = cfg.head_dim
        self.num_heads = divide(cfg.num_attention_heads, tp)
        self.dropout = cfg.attention_dropout
        self.query_key_value = ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, group=tp_group, bias=cfg.attention_bias, gather_output=False,
            sequence_parallel=sequence_parallel)
        self.dense = RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, group=tp_group, bias=cfg.attention_bias, input_is_parallel=True,
            skip_bias_add=True, reduce_output=False)
        self.rotary_ndims = cfg.rotary_ndims
        self.local = cfg.attention_pattern == "alternating_local" and layer_number % 2 == 1

    def forward(self, x, ctx, cos, sin):
        qkv = self.query_key_value(x)
        B, T = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if cos is not None:
            q, k = apply_rotary(q, k, cos, sin, self.rotary_ndims)
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel_rng() if dropout > 0 else contextlib.nullcontext():
            out = attend(q, k, v, ctx.mask(self.local), dropout)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.tanh_gelu = cfg.activation == "gelu_tanh"
        width = cfg.ffn_size * (2 if self.swiglu else 1)
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, width, group=tp_group, bias=cfg.mlp_bias, gather_output=False,
            stride=2 if self.swiglu else 1, sequence_parallel=sequence_parallel)
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, group=tp_group, bias=cfg.mlp_bias, input_is_parallel=True,
            skip_bias_add=True, reduce_output=False)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.tanh_gelu else "none")
        return self.dense_4h_to_h(h)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.cfg = cfg
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
            replicated = [self.input_layernorm] + ([] if self.shared_norm else [self.post_attention_layernorm])
            for module in replicated:
                sum_grads_over_tensor_parallel_group(module.parameters(), tp_group)
            row_biases = [self.attention.dense.bias, self.mlp.dense_4h_to_h.bias]
            sum_grads_over_tensor_parallel_group([b for b in row_biases if b is not None], tp_group)

    def _reduce(self, x):
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(x, self.tp_group)
        return reduce_from_tensor_parallel_region(x, self.tp_group)

    def _dropout_add(self, x, residual):
        return residual + F.dropout(x, p=self.hidden_dropout, training=self.training)

    def forward(self, x, ctx, position_ids: Optional[torch.Tensor] = None):
        """`position_ids` [B, T]: the old rotary angles are computed from them here."""
        cos = sin = None
        if self.cfg.position_embedding == "rotary":
            cos, sin = old_cos_sin(position_ids, self.cfg.rotary_ndims, self.cfg.rotary_base, x.dtype)
        ln1 = self.input_layernorm(x)
        attn, attn_bias = self.attention(ln1, ctx, cos, sin)
        if self.parallel_residual:
            ln2 = ln1 if self.shared_norm else self.post_attention_layernorm(x)
            mlp, mlp_bias = self.mlp(ln2)
            out = self._reduce(attn + mlp)
            out = _add_bias(_add_bias(out, attn_bias), mlp_bias)
            return self._dropout_add(out, x)
        h = self._dropout_add(_add_bias(self._reduce(attn), attn_bias), x)
        mlp, mlp_bias = self.mlp(self.post_attention_layernorm(h))
        return self._dropout_add(_add_bias(self._reduce(mlp), mlp_bias), h)


def _add_bias(x, bias):
    return x if bias is None else x + bias
