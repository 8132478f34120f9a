"""The GPT-NeoX model as a list of layers.

The same layer list becomes a DeepSpeed `PipelineModule` when pp > 1 (each stage builds only its
own layers) or a plain `GPTNeoX` module when pp = 1 (so ZeRO 2/3 work). Both register layer `i` of
the list under the name `str(i)`, so their state dicts use the same keys:

    0                embedding          0.word_embeddings.weight [, 0.position_embeddings.weight]
    1 .. L           transformer layers 1.input_layernorm.weight, 1.attention.query_key_value.weight, ...
    L + 1            final norm         {L+1}.norm.weight
    L + 2            output head        {L+2}.final_linear.weight      (absent when embeddings are tied)

Every layer is built right after seeding the RNG with `seed + i`, so a layer's initial weights do
not depend on which stage builds it, and the sharded init under TP reproduces the unsharded one.
"""
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_neox.config import ModelConfig
from megatron_neox.model.attention import AttentionContext, AttentionPlan
from megatron_neox.model.init import init_fn
from megatron_neox.model.norms import make_norm
from megatron_neox.model.transformer import KVCache, TransformerLayer
from megatron_neox.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_neox.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, host_init
from megatron_neox.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_neox.parallel.random import tensor_parallel_rng
from megatron_neox.parallel.utils import group_rank, group_size, sum_grads_over_tensor_parallel_group


def seed_layer(seed: int) -> None:
    """Seed the default generator before building one layer (DeepSpeed may hand us numpy ints)."""
    torch.manual_seed(int(seed))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        init = init_fn(cfg.init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.dropout = cfg.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, group=tp_group, init_method=init)
        if cfg.position_embedding == "learned":
            # Drawn before the module exists: under deepspeed.zero.Init a built module's weight is
            # already partitioned (empty here), so initialising it afterwards would be lost.
            weight = host_init((cfg.seq_length, cfg.hidden_size), init).to(torch.get_default_device())
            self.position_embeddings = nn.Embedding(cfg.seq_length, cfg.hidden_size, _weight=weight)
        else:
            self.position_embeddings = None

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(position_ids)
        if not self.sequence_parallel:
            return F.dropout(h, p=self.dropout, training=self.training)
        h = scatter_to_sequence_parallel_region(h, self.tp_group)
        if not (self.training and self.dropout > 0):
            return h
        with tensor_parallel_rng():  # each rank holds a different slice of the sequence
            return F.dropout(h, p=self.dropout, training=True)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        if sequence_parallel and group_size(tp_group) > 1:
            sum_grads_over_tensor_parallel_group(self.norm.parameters(), tp_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class LMHead(nn.Module):
    """Untied output projection (with GPT-J's bias when model.lm_head_bias); returns this rank's vocab
    slice of the logits."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        init = init_fn(cfg.init_method, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, base_std=cfg.init_std)
        self.final_linear = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab, group=tp_group, bias=cfg.lm_head_bias, gather_output=False, init_method=init,
            sequence_parallel=sequence_parallel and group_size(tp_group) > 1,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_linear(h)


def tied_lm_logits(embedding: Embedding, h: torch.Tensor) -> torch.Tensor:
    """Output head that reuses the input embedding's (vocab-sharded) weight."""
    if embedding.sequence_parallel:
        h = gather_from_sequence_parallel_region(h, embedding.tp_group)
    else:
        h = copy_to_tensor_parallel_region(h, embedding.tp_group)
    return F.linear(h, embedding.word_embeddings.weight)


def attention_plan(cfg: ModelConfig, tp_group=None) -> AttentionPlan:
    return AttentionPlan(cfg, group_rank(tp_group), group_size(tp_group))


# ---- pipeline flavours: one tuple in, one tuple out ----------------------------------------
# Between stages DeepSpeed sends tuples of tensors: (hidden, position_ids) or, with
# data.reset_attention_mask, (hidden, position_ids, doc_ids). The float hidden state gets a
# gradient; the integer ids pass through, and each stage builds its masks from them once per
# micro-batch (AttentionPlan.cached_context), not once per layer.


class EmbeddingPipe(Embedding):
    def forward(self, inputs: Tuple[torch.Tensor, ...]):
        tokens, position_ids, *doc_ids = inputs
        return (super().forward(tokens, position_ids), position_ids, *doc_ids)


class TransformerLayerPipe(TransformerLayer):
    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False,
                 plan: Optional[AttentionPlan] = None):
        super().__init__(cfg, layer_number, tp_group, sequence_parallel)
        self.plan = plan or attention_plan(cfg, tp_group)  # shared by the layers of a stage

    def forward(self, inputs: Tuple[torch.Tensor, ...]):
        h, position_ids, *doc_ids = inputs
        ctx = self.plan.cached_context(position_ids, doc_ids[0] if doc_ids else None, h.dtype)
        return (self.run(h, ctx), position_ids, *doc_ids)


