"""What is sharded across tensor-parallel ranks, along which dim, with which stride: one table.

Keys are the layer-indexed names shared by `GPTNeoX` and the `PipelineModule` (see
model/gpt_neox.py): `IDX.NAME`. `TABLE` lists every parameter family by NAME. Everything that
needs the rule derives from it:

- checkpoint conversion (`shard_state_dict` / `merge_state_dicts`, used by convert/checkpoint_io.py,
  via the one split/merge pair `parallel.utils.shard_rows` / `merge_shards`);
- the universal-checkpoint info DeepSpeed's `ds_to_universal` needs to merge and re-split a run's
  checkpoint (`universal_patterns`, used by training/checkpoint.py);
- the parallel layers mark their own parameters (`partition_dim`, `partition_stride`); a test
  checks that every parameter's marks agree with the table.

Column-parallel weights/biases split rows (dim 0), row-parallel weights split columns (dim 1) and
keep their bias whole (it is added once, after the reduce), the vocab-parallel embedding and head
split rows. A fused [gate | up] MLP input (SwiGLU) has stride 2: each half is split on its own.

Grouped-query attention (model.num_kv_heads < num_attention_heads) has a query projection
(`attention.query`, heads in order) and a key/value projection (`attention.key_value`, rows
[kv head][k|v][head_dim]) instead of the fused QKV. The KV rows are split like any column-parallel
weight when num_kv_heads % tp == 0 (a contiguous block holds whole KV heads, the ones its query heads
use); when tp > num_kv_heads every rank holds all of them (replicated, their gradients summed over the
TP group, see model/transformer.py), so the rule depends on tp. A universal checkpoint (tools/reshard.py)
holds the KV projection whole either way: `ds_to_universal` concatenates the split rows, or takes one
copy of the replicated ones (asserting the ranks agree); DeepSpeed 0.19.8's loader then copies whole a
tensor whose universal shape equals the rank's (replicated) and gives rank r chunk r on dim 0 otherwise
(whole KV heads, as a split run holds them). tests/test_model_families_parallel.py reshards both ways.

`cfg` arguments are a `ModelConfig` (only `cfg.activation` and `cfg.kv_heads` are read); the table lives beside the
parallel layers, below the config, so it does not import it.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_neox.parallel.utils import merge_shards, shard_rows


@dataclass(frozen=True)
class Rule:
    pattern: str             # regex on the parameter name without its layer index
    dim: Optional[int]       # partition dim across TP ranks; None = the same on every TP rank
    vocab: bool = False      # rows are the (padded) vocabulary
    fused_swiglu: bool = False  # [gate | up] under SwiGLU: stride 2
    kv_heads: bool = False   # split like `dim` when num_kv_heads % tp == 0, else replicated


TABLE: Tuple[Rule, ...] = (
    Rule(r"word_embeddings\.weight", 0, vocab=True),
    Rule(r"final_linear\.(weight|bias)", 0, vocab=True),
    Rule(r"attention\.query_key_value\.(weight|bias)", 0),
    Rule(r"attention\.query\.(weight|bias)", 0),
    Rule(r"attention\.key_value\.(weight|bias)", 0, kv_heads=True),
    Rule(r"attention\.dense\.weight", 1),
    Rule(r"mlp\.dense_h_to_4h\.(weight|bias)", 0, fused_swiglu=True),
    Rule(r"mlp\.dense_4h_to_h\.weight", 1),
    Rule(r"attention\.dense\.bias", None),
    Rule(r"mlp\.dense_4h_to_h\.bias", None),
    Rule(r"(input_layernorm|post_attention_layernorm|norm)\.(weight|bias)", None),
    Rule(r"position_embeddings\.weight", None),
)


def split_key(key: str) -> Tuple[int, str]:
    """'12.attention.dense.weight' -> (12, 'attention.dense.weight')."""
    idx, rest = key.split(".", 1)
    return int(idx), rest


def kv_heads_sharded(kv_heads: int, tp: int) -> bool:
    """Whether the KV heads are split across the TP ranks (kv % tp == 0) rather than replicated on
    every rank (tp % kv == 0 and tp > kv: each rank computes every KV head and uses its group's;
    any other pair is refused by layout.py)."""
    return kv_heads % tp == 0


def rule_of(name: str) -> Rule:
    """The table's rule for a parameter name (without layer index); KeyError for an unknown name."""
    for rule in TABLE:
        if re.fullmatch(rule.pattern, name):
            return rule
    raise KeyError(f"{name}: no sharding rule in parallel/sharding.py TABLE")


def partition_of(name: str, cfg, tp: int) -> Optional[Tuple[int, int]]:
    """(dim, stride) of a parameter (name without layer index) sharded over `tp` ranks, None if replicated."""
    rule = rule_of(name)
    if rule.dim is None or (rule.kv_heads and not kv_heads_sharded(cfg.kv_heads, tp)):
        return None
    return rule.dim, 2 if rule.fused_swiglu and cfg.activation == "swiglu" else 1


def shard_state_dict(full: Dict[str, torch.Tensor], cfg, tp: int, rank: int) -> Dict[str, torch.Tensor]:
    """TP rank `rank`'s part of a full (tp=1) state dict."""
    out = {}
    for key, t in full.items():
        part = partition_of(split_key(key)[1], cfg, tp)
        out[key] = t.clone() if part is None or tp == 1 else shard_rows(t, rank, tp, part[1], dim=part[0])
    return out


def merge_state_dicts(shards: List[Dict[str, torch.Tensor]], cfg) -> Dict[str, torch.Tensor]:
    """Inverse of shard_state_dict: one dict per TP rank, in rank order."""
    out = {}
    for key in shards[0]:
        part = partition_of(split_key(key)[1], cfg, len(shards))
        if part is None or len(shards) == 1:
            out[key] = shards[0][key]
        else:
            out[key] = merge_shards([s[key] for s in shards], part[1], dim=part[0])
    return out


def universal_patterns(cfg, keys: Iterable[str], tp: int) -> Dict[str, List[str]]:
    """The table as DeepSpeed universal-checkpoint regexes over engine parameter names (which may
    carry a layer index or a tied-module prefix), listing only families that `keys` (the model's
    layer-indexed names) has: ds_to_universal insists that every pattern matches something."""
    names = {split_key(k)[1] for k in keys}
    present = [r for r in TABLE if any(re.fullmatch(r.pattern, n) for n in names)]
    regex = [rf"(^|.*\.){r.pattern}$" for r in present]
    replicated = [r.dim is None or (r.kv_heads and not kv_heads_sharded(cfg.kv_heads, tp)) for r in present]
    return {
        "replicated": [x for x, rep in zip(regex, replicated) if rep],
        "row_parallel": [x for x, r in zip(regex, present) if r.dim == 1],
        "vocabulary": [x for x, r in zip(regex, present) if r.vocab],
        "fused_swiglu": [x for x, r in zip(regex, present) if r.fused_swiglu and cfg.activation == "swiglu"],
    }
