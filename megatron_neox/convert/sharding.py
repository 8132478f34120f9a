"""Split and merge full (unsharded) state dicts across tensor-parallel ranks and pipeline stages.

Keys are the layer-indexed names shared by `GPTNeoX` and the `PipelineModule` (see
model/gpt_neox.py). Which tensors are sharded, along which dim and with which stride, mirrors
the parallel layers: column-parallel weights/biases split rows (dim 0), row-parallel weights split
columns (dim 1) and keep their bias whole, the vocab-parallel embedding and head split rows.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron_neox.config import ModelConfig

# (regex on the key without its layer index, partition dim)
_SHARDED = [
    (r"word_embeddings\.weight", 0),
    (r"final_linear\.weight", 0),
    (r"attention\.query_key_value\.(weight|bias)", 0),
    (r"attention\.dense\.weight", 1),
    (r"mlp\.dense_h_to_4h\.(weight|bias)", 0),
    (r"mlp\.dense_4h_to_h\.weight", 1),
]


def split_key(key: str) -> Tuple[int, str]:
    """'12.attention.dense.weight' -> (12, 'attention.dense.weight')."""
    idx, rest = key.split(".", 1)
    return int(idx), rest


def partition_of(name: str, cfg: ModelConfig) -> Optional[Tuple[int, int]]:
    """(dim, stride) of a sharded parameter (name without layer index), None if replicated."""
    for pattern, dim in _SHARDED:
        if re.fullmatch(pattern, name):
            stride = 2 if name.startswith("mlp.dense_h_to_4h") and cfg.activation == "swiglu" else 1
            return dim, stride
    return None


def _shard(t: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    # With stride s the tensor is s equal sub-blocks ([gate | up]); each is split separately.
    blocks = t.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[rank] for b in blocks], dim=dim).clone()


def _merge(parts: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([pr[s] for pr in per_rank], dim=dim) for s in range(stride)], dim=dim)


def shard_state_dict(full: Dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> Dict[str, torch.Tensor]:
    out = {}
    for key, t in full.items():
        part = partition_of(split_key(key)[1], cfg)
        out[key] = t.clone() if part is None or tp == 1 else _shard(t, part[0], part[1], tp, rank)
    return out


def merge_state_dicts(shards: List[Dict[str, torch.Tensor]], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Inverse of shard_state_dict: one dict per TP rank, in rank order."""
    out = {}
    for key in shards[0]:
        part = partition_of(split_key(key)[1], cfg)
        if part is None or len(shards) == 1:
            out[key] = shards[0][key]
        else:
            out[key] = _merge([s[key] for s in shards], part[0], part[1])
    return out
