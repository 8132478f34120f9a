"""The Hugging Face model classes we import and export, and how each maps onto our model: one table.

Each `Family` says which HF class it is, where its tensors live, how its config reads as our
`model` section (and back), and what of ours it cannot express. convert/hf.py does the I/O around
it; tensor-parallel splitting stays in parallel/sharding.py.

Our q/k/v layout (model/transformer.py): multi-head attention keeps one fused `query_key_value`
with rows [head][q|k|v][head_dim] (HF GPT-NeoX's own layout); grouped-query attention has
`query` (HF's q_proj rows as they are) and `key_value` with rows [kv head][k|v][head_dim].

Rotary layout. HF's Llama and Mistral rotate halves ((i, i + d/2) pairs) on q/k rows that Meta's
conversion script permuted from Meta's interleaved ((2i, 2i+1)) checkpoints; we rotate halves too
(`rotary_interleaved=false`), so their q/k rows are copied unpermuted and the logits match exactly.
GPT-J rotates interleaved pairs of the first `rotary_dim` dims and so do we (`rotary_interleaved=
true`): again no permutation. Permuting GPT-J into the rotate-half layout would also be exact, but
a checkpoint written back would then differ from GPT-J's row for row.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_neox.config import ModelConfig
from megatron_neox.errors import ConfigError

# Our activation name -> HF's (ACT2FN): "gelu" is exact erf GELU, "gelu_new" the tanh form.
_HF_GELU = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_FROM_HF_GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class Family:
    architecture: str              # the HF class (config.json "architectures")
    model_type: str                # HF config.model_type
    embed: str                     # HF input embedding
    layer: str                     # HF prefix of layer i, with {i}
    final_norm: str                # HF final norm prefix
    heads: Tuple[str, ...]         # HF names the output head may have; the first is written
    renames: Tuple[Tuple[str, str], ...]  # our layer part -> HF layer part (".weight"/".bias" follow)
    qkv: Optional[Tuple[str, str, str]] = None  # HF's separate q, k, v projections (None: fused like ours)
    gate_up: Optional[Tuple[str, str]] = None   # HF's gate and up projections, fused [gate | up] in ours


GPT_NEOX = Family(
    "GPTNeoXForCausalLM", "gpt_neox", "gpt_neox.embed_in", "gpt_neox.layers.{i}.", "gpt_neox.final_layer_norm",
    # transformers 4.x calls the head embed_out, 5.x lm_head (and loads either): we write embed_out.
    ("embed_out", "lm_head"),
    tuple((p, p) for p in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                           "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
)
GPTJ = Family(
    "GPTJForCausalLM", "gptj", "transformer.wte", "transformer.h.{i}.", "transformer.ln_f", ("lm_head",),
    (("input_layernorm", "ln_1"), ("attention.dense", "attn.out_proj"), ("mlp.dense_h_to_4h", "mlp.fc_in"),
     ("mlp.dense_4h_to_h", "mlp.fc_out")),
    qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
)
_LLAMA_LAYER = dict(
    embed="model.embed_tokens", layer="model.layers.{i}.", final_norm="model.norm", heads=("lm_head",),
    renames=(("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "post_attention_layernorm"),
             ("attention.dense", "self_attn.o_proj"), ("mlp.dense_4h_to_h", "mlp.down_proj")),
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), gate_up=("mlp.gate_proj", "mlp.up_proj"),
)
LLAMA = Family("LlamaForCausalLM", "llama", **_LLAMA_LAYER)
MISTRAL = Family("MistralForCausalLM", "mistral", **_LLAMA_LAYER)
QWEN2 = Family("Qwen2ForCausalLM", "qwen2", **_LLAMA_LAYER)  # Llama's layer with q/k/v biases
FAMILIES = {f.model_type: f for f in (GPT_NEOX, GPTJ, LLAMA, MISTRAL, QWEN2)}


# ---- q/k/v: HF's separate projections <-> our rows ------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF q, k, v rows (weights or biases) -> our `query_key_value`, or `query` + `key_value` (GQA)."""
    hd = cfg.head_dim
    if not cfg.grouped_query:
        per_head = torch.stack([t.reshape(cfg.num_attention_heads, hd, *t.shape[1:]) for t in (q, k, v)], dim=1)
        return {"query_key_value": per_head.reshape(-1, *q.shape[1:])}
    kv = torch.stack([t.reshape(cfg.kv_heads, hd, *t.shape[1:]) for t in (k, v)], dim=1)
    return {"query": q, "key_value": kv.reshape(-1, *k.shape[1:])}


