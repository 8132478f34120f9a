"""Hugging Face checkpoints <-> our layer-indexed state dict, for the classes in convert/hf_families.py
(GPTNeoXForCausalLM, GPTJForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).

The family table says which HF tensor is which of ours; this module renames, fuses or splits q/k/v
and [gate | up], pads the vocabulary, checks that every HF tensor is used, and reads and writes HF
directories. Tensor-parallel shards are merged/split by `parallel.sharding` before/after this module.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from pydantic import ValidationError

from megatron_neox.config import ModelConfig
from megatron_neox.convert.hf_families import (
    GPTJ,
    export_problems,
    family_of,
    fuse_qkv,
    model_config_from_hf,
    split_qkv,
    to_hf_config,
)
from megatron_neox.errors import CheckpointError, ConfigError
from megatron_neox.model.gpt_neox import state_dict_shapes
from megatron_neox.outputs import replace_dir

__all__ = ["check_hf_compatible", "from_hf_state_dict", "to_hf_state_dict", "to_hf_config", "model_config_from_hf",
           "save_hf", "load_hf"]

# Buffers older checkpoints saved beside the weights (causal masks, rotary tables): not parameters.
_BUFFERS = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$|embed_positions$")
_KINDS = ("weight", "bias")


def check_hf_compatible(cfg: ModelConfig) -> None:
    """Refuse, naming each knob, a model that its HF family (hf_families.family_of) cannot express."""
    family = family_of(cfg)
    problems = export_problems(cfg, family)
    if problems:
        raise ConfigError(f"this model cannot be expressed as a Hugging Face {family.architecture}: "
                          + "; ".join(problems))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise CheckpointError(f"vocab of {t.shape[0]} rows does not fit the model's padded vocab of {rows}")
    # Padded rows are never targets; zeros keep their logits neutral (generation masks them).
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def from_hf_state_dict(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """HF state dict of cfg's family -> our full (unsharded) layer-indexed state dict. Every tensor
    our model has must be there, and every HF parameter must be used (a bias the config says the
    class does not have is an error, not silently dropped)."""
    fam = family_of(cfg)
    want = state_dict_shapes(cfg, padded_vocab)
    used = set()
    sd: Dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise CheckpointError(f"Hugging Face checkpoint has no tensor {name!r} (a {fam.architecture} of this "
                                  "config needs it)")
        used.add(name)
        return hf_sd[name]

    sd["0.word_embeddings.weight"] = _pad_rows(take(f"{fam.embed}.weight"), padded_vocab)
    for i in range(cfg.num_layers):
        pre, idx = fam.layer.format(i=i), i + 1
        for kind in _KINDS:
            for ours, theirs in fam.renames:
                if f"{idx}.{ours}.{kind}" in want:
                    sd[f"{idx}.{ours}.{kind}"] = take(f"{pre}{theirs}.{kind}")
            if fam.qkv and any(f"{idx}.attention.{n}.{kind}" in want for n in ("query_key_value", "query")):
                parts = fuse_qkv(*(take(f"{pre}{n}.{kind}") for n in fam.qkv), cfg)
                sd.update({f"{idx}.attention.{n}.{kind}": t for n, t in parts.items()})
            if fam.gate_up and f"{idx}.mlp.dense_h_to_4h.{kind}" in want:
                sd[f"{idx}.mlp.dense_h_to_4h.{kind}"] = torch.cat([take(f"{pre}{n}.{kind}") for n in fam.gate_up])
    L = cfg.num_layers
    for kind in _KINDS:
        if f"{L + 1}.norm.{kind}" in want:
            sd[f"{L + 1}.norm.{kind}"] = take(f"{fam.final_norm}.{kind}")
    head = next((h for h in fam.heads if f"{h}.weight" in hf_sd), fam.heads[0])
    if cfg.tie_embeddings:
        used.update(f"{h}.{kind}" for h in fam.heads for kind in _KINDS if f"{h}.{kind}" in hf_sd
                    and hf_sd[f"{h}.{kind}"].shape == hf_sd[f"{fam.embed}.weight"].shape)
    else:
        for kind in _KINDS:
            if f"{L + 2}.final_linear.{kind}" in want:
                sd[f"{L + 2}.final_linear.{kind}"] = _pad_rows(take(f"{head}.{kind}"), padded_vocab)
    unused = sorted(n for n in hf_sd if n not in used and not _BUFFERS.search(n))
    if unused:
        more = f" (+{len(unused) - 6} more)" if len(unused) > 6 else ""
        raise CheckpointError(f"Hugging Face checkpoint has tensors a {fam.architecture} of this config does not have: "
                              f"{', '.join(unused[:6])}{more} (e.g. biases where the config says there are none)")
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_state_dict(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our full layer-indexed state dict -> HF names of cfg's family (vocab stays padded; config says so)."""
    check_hf_compatible(cfg)
    fam = family_of(cfg)
    L = cfg.num_layers
    out = {f"{fam.embed}.weight": sd["0.word_embeddings.weight"]}
    for i in range(L):
        pre, idx = fam.layer.format(i=i), i + 1
        for kind in _KINDS:
            for ours, theirs in fam.renames:
                if f"{idx}.{ours}.{kind}" in sd:
                    out[f"{pre}{theirs}.{kind}"] = sd[f"{idx}.{ours}.{kind}"]
            qkv = {n: sd[f"{idx}.attention.{n}.{kind}"] for n in ("query_key_value", "query", "key_value")
                   if f"{idx}.attention.{n}.{kind}" in sd}
            if fam.qkv and qkv:
                out.update({f"{pre}{n}.{kind}": t for n, t in zip(fam.qkv, split_qkv(qkv, cfg))})
            if fam.gate_up and f"{idx}.mlp.dense_h_to_4h.{kind}" in sd:
                gate, up = sd[f"{idx}.mlp.dense_h_to_4h.{kind}"].chunk(2)
                out.update({f"{pre}{fam.gate_up[0]}.{kind}": gate, f"{pre}{fam.gate_up[1]}.{kind}": up})
    for kind in _KINDS:
        if f"{L + 1}.norm.{kind}" in sd:
            out[f"{fam.final_norm}.{kind}"] = sd[f"{L + 1}.norm.{kind}"]
    if not cfg.tie_embeddings:
        head = sd[f"{L + 2}.final_linear.weight"]
        out[f"{fam.heads[0]}.weight"] = head
        if f"{L + 2}.final_linear.bias" in sd:
            out[f"{fam.heads[0]}.bias"] = sd[f"{L + 2}.final_linear.bias"]
        elif fam is GPTJ:  # GPT-J's head always has a bias: ours is zero
            out[f"{fam.heads[0]}.bias"] = head.new_zeros(head.shape[0])
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens an export names (config.json, generation_config.json, tokenizer_config.json):
    BOS is the token the tokenizer's own post-processor puts before a text (Llama-2's `<s>`, Llama-3's
    `<|begin_of_text|>`; what our preprocessing puts before each document), else the end-of-document
    token, which GPT-2 and GPT-NeoX use for both; EOS is the end-of-document token."""
    bos: str
    bos_id: int
    eos: str
    eos_id: int
    unk: str

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        """From a `megatron_neox.tokenizer.Tokenizer`."""
        eos, eos_id = tokenizer.eod_token, tokenizer.eod_id
        bos_id = tokenizer.bos_ids[0] if tokenizer.bos_ids else eos_id
        # A byte-level BPE never needs an unknown token; a SentencePiece-style file names its own.
        unk = "<unk>" if tokenizer.token_to_id("<unk>") is not None else eos
        return cls(bos=tokenizer.id_to_token(bos_id), bos_id=bos_id, eos=eos, eos_id=eos_id, unk=unk)


def save_hf(out_dir: os.PathLike, sd: Dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int,
            tokenizer_path: Optional[os.PathLike] = None, special: Optional[SpecialTokens] = None,
            dtype: torch.dtype = torch.float32, vocab: Optional[int] = None, chat: bool = False) -> Path:
    """Write config.json + model.safetensors + generation_config.json (+ tokenizer.json) that
    `from_pretrained` loads; `special` (SpecialTokens.of the tokenizer; None: no ids are named) goes
    with `tokenizer_path`. `vocab` (the tokenizer's size; default the model's `vocab_size`): ids from
    there to `padded_vocab` are padding rows, which HF's generate is told never to pick, as ours does.
    `chat` (a model fine-tuned on chats): the export carries the chat template it was trained with,
    the built-in one included.

    Written into a temporary directory beside `out_dir` and renamed into place, so an
    interrupted export never leaves a directory that looks complete. The caller decides whether
    an existing `out_dir` may be replaced (`outputs.check_output_dir`).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    hf_cfg = to_hf_config(cfg, padded_vocab, *((special.bos_id, special.eos_id) if special else ()))
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(sd, cfg).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_cfg.dtype = str(dtype).replace("torch.", "")
        hf_cfg.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _generation_config(special, cfg.vocab_size if vocab is None else vocab, padded_vocab).save_pretrained(tmp)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                _tokenizer_config(tokenizer_path, special, chat), indent=2))
        chmod_like_umask(tmp)  # mkdtemp and safetensors create owner-only files
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _generation_config(special: Optional[SpecialTokens], vocab: int, padded: int):
    from transformers import GenerationConfig

    bos, eos = (special.bos_id, special.eos_id) if special is not None else (None, None)
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                            suppress_tokens=list(range(vocab, padded)) or None)