class FinalNormPipe(FinalNorm):
    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor]):
        return super().forward(inputs[0])


def _tied_head_forward(embedding: Embedding, h: torch.Tensor) -> torch.Tensor:
    return tied_lm_logits(embedding, h)


# ---- the layer list ----------------------------------------------------------------------------


def layer_specs(cfg: ModelConfig, padded_vocab: int, tp_group=None, sequence_parallel: bool = False,
                seed: int = 1234) -> List[Any]:
    """DeepSpeed LayerSpecs for the whole model; each one seeds the RNG with seed + its index."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    class SeededLayerSpec(LayerSpec):
        def __init__(self, index: int, typename, *args, **kwargs):
            super().__init__(typename, *args, **kwargs)
            self.index = index

        def build(self, log=False):
            seed_layer(seed + self.index)
            return super().build(log=log)

    class SeededTiedLayerSpec(TiedLayerSpec):
        def __init__(self, index: int, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.index = index

        def build(self, log=False):
            seed_layer(seed + self.index)
            return super().build(log=log)

    sp = sequence_parallel
    emb_args = (cfg, padded_vocab, tp_group, sp)
    specs: List[Any] = []
    if cfg.tie_embeddings:
        specs.append(SeededTiedLayerSpec(0, "embed", EmbeddingPipe, *emb_args, tied_weight_attr="word_embeddings.weight"))
    else:
        specs.append(SeededLayerSpec(0, EmbeddingPipe, *emb_args))
    plan = attention_plan(cfg, tp_group)
    for i in range(cfg.num_layers):
        specs.append(SeededLayerSpec(i + 1, TransformerLayerPipe, cfg, i, tp_group, sp, plan))
    specs.append(SeededLayerSpec(cfg.num_layers + 1, FinalNormPipe, cfg, tp_group, sp))
    if cfg.tie_embeddings:
        specs.append(SeededTiedLayerSpec(
            cfg.num_layers + 2, "embed", EmbeddingPipe, *emb_args, forward_fn=_tied_head_forward,
            tied_weight_attr="word_embeddings.weight",
        ))
    else:
        specs.append(SeededLayerSpec(cfg.num_layers + 2, LMHead, cfg, padded_vocab, tp_group, sp))
    return specs


def lm_loss(logits_parallel: torch.Tensor, labels: Tuple[torch.Tensor, torch.Tensor], tp_group=None) -> torch.Tensor:
    """Mean next-token cross entropy over the tokens whose loss_mask is 1 (vocab-parallel; the
    cross entropy computes in fp32 itself, so half-precision logits are not copied up first)."""
    targets, loss_mask = labels
    losses = vocab_parallel_cross_entropy(logits_parallel, targets, tp_group)
    loss_mask = loss_mask.to(losses.dtype)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


class GPTNeoX(nn.Module):
    """The whole model in one module (pp = 1). Forward returns vocab-parallel logits, or the loss
    when `labels` are given; `kv_cache` makes incremental decoding cheap."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 1234, checkpoint_interval: int = 0, checkpoint_fn: Optional[Callable] = None):
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.num_layers = cfg.num_layers
        self.tied = cfg.tie_embeddings
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_fn = checkpoint_fn
        # Plain attribute (not a module): picks the attention kernel, builds each forward's masks.
        self.attention_plan = attention_plan(cfg, tp_group)
        L = cfg.num_layers
        seed_layer(seed)
        self.add_module("0", Embedding(cfg, padded_vocab, tp_group, sequence_parallel))
        for i in range(L):
            seed_layer(seed + i + 1)
            self.add_module(str(i + 1), TransformerLayer(cfg, i, tp_group, sequence_parallel))
        seed_layer(seed + L + 1)
        self.add_module(str(L + 1), FinalNorm(cfg, tp_group, sequence_parallel))
        if not self.tied:
            seed_layer(seed + L + 2)
            self.add_module(str(L + 2), LMHead(cfg, padded_vocab, tp_group, sequence_parallel))

    @property
    def embedding(self) -> Embedding:
        return self._modules["0"]

    def layer(self, i: int) -> TransformerLayer:
        return self._modules[str(i + 1)]

    def _run_layers(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        n = self.checkpoint_interval if self.training and self.checkpoint_fn is not None else 0
        if not n:
            for i in range(self.num_layers):
                h = self.layer(i).run(h, ctx)
            return h
        for start in range(0, self.num_layers, n):
            block = [self.layer(i) for i in range(start, min(start + n, self.num_layers))]

            def run(x, block=block):
                # The context (masks, rotary angles) needs no gradient: the recompute reuses it.
                for layer in block:
                    x = layer.run(x, ctx)
                return x

            h = self.checkpoint_fn(run, h)
        return h

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[List[KVCache]] = None, use_cache: bool = False,
                doc_ids: Optional[torch.Tensor] = None):
        """`doc_ids` [B, T] (data.reset_attention_mask): attend within a document only. Without it a
        sequence is one document -- so is a prompt in generation."""
        L = self.num_layers
        past = 0 if not kv_cache else kv_cache[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past, past + tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = self.embedding(tokens, position_ids)
        decoding = use_cache or kv_cache is not None
        ctx = self.attention_plan.context(position_ids, doc_ids, dtype=h.dtype, past_len=past, decoding=decoding)
        presents: List[KVCache] = []
        if decoding:
            for i in range(L):
                h, present = self.layer(i)(h, ctx, None if kv_cache is None else kv_cache[i])
                presents.append(present)
        else:
            h = self._run_layers(h, ctx)
        h = self._modules[str(L + 1)](h)
        logits = tied_lm_logits(self.embedding, h) if self.tied else self._modules[str(L + 2)](h)
        if labels is not None:
            mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask
            return lm_loss(logits, (labels, mask), self.tp_group)
        return (logits, presents) if use_cache else logits


# ---- parameter counting (exact, without building the model) ----------------------------------


def state_dict_shapes(cfg: ModelConfig, padded_vocab: int) -> Dict[str, torch.Size]:
    """Key -> shape of the full (tp=1) state dict, from a model built on the meta device (no memory)."""
    # The constructor seeds the global RNG for its init; leave the caller's RNG as it was.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = GPTNeoX(cfg, padded_vocab)
    return {k: v.shape for k, v in model.state_dict().items()}


def count_parameters(cfg: ModelConfig, tp: int = 1) -> dict:
    """Exact parameter counts of the full (unsharded) model, with the vocab padded for `tp`.

    Returns {'embedding', 'layer' (one transformer layer), 'layer_norms' (the norm gains and biases
    inside one layer), 'final_norm', 'head', 'total'}.
    """
    d, f, V = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab(tp)
    norm = 2 * d if cfg.norm == "layernorm" else d
    gate = 2 if cfg.activation == "swiglu" else 1
    layer_norms = (1 if cfg.shared_norm else 2) * norm
    layer = layer_norms
    qkv = cfg.qkv_size  # (heads + 2 * kv_heads) * head_dim
    layer += qkv * d + (qkv if cfg.qkv_bias else 0)  # query_key_value, or query + key_value
    layer += d * d + (d if cfg.attention_out_bias else 0)  # attention.dense
    layer += d * f * gate + (f * gate if cfg.mlp_bias else 0)  # dense_h_to_4h
    layer += f * d + (d if cfg.mlp_bias else 0)  # dense_4h_to_h
    embedding = V * d + (cfg.seq_length * d if cfg.position_embedding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d + (V if cfg.lm_head_bias else 0)
    total = embedding + cfg.num_layers * layer + norm + head
    return {"embedding": embedding, "layer": layer, "layer_norms": layer_norms, "final_norm": norm, "head": head,
            "total": total}