def split_qkv(ours: Dict[str, torch.Tensor], cfg: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: (q, k, v) rows from our tensors of one kind (weight or bias)."""
    hd = cfg.head_dim
    if not cfg.grouped_query:
        t = ours["query_key_value"]
        q, k, v = t.reshape(cfg.num_attention_heads, 3, hd, *t.shape[1:]).unbind(1)
        return tuple(x.reshape(-1, *t.shape[1:]) for x in (q, k, v))
    t = ours["key_value"]
    k, v = t.reshape(cfg.kv_heads, 2, hd, *t.shape[1:]).unbind(1)
    return ours["query"], k.reshape(-1, *t.shape[1:]), v.reshape(-1, *t.shape[1:])


# ---- configs ------------------------------------------------------------------------------------


def _rope(hf_config, where: str) -> Tuple[Optional[float], float, Optional[Dict[str, Any]]]:
    """(partial_rotary_factor or None, rope_theta, our rope_scaling or None) of an HF config, refusing
    a rope type we do not implement. transformers 5 keeps these in `rope_parameters` (a config.json's
    older `rope_scaling` is folded into it on load)."""
    rp = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy, dict):
        rp = {**legacy, **rp}
    kind = rp.get("rope_type", rp.get("type", "default"))
    base = rp.get("rope_theta", getattr(hf_config, "rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0)))
    pct = rp.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", None))
    if kind == "default":
        return pct, float(base), None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rp]
        if missing:
            raise ConfigError(f"{where}: rope_type 'llama3' lacks {', '.join(missing)}")
        return pct, float(base), {"type": "llama3", **{k: rp[k] for k in keys}}
    raise ConfigError(f"{where}: rope_type={kind!r} is not supported (supported: 'default' and 'llama3')")


def _refuse_true(hf_config, fields: Tuple[str, ...], why: str) -> None:
    found = [f for f in fields if getattr(hf_config, f, False)]
    if found:
        raise ConfigError(f"{', '.join(f'{f}=true' for f in found)}: {why}")


def _common(hf_config, **ours) -> Dict[str, Any]:
    return {"num_layers": hf_config.num_hidden_layers, "hidden_size": hf_config.hidden_size,
            "num_attention_heads": hf_config.num_attention_heads, "seq_length": hf_config.max_position_embeddings,
            "vocab_size": hf_config.vocab_size, "position_embedding": "rotary",
            "tie_embeddings": bool(hf_config.tie_word_embeddings), **ours}


def _activation(name: str, table: Dict[str, str]) -> str:
    if name not in table:
        raise ConfigError(f"hidden_act / activation_function={name!r} is not supported (expected one of "
                          f"{', '.join(map(repr, table))})")
    return table[name]


def _gpt_neox_from_hf(c) -> Dict[str, Any]:
    pct, base, scaling = _rope(c, "rope_scaling / rope_parameters")
    if scaling is not None:
        raise ConfigError("rope_parameters rope_type='llama3' on a GPTNeoX config is not supported")
    head_dim = c.hidden_size // c.num_attention_heads
    return _common(c, intermediate_size=c.intermediate_size, rotary_dims=int(head_dim * (1.0 if pct is None else pct)),
                   rotary_base=base, parallel_residual=bool(c.use_parallel_residual), norm="layernorm",
                   norm_eps=c.layer_norm_eps, activation=_activation(c.hidden_act, _FROM_HF_GELU),
                   attention_bias=bool(getattr(c, "attention_bias", True)), mlp_bias=True,
                   attention_dropout=float(c.attention_dropout), hidden_dropout=float(c.hidden_dropout))


def _gptj_from_hf(c) -> Dict[str, Any]:
    _refuse_true(c, ("attention_bias", "mlp_bias", "bias"),
                 "GPTJForCausalLM has no q/k/v/o biases and always has MLP biases; these fields are not GPT-J's")
    if c.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings=true: GPT-J's output layer has its own bias; a tied GPT-J is not "
                          "supported")
    if float(c.embd_pdrop) != float(c.resid_pdrop):
        raise ConfigError(f"embd_pdrop={c.embd_pdrop} differs from resid_pdrop={c.resid_pdrop}: we apply one "
                          "hidden dropout to both")
    return _common(c, intermediate_size=c.n_inner or 4 * c.hidden_size, rotary_dims=c.rotary_dim or
                   c.hidden_size // c.num_attention_heads, rotary_interleaved=True, rotary_base=10000.0,
                   parallel_residual=True, shared_norm=True, norm="layernorm", norm_eps=c.layer_norm_epsilon,
                   activation=_activation(c.activation_function, _FROM_HF_GELU), attention_bias=False,
                   mlp_bias=True, lm_head_bias=True, attention_dropout=float(c.attn_pdrop),
                   hidden_dropout=float(c.resid_pdrop))


def _llama_from_hf(c) -> Dict[str, Any]:
    what = FAMILIES[c.model_type].architecture
    if c.model_type == "qwen2":
        # Qwen2's q/k/v projections always have biases and its other projections never do; its
        # sliding window covers the layers from max_window_layers on (HF `layer_types`), not every layer.
        sliding = [i for i, t in enumerate(getattr(c, "layer_types", None) or []) if t == "sliding_attention"]
        if sliding:
            raise ConfigError(f"use_sliding_window=true: {what} then bands layers {sliding[0]}..{sliding[-1]} only "
                              "(from max_window_layers on); a window on some layers is not supported")
    else:
        _refuse_true(c, ("attention_bias", "mlp_bias"), "MistralForCausalLM's projections have no biases" if
                     c.model_type == "mistral" else "biases on LlamaForCausalLM's projections are not supported")
    pct, base, scaling = _rope(c, "rope_scaling / rope_parameters")
    if pct not in (None, 1.0):
        raise ConfigError(f"partial_rotary_factor={pct}: {what} rotates the whole head")
    head_dim = getattr(c, "head_dim", None)
    if head_dim not in (None, c.hidden_size // c.num_attention_heads):
        raise ConfigError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                          f"{c.hidden_size // c.num_attention_heads}, which our attention assumes")
    _activation(c.hidden_act, {"silu": "swiglu"})
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    window = getattr(c, "sliding_window", None) if c.model_type == "mistral" else None
    return _common(c, num_kv_heads=kv if kv != c.num_attention_heads else None,
                   intermediate_size=c.intermediate_size, rotary_pct=1.0, rotary_base=base, rope_scaling=scaling,
                   sliding_window=window, parallel_residual=False, norm="rmsnorm", norm_eps=c.rms_norm_eps,
                   activation="swiglu", attention_bias="qkv" if c.model_type == "qwen2" else False, mlp_bias=False,
                   attention_dropout=float(getattr(c, "attention_dropout", 0.0)), hidden_dropout=0.0)


def model_config_from_hf(hf_config) -> Dict[str, Any]:
    """The `model` section (a dict) equivalent to an HF config of one of FAMILIES."""
    kind = getattr(hf_config, "model_type", None)
    readers: Dict[str, Callable] = {"gpt_neox": _gpt_neox_from_hf, "gptj": _gptj_from_hf, "llama": _llama_from_hf,
                                    "mistral": _llama_from_hf, "qwen2": _llama_from_hf}
    if kind not in readers:
        raise ConfigError(f"model_type={kind!r} is not supported (supported: "
                          f"{', '.join(f.architecture for f in FAMILIES.values())})")
    return {k: v for k, v in readers[kind](hf_config).items() if v is not None}


def family_of(cfg: ModelConfig) -> Family:
    """The HF class our model exports as, decided by its shape: a gated MLP or RMSNorm is Llama (Mistral
    with a sliding window, Qwen2 with biases on q/k/v only), GPT-J's interleaved rotary or shared norm is
    GPT-J, the rest GPT-NeoX."""
    if cfg.norm == "rmsnorm" or cfg.activation == "swiglu":
        if cfg.attention_bias == "qkv":
            return QWEN2
        return MISTRAL if cfg.sliding_window is not None else LLAMA
    if cfg.rotary_interleaved or cfg.shared_norm:
        return GPTJ
    return GPT_NEOX


def export_problems(cfg: ModelConfig, family: Family) -> List[str]:
    """What of `cfg` the HF class cannot express; [] when the export is exact."""
    p: List[str] = []
    name = family.architecture

    def need(ok: bool, what: str) -> None:
        if not ok:
            p.append(f"{what} ({name})")

    need(cfg.position_embedding == "rotary", f"model.position_embedding={cfg.position_embedding!r}: rotary only")
    need(cfg.attention_pattern == "dense", f"model.attention_pattern={cfg.attention_pattern!r}: dense only")
    if family is GPT_NEOX or family is GPTJ:
        need(cfg.norm == "layernorm", f"model.norm={cfg.norm!r}: layernorm only")
        need(cfg.activation != "swiglu", f"model.activation={cfg.activation!r}: gelu or gelu_tanh")
        need(not cfg.grouped_query, f"model.num_kv_heads={cfg.num_kv_heads}: no grouped-query attention")
        need(cfg.rope_scaling is None, "model.rope_scaling: not supported")
        need(cfg.sliding_window is None, f"model.sliding_window={cfg.sliding_window}: no sliding window")
        need(cfg.mlp_bias, "model.mlp_bias=false: MLPs always have biases")
        need(cfg.attention_bias != "qkv", "model.attention_bias='qkv': biases on q/k/v and the output, or none")
    if family is GPT_NEOX:
        need(not cfg.shared_norm, "model.shared_norm=true: two norms per layer")
        need(not cfg.lm_head_bias, "model.lm_head_bias=true: no output bias")
    if family is GPTJ:
        need(cfg.rotary_interleaved, "model.rotary_interleaved=false: GPT-J rotates interleaved pairs")
        need(cfg.shared_norm and cfg.parallel_residual, "model.shared_norm=false: one norm, parallel residual")
        need(not cfg.attention_bias, "model.attention_bias=true: no q/k/v/o biases")
        need(cfg.rotary_base == 10000.0, f"model.rotary_base={cfg.rotary_base}: fixed at 10000")
        need(not cfg.tie_embeddings, "model.tie_embeddings=true: untied head with a bias")
    if family is LLAMA or family is MISTRAL or family is QWEN2:
        need(cfg.norm == "rmsnorm", f"model.norm={cfg.norm!r}: rmsnorm only")
        need(cfg.activation == "swiglu", f"model.activation={cfg.activation!r}: swiglu only")
        need(not cfg.parallel_residual, "model.parallel_residual=true: sequential residual only")
        need(not cfg.rotary_interleaved, "model.rotary_interleaved=true: rotate-half only")
        need(cfg.rotary_ndims == cfg.head_dim, f"rotary dims {cfg.rotary_ndims}: the whole head ({cfg.head_dim})")
    if family is LLAMA or family is MISTRAL:
        need(not (cfg.attention_bias or cfg.mlp_bias or cfg.lm_head_bias),
             "model.attention_bias/mlp_bias/lm_head_bias: no biases (set them false)")
    if family is QWEN2:
        need(cfg.sliding_window is None, f"model.sliding_window={cfg.sliding_window}: a window on every layer")
        need(not (cfg.mlp_bias or cfg.lm_head_bias), "model.mlp_bias/lm_head_bias: no biases (set them false)")
    return p


def to_hf_config(cfg: ModelConfig, padded_vocab: int, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
    """The transformers config of our model's family (vocab = our padded vocab)."""
    import transformers

    family = family_of(cfg)
    problems = export_problems(cfg, family)
    if problems:
        raise ConfigError(f"this model cannot be expressed as a Hugging Face {family.architecture}: "
                          + "; ".join(problems))
    # The tokenizer's ids (convert/hf.py SpecialTokens: <|endoftext|> is 0 in GPT-NeoX-20B's, 50256 in
    # GPT-2's; Llama's BOS differs from its EOS); None (unknown) for an export without a tokenizer.
    common = dict(vocab_size=padded_vocab, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  bos_token_id=bos_id, eos_token_id=eos_id, architectures=[family.architecture])
    if family is GPT_NEOX:
        return transformers.GPTNeoXConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size, hidden_act=_HF_GELU[cfg.activation],
            max_position_embeddings=cfg.seq_length, layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.attention_bias,
            rotary_pct=cfg.rotary_ndims / cfg.head_dim, rotary_emb_base=cfg.rotary_base,
            attention_dropout=cfg.attention_dropout, hidden_dropout=cfg.hidden_dropout, **common)
    if family is GPTJ:
        return transformers.GPTJConfig(
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_size,
            rotary_dim=cfg.rotary_ndims, n_positions=cfg.seq_length, activation_function=_HF_GELU[cfg.activation],
            layer_norm_epsilon=cfg.norm_eps, attn_pdrop=cfg.attention_dropout, resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout, **common)
    # rope_theta and rope_scaling: transformers 4.x reads only these (it would keep a `rope_parameters`
    # argument as an unknown attribute and rotate with theta 10000); 5.x folds them into its
    # `rope_parameters`. Both versions' exports give our logits (tests/test_model_families.py; 4.46.3
    # checked by hand: before, its Llama-3/Mistral/Qwen2 logits were off by 1-3).
    rope: Dict[str, Any] = {"rope_theta": cfg.rotary_base}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope["rope_scaling"] = dict(rope_type=s.type, factor=s.factor, low_freq_factor=s.low_freq_factor,
                                    high_freq_factor=s.high_freq_factor,
                                    original_max_position_embeddings=s.original_max_position_embeddings)
    kw = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
              max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps, **rope,
              attention_dropout=cfg.attention_dropout, head_dim=cfg.head_dim, **common)
    if family is MISTRAL:
        return transformers.MistralConfig(sliding_window=cfg.sliding_window, **kw)
    if family is QWEN2:
        return transformers.Qwen2Config(use_sliding_window=False, **kw)
    return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw)
