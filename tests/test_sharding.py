"""The sharding table (parallel/sharding.py) is the one rule: the layers' own marks agree with it,
and conversion's split/merge round-trips through it."""
import itertools

import pytest
import torch

from megatron_neox.config import ModelConfig
from megatron_neox.parallel.sharding import merge_state_dicts, partition_of, shard_state_dict, universal_patterns
from megatron_neox.model.gpt_neox import GPTNeoX, state_dict_shapes


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=96,
                make_vocab_size_divisible_by=8)
    return ModelConfig(**{**base, **kw})


VARIANTS = [dict(activation=a, position_embedding=p, tie_embeddings=t, attention_bias=b, mlp_bias=b)
            for a, p, t, b in itertools.product(["gelu", "swiglu"], ["rotary", "learned", "alibi"], [False, True],
                                                [True, False])]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_layer_partition_marks_agree_with_the_table(kw):
    cfg = _cfg(**kw)
    for name, p in GPTNeoX(cfg, 96).named_parameters():
        marked = (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
        assert partition_of(name.split(".", 1)[1], cfg) == marked, name


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_shard_then_merge_is_the_identity(activation):
    cfg = _cfg(activation=activation)
    full = GPTNeoX(cfg, 96, seed=3).state_dict()
    shards = [shard_state_dict(full, cfg, 2, r) for r in range(2)]
    key = "2.mlp.dense_h_to_4h.weight"
    half = full[key].shape[0] // 2
    if activation == "swiglu":  # stride 2: rank 0 holds the first half of gate and of up
        assert torch.equal(shards[0][key], torch.cat([full[key][: half // 2], full[key][half: half + half // 2]]))
    else:
        assert torch.equal(shards[0][key], full[key][:half])
    back = merge_state_dicts(shards, cfg)
    assert all(torch.equal(back[k], v) for k, v in full.items())


def test_universal_patterns_list_only_what_the_model_has():
    cfg = _cfg(tie_embeddings=True, attention_bias=False, mlp_bias=False)
    pat = universal_patterns(cfg, state_dict_shapes(cfg, 96))
    assert pat["vocabulary"] == [r"(^|.*\.)word_embeddings\.weight$"]
    assert not any("dense" in p for p in pat["replicated"]) and pat["fused_swiglu"] == []  # no dense biases
    assert sorted(pat["row_parallel"]) == [r"(^|.*\.)attention\.dense\.weight$", r"(^|.*\.)mlp\.dense_4h_to_h\.weight$"]