def _tokenizer_config(tokenizer_path: os.PathLike, special: Optional[SpecialTokens], chat: bool) -> Dict[str, Any]:
    """tokenizer_config.json of an export: the special tokens, and what a tokenizer_config.json beside
    the run's tokenizer.json declares (its chat template and its own special tokens, e.g. a chat
    model's end-of-turn EOS), so HF's apply_chat_template renders what fine-tuning trained on; for a
    `chat` model without one, the built-in template its chats were rendered with."""
    from megatron_neox.data.chat import ChatTemplate

    config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if special is not None:
        config.update(bos_token=special.bos, eos_token=special.eos, unk_token=special.unk)
    template = ChatTemplate.for_tokenizer(str(tokenizer_path), special.eos if special else "")
    if template.source != "built-in" or chat:
        config.update({k: v for k, v in template.special.items() if v}, chat_template=template.text)
    return config


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
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        hf_cfg = AutoConfig.from_pretrained(hf_dir)
        model = model_config_from_hf(hf_cfg)
        ModelConfig(**model)  # sizes that do not fit together fail here, named, not while converting
    except ConfigError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                             for err in e.errors())
        raise ConfigError(f"{hf_dir / 'config.json'}: sizes that make no model: {problems}") from None
    except Exception as e:  # transformers: OSError/ValueError for bad JSON; TypeError etc. for bad values
        raise ConfigError(f"{hf_dir / 'config.json'}: not a usable Hugging Face config "
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
