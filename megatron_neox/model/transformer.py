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
from megatron_neox.model.attention import AttentionContext, attend
from megatron_neox.model.compile import compiled, use_compile
from megatron_neox.model.init import init_fn
from megatron_neox.model.norms import make_norm
from megatron_neox.model.rotary import apply_rotary
from megatron_neox.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_neox.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_neox.parallel.random import tensor_parallel_rng
from megatron_neox.parallel.sharding import kv_heads_sharded
from megatron_neox.parallel.utils import divide, group_rank, group_size, sum_grads_over_tensor_parallel_group

KVCache = Tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        tp = group_size(tp_group)
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.num_heads = divide(cfg.num_attention_heads, tp)  # heads on this rank
        self.dropout = cfg.attention_dropout
        init = init_fn(cfg.init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std)
        out_init = init_fn(
            cfg.output_layer_init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std
        )
        self.grouped = cfg.grouped_query
        if not self.grouped:
            # Fused QKV with rows interleaved per head ([head][q|k|v][head_dim]), the HF GPTNeoX layout:
            # a contiguous row block per TP rank then holds whole heads.
            self.query_key_value = ColumnParallelLinear(
                cfg.hidden_size, 3 * cfg.hidden_size, group=tp_group, bias=cfg.qkv_bias, gather_output=False,
                init_method=init, sequence_parallel=sequence_parallel,
            )
        else:
            self._init_grouped(cfg, tp_group, sequence_parallel, init)
        self.dense = RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, group=tp_group, bias=cfg.attention_out_bias, input_is_parallel=True,
            init_method=out_init, skip_bias_add=True, reduce_output=False,
        )
        self.rotary_interleaved = cfg.rotary_interleaved
        # GPT-3 alternates dense and locally banded layers; the odd layers are the banded ones.
        self.local = cfg.attention_pattern == "alternating_local" and layer_number % 2 == 1

    def _init_grouped(self, cfg: ModelConfig, tp_group, sequence_parallel: bool, init) -> None:
        """Grouped-query attention: `query` (this rank's query heads) and `key_value` (rows [kv head][k|v]),
        separate because the KV heads split across TP ranks only when num_kv_heads % tp == 0. When tp >
        num_kv_heads (tp % num_kv_heads == 0, layout.py) every rank holds all KV heads -- a plain
        replicated weight, so the gradient norm counts it once -- computes them and keeps its group's;
        each rank's gradient then covers its group only, so the gradients are summed over the TP group
        (which keeps the copies identical). The input arrives through the same TP region as a
        column-parallel layer's, whose backward sums the input gradient over the ranks."""
        tp, kv = group_size(tp_group), cfg.kv_heads
        self.query = ColumnParallelLinear(
            cfg.hidden_size, cfg.num_attention_heads * self.head_dim, group=tp_group, bias=cfg.qkv_bias,
            gather_output=False, init_method=init, sequence_parallel=sequence_parallel,
        )
        self.kv_split = kv_heads_sharded(kv, tp)
        self.kv_heads = kv // tp if self.kv_split else kv  # KV heads this rank computes
        # tp > kv: rank r's query heads belong to KV head r // (tp / kv).
        self.kv_index = None if self.kv_split else group_rank(tp_group) // (tp // kv)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.key_value = ColumnParallelLinear(
            cfg.hidden_size, 2 * kv * self.head_dim, group=tp_group if self.kv_split else None,
            bias=cfg.qkv_bias, gather_output=False, init_method=init,
            sequence_parallel=sequence_parallel if self.kv_split else False,
        )
        if not self.kv_split:
            for p in self.key_value.parameters():  # replicated, not a shard (group=None still marks them)
                p.model_parallel = p.tensor_model_parallel = False
            sum_grads_over_tensor_parallel_group(self.key_value.parameters(), tp_group)

    def _qkv(self, x: torch.Tensor):
        """q, k, v [B, T, heads, head_dim] (k, v with this rank's KV heads), views where possible."""
        if not self.grouped:
            # [B, T, heads * 3 * head_dim] -> q, k, v: views into the fused output in the layout flash /
            # cuDNN attention read (head_dim contiguous, heads inside T); unbind's backward stacks the
            # three gradients back with one cat.
            return self.query_key_value(x).unflatten(-1, (self.num_heads, 3, self.head_dim)).unbind(-2)
        q = self.query(x).unflatten(-1, (self.num_heads, self.head_dim))
        if not self.kv_split:
            if self.sequence_parallel:
                x = gather_from_sequence_parallel_region(x, self.tp_group)
            else:
                x = copy_to_tensor_parallel_region(x, self.tp_group)
        kv = self.key_value(x).unflatten(-1, (self.kv_heads, 2, self.head_dim))
        if self.kv_index is not None:
            kv = kv[:, :, self.kv_index:self.kv_index + 1]
        k, v = kv.unbind(-2)
        return q, k, v

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, layer_past: Optional[KVCache] = None,
        add_to: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, KVCache]:
        """Returns this rank's un-reduced output partial sum (plus `add_to`, summed inside the output
        matmul, see RowParallelLinear) and the KV cache; the output bias is the caller's to add.
        `ctx` (model/attention.py) carries the rotary angles and this forward's masks."""
        q, k, v = self._qkv(x)
        if ctx.cos is not None:
            il = self.rotary_interleaved
            q, k = apply_rotary(q, ctx.cos, ctx.sin, il), apply_rotary(k, ctx.cos, ctx.sin, il)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim] views
        if layer_past is not None:
            k = torch.cat([layer_past[0], k], dim=2)
            v = torch.cat([layer_past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        # Each TP rank has different heads: their dropout masks come from the rank's own stream.
        with tensor_parallel_rng() if dropout > 0 else contextlib.nullcontext():
            out = attend(q, k, v, ctx.mask(self.local), dropout)
        # A free view when the kernel's output is [B, T, heads, head_dim] in memory (flash / cuDNN
        # on CUDA); one copy otherwise.
        out = out.transpose(1, 2).flatten(2)
        return self.dense(out, add_to=add_to)[0], (k, v)


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

    def forward(self, x: torch.Tensor, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's un-reduced output partial sum, plus `add_to` (summed inside the output matmul);
        the output bias is the caller's to add."""
        h = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            # Exact (erf) GELU as GPT-NeoX and HF's "gelu"; GPT-2/3 and GPT-J used the tanh form.
            h = F.gelu(h, approximate="tanh" if self.tanh_gelu else "none")
        return self.dense_4h_to_h(h, add_to=add_to)[0]


class TransformerLayer(nn.Module):
    """One pre-norm block. Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)); sequential:
    h = x + attn(ln1(x)); h + mlp(ln2(h))."""

    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.shared_norm = cfg.shared_norm
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.reduces = group_size(tp_group) > 1  # the output partials need an all-reduce / reduce-scatter
        self.hidden_dropout = cfg.hidden_dropout
        self.compile_setting = cfg.compile
        self.has_dropout = cfg.hidden_dropout > 0 or cfg.attention_dropout > 0
        self._compiled: Optional[bool] = None  # decided on the first full-sequence forward
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

    def _bias_dropout_add(self, x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        """residual + dropout(x + bias), for the reduced x (replicated across the TP group: the
        default RNG, same seed on every TP rank, gives every rank the same mask)."""
        if self.training and self.hidden_dropout > 0:
            return residual + F.dropout(_add(x, bias), p=self.hidden_dropout, training=True)
        out = residual + x
        return out if bias is None else out.add_(bias)  # in place: no second [B, T, C] allocation

    def run(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The full-sequence forward (training, evaluation): compiled when `model.compile` says so
        (model/compile.py), decided once, on the first call, from the device of `x`."""
        if self._compiled is None:
            zero3 = any(hasattr(p, "ds_id") for p in self.parameters())  # ZeRO-3 partitioned parameters
            self._compiled = use_compile(self.compile_setting, x.device.type, dropout=self.has_dropout, zero3=zero3)
        if not self._compiled:
            return _layer_output(self, x, ctx)
        # A parallel-residual layer's two output biases get one gradient (the output's, summed over
        # batch and sequence). Summed inside a compiled graph, Inductor returns one buffer as both
        # gradients, autograd makes it both parameters' .grad, and every later micro-batch is then
        # accumulated into it twice (torch 2.13 Inductor; gradient accumulation at ZeRO 0/1). Summed
        # here, the graph has one bias input, and eager autograd gives each parameter its own gradient.
        bias = self.output_bias() if self.parallel_residual else None
        return compiled(_layer_output)(self, x, ctx, bias)

    def output_bias(self) -> Optional[torch.Tensor]:
        """The parallel residual's one bias: attention's output bias + the MLP's (either may be absent)."""
        return _add(self.attention.dense.bias, self.mlp.dense_4h_to_h.bias)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, layer_past: Optional[KVCache] = None,
        output_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, KVCache]:
        # Without a reduce between the output matmuls and the residual (tp = 1, no dropout) the
        # residual and the row-parallel biases enter the output matmul itself (addmm: one add
        # fewer over [B, T, C]); otherwise the partials are summed, reduced, and the bias and the
        # residual added once after the reduce.
        fold = not self.reduces and not (self.training and self.hidden_dropout > 0)
        attn_bias, mlp_bias = self.attention.dense.bias, self.mlp.dense_4h_to_h.bias
        ln1 = self.input_layernorm(x)
        if self.parallel_residual:
            ln2 = ln1 if self.shared_norm else self.post_attention_layernorm(x)
            bias = self.output_bias() if output_bias is None else output_bias  # given: see run()
            attn, present = self.attention(ln1, ctx, layer_past, add_to=_add(x, bias) if fold else None)
            out = self.mlp(ln2, add_to=attn)  # attention + MLP partials: one reduce for both
            return (out if fold else self._bias_dropout_add(self._reduce(out), bias, x)), present
        if fold:
            h, present = self.attention(ln1, ctx, layer_past, add_to=_add(x, attn_bias))
            return self.mlp(self.post_attention_layernorm(h), add_to=_add(h, mlp_bias)), present
        attn, present = self.attention(ln1, ctx, layer_past)
        h = self._bias_dropout_add(self._reduce(attn), attn_bias, x)
        mlp = self.mlp(self.post_attention_layernorm(h))
        return self._bias_dropout_add(self._reduce(mlp), mlp_bias, h), present


def _layer_output(layer: TransformerLayer, x: torch.Tensor, ctx: AttentionContext,
                  output_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    # TransformerLayer's forward even for subclasses (the pipeline's takes a tuple).
    return TransformerLayer.forward(layer, x, ctx, output_bias=output_bias)[0]


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """a + b, where either may be None (a layer without biases)."""
    if a is None or b is None:
        return b if a is None else a
    return a + b
