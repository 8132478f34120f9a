"""Hugging Face `GPTNeoXForCausalLM` <-> our layer-indexed state dict.

Both sides store the fused QKV the same way (rows interleaved per head: [head][q|k|v][head_dim]),
so the mapping is a renaming plus vocab padding. Tensor-parallel shards are merged/split by
`parallel.sharding` before/after this module.

HF names: gpt_neox.embed_in, gpt_neox.layers.i.{input_layernorm, post_attention_layernorm,
attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h},
gpt_neox.final_layer_norm, embed_out (transformers 4.x; 5.x renames it lm_head on load and
accepts both). We write `embed_out` so either version loads the export.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from pydantic import ValidationError

from megatron_neox.config import ModelConfig
from megatron_neox.errors import CheckpointError, ConfigError
from megatron_neox.outputs import replace_dir

# Our activation name -> HF's (ACT2FN): "gelu" is exact erf GELU, "gelu_new" the tanh form.
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}

_LAYER_PARTS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)


def check_hf_compatible(cfg: ModelConfig) -> None:
    """GPTNeoXForCausalLM covers a subset of our architectures; say which knob does not fit."""
    problems = []
    if cfg.position_embedding != "rotary":
        problems.append(f"model.position_embedding={cfg.position_embedding!r} (HF GPTNeoX: rotary only)")
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm!r} (HF GPTNeoX: layernorm only)")
    if cfg.activation == "swiglu":
        problems.append(f"model.activation={cfg.activation!r} (HF GPTNeoX: gelu or gelu_tanh)")
    if cfg.shared_norm:
        problems.append("model.shared_norm=true (HF GPTNeoX has two norms per layer)")
    if not cfg.mlp_bias:
        problems.append("model.mlp_bias=false (HF GPTNeoX MLPs always have biases)")
    if cfg.attention_pattern != "dense":
        problems.append(f"model.attention_pattern={cfg.attention_pattern!r} (HF GPTNeoX: dense)")
    if problems:
        raise ConfigError("this model cannot be expressed as a Hugging Face GPTNeoXForCausalLM: " + "; ".join(problems))


def to_hf_config(cfg: ModelConfig, padded_vocab: int, eod_id: Optional[int] = None):
    from transformers import GPTNeoXConfig

    check_hf_compatible(cfg)
    return GPTNeoXConfig(
        vocab_size=padded_vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=_HF_ACT[cfg.activation],
        max_position_embeddings=cfg.seq_length,
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=cfg.parallel_residual,
        attention_bias=cfg.attention_bias,
        tie_word_embeddings=cfg.tie_embeddings,
        rotary_pct=cfg.rotary_ndims / cfg.head_dim,
        rotary_emb_base=cfg.rotary_base,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        initializer_range=cfg.init_std,
        # The tokenizer's <|endoftext|> id (0 for GPT-NeoX-20B's, 50256 for GPT-2's); None (unknown)
        # for an export without a tokenizer rather than a guess.
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        architectures=["GPTNeoXForCausalLM"],
    )


def _rope(hf_config) -> Tuple[float, float]:
    rp = getattr(hf_config, "rope_parameters", None) or {}
    pct = rp.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    base = rp.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0))
    return float(pct), float(base)


def model_config_from_hf(hf_config) -> Dict[str, Any]:
    """The `model` section (as a dict) equivalent to a GPTNeoXConfig."""
    if getattr(hf_config, "model_type", "gpt_neox") != "gpt_neox":
        raise ConfigError(f"expected a gpt_neox model, found model_type={hf_config.model_type!r}")
    activation = {v: k for k, v in _HF_ACT.items()}.get(hf_config.hidden_act)
    if hf_config.hidden_act == "gelu_pytorch_tanh":
        activation = "gelu_tanh"
    if activation is None:
        raise ConfigError(f"hidden_act={hf_config.hidden_act!r} is not supported (expected 'gelu' or 'gelu_new')")
    pct, base = _rope(hf_config)
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    return {
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "seq_length": hf_config.max_position_embeddings,
        "vocab_size": hf_config.vocab_size,
        "intermediate_size": hf_config.intermediate_size,
        "position_embedding": "rotary",
        "rotary_dims": int(head_dim * pct),
        "rotary_base": base,
        "parallel_residual": bool(hf_config.use_parallel_residual),
        "norm": "layernorm",
        "norm_eps": hf_config.layer_norm_eps,
        "activation": activation,
        "attention_bias": bool(getattr(hf_config, "attention_bias", True)),
        "mlp_bias": True,
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
        "attention_dropout": float(hf_config.attention_dropout),
        "hidden_dropout": float(hf_config.hidden_dropout),
    }


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise CheckpointError(f"vocab of {t.shape[0]} rows does not fit the model's padded vocab of {rows}")
    # Padded rows are never targets; zeros keep their logits neutral (generation masks them).
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def from_hf_state_dict(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """HF GPTNeoXForCausalLM state dict -> our full (unsharded) layer-indexed state dict."""
    L = cfg.num_layers
    sd: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise CheckpointError(f"Hugging Face checkpoint has no tensor {name!r}")
        return hf_sd[name]

    sd["0.word_embeddings.weight"] = _pad_rows(take("gpt_neox.embed_in.weight"), padded_vocab)
    for i in range(L):
        for part in _LAYER_PARTS:
            name = f"gpt_neox.layers.{i}.{part}"
            if name in hf_sd:
                sd[f"{i + 1}.{part}"] = hf_sd[name]
            elif not (part.endswith(".bias") and part.startswith("attention.") and not cfg.attention_bias):
                raise CheckpointError(f"Hugging Face checkpoint has no tensor {name!r}")
    sd[f"{L + 1}.norm.weight"] = take("gpt_neox.final_layer_norm.weight")
    sd[f"{L + 1}.norm.bias"] = take("gpt_neox.final_layer_norm.bias")
    if not cfg.tie_embeddings:
        head = hf_sd.get("embed_out.weight", hf_sd.get("lm_head.weight"))
        if head is None:
            raise CheckpointError("Hugging Face checkpoint has neither 'embed_out.weight' nor 'lm_head.weight'")
        sd[f"{L + 2}.final_linear.weight"] = _pad_rows(head, padded_vocab)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_state_dict(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our full layer-indexed state dict -> HF names (vocab stays padded; config says so)."""
    check_hf_compatible(cfg)
    L = cfg.num_layers
    out = {"gpt_neox.embed_in.weight": sd["0.word_embeddings.weight"]}
    for i in range(L):
        for part in _LAYER_PARTS:
            key = f"{i + 1}.{part}"
            if key in sd:
                out[f"gpt_neox.layers.{i}.{part}"] = sd[key]
    out["gpt_neox.final_layer_norm.weight"] = sd[f"{L + 1}.norm.weight"]
    out["gpt_neox.final_layer_norm.bias"] = sd[f"{L + 1}.norm.bias"]
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = sd[f"{L + 2}.final_linear.weight"]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def save_hf(out_dir: os.PathLike, sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int,
            tokenizer_path: Optional[os.PathLike] = None, eod_id: Optional[int] = None,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) that `from_pretrained` loads.

    Written into a temporary directory beside `out_dir` and renamed into place, so an
    interrupted export never leaves a directory that looks complete. The caller decides whether
    an existing `out_dir` may be replaced (`outputs.check_output_dir`).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    hf_cfg = to_hf_config(cfg, padded_vocab, eod_id)
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(sd, cfg).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_cfg.dtype = str(dtype).replace("torch.", "")
        hf_cfg.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            }, indent=2))
        chmod_like_umask(tmp)  # mkdtemp and safetensors create owner-only files
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def chmod_like_umask(root: Path) -> None:
    """Give a finished output tree the modes plain mkdir/open would (mkdtemp and safetensors
    create owner-only files) before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def load_hf(hf_dir: os.PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(model section dict, HF state dict) from a local HF directory (no download)."""
    from transformers import GPTNeoXConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        hf_cfg = GPTNeoXConfig.from_pretrained(hf_dir)
        model = model_config_from_hf(hf_cfg)
        ModelConfig(**model)  # sizes that do not fit together fail here, named, not while converting
    except ConfigError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                             for err in e.errors())
        raise ConfigError(f"{hf_dir / 'config.json'}: sizes that make no model: {problems}") from None
    except Exception as e:  # transformers: OSError/ValueError for bad JSON; TypeError etc. for bad values
        raise ConfigError(f"{hf_dir / 'config.json'}: not a usable GPTNeoX config "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    sd: Dict[str, torch.Tensor] = {}
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        loader = lambda f: load_file(str(f))  # noqa: E731
    else:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
        loader = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    for f in files:
        try:
            sd.update(loader(f))
        except Exception as e:  # safetensors' SafetensorError, torch's zip/unpickling errors
            raise CheckpointError(f"{f}: unreadable weights ({type(e).__name__}: {_first_line(e)}); "
                                  "the file is truncated or corrupt") from None
    return model, sd


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]
