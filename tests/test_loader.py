"""Blends, splits, the Pile preset, build_datasets, and resumable data-parallel batches."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import megatron_neox.data.blended as bl
from megatron_neox.data.blended import (
    PILE_EPOCHS, BlendedDataset, blend_counts, parse_split, pile_component, pile_weights, quantize_weights,
    sanitize_component_name)
from megatron_neox.data.gpt_dataset import GPTDataset
from megatron_neox.data.indexed import IndexedDatasetBuilder
from megatron_neox.data.loader import BatchLoader, build_datasets
from megatron_neox.errors import ConfigError, DataError


class _Sized:
    """Stands in for a dataset: sample s of dataset d is (d, s)."""

    def __init__(self, d, n=10**12):
        self.d, self.n = d, n

    def __len__(self):
        return self.n

    def __getitem__(self, s):
        return (self.d, s)


def _max_prefix_error(blend, size):
    d, s = blend.locate(np.arange(size))
    worst = 0.0
    n = np.arange(1, size + 1)
    for k in range(len(blend.datasets)):
        mine = d == k
        counts = np.cumsum(mine)
        worst = max(worst, float(np.max(np.abs(counts - blend.weights[k] * n))))
        # Within a dataset the samples are taken in order 0, 1, 2, ... with no gap or repeat.
        assert np.array_equal(s[mine], np.arange(counts[-1]))
    return worst


def test_blend_within_one_sample_at_every_prefix():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 25))
        weights = rng.dirichlet(np.full(k, rng.choice([0.05, 0.3, 1.0, 5.0])))
        size = int(rng.integers(1, 30_000))
        blend = BlendedDataset([_Sized(i) for i in range(k)], weights, size)
        assert _max_prefix_error(blend, size) < 1, (trial, weights)
        # Rounded to 1/period; each tiny weight lifted to one share takes it from the largest.
        np.testing.assert_allclose(blend.weights, weights, atol=(k + 1) / bl.BLEND_PERIOD)


def test_greedy_counterexample_stays_within_one():
    # Megatron's "most behind" greedy rule lets dataset 5 fall 1.24 samples behind on these weights.
    weights = [1.2e-08, 7.8e-03, 3.0e-02, 3.9e-07, 8.9e-04, 7.27e-01, 2.25e-01, 8.9e-04, 2.8e-14, 1.9e-07,
               4.3e-07, 6.0e-12, 5.1e-03, 4.7e-04, 3.9e-06, 2.7e-09, 6.7e-12, 2.4e-03, 1.8e-07, 1.2e-06]
    blend = BlendedDataset([_Sized(i) for i in range(len(weights))], weights, 20_000)
    assert _max_prefix_error(blend, 20_000) < 1


def test_blend_repeats_with_its_period(monkeypatch):
    monkeypatch.setattr(bl, "BLEND_PERIOD", 997)
    weights = [0.5, 0.3, 0.15, 0.05]
    blend = BlendedDataset([_Sized(i) for i in range(4)], weights, 10_000)
    assert blend.period == 997
    assert _max_prefix_error(blend, 10_000) < 1
    d, _ = blend.locate(np.arange(10_000))
    assert np.array_equal(d[:997], d[997:2 * 997])
    assert blend_counts(weights, 10_000).tolist() == np.bincount(d, minlength=4).tolist()
    assert blend[5000] == (int(d[5000]), int(np.count_nonzero(d[:5000] == d[5000])))


def test_blend_needs_enough_samples_per_dataset():
    with pytest.raises(DataError, match="dataset 1 .* has 10 samples, the blend of 100 needs 50"):
        BlendedDataset([_Sized(0), _Sized(1, 10)], [0.5, 0.5], 100)
    with pytest.raises(ConfigError, match="non-negative numbers with a positive sum"):
        BlendedDataset([_Sized(0)], [-1.0], 10)


def test_quantized_weights_sum_to_the_period_and_keep_tiny_datasets():
    p = quantize_weights([1e-9, 0.3, 0.7, 0.0])
    assert p.sum() == bl.BLEND_PERIOD
    assert p[0] == 1 and p[3] == 0


def test_parse_split_ranges():
    assert parse_split("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert parse_split("969, 30, 1", 10) == [(0, 10), (10, 10), (10, 10)]
    assert parse_split("8/1/1", 100) == [(0, 80), (80, 90), (90, 100)]
    assert parse_split("100", 7) == [(0, 7), (7, 7), (7, 7)]
    assert parse_split("1,1", 5) == [(0, 2), (2, 5), (5, 5)]  # round(2.5) == 2: banker's rounding
    assert parse_split("0,0,1", 9) == [(0, 0), (0, 0), (0, 9)]
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0,0", ""):
        with pytest.raises(ConfigError, match="split"):
            parse_split(bad, 10)


def test_pile_preset_names_and_weights():
    assert len(PILE_EPOCHS) == 22
    assert sanitize_component_name("Gutenberg (PG-19)") == "Gutenberg__PG-19_"
    assert sanitize_component_name("Wikipedia (en)") == "Wikipedia__en_"
    assert sanitize_component_name("USPTO Backgrounds") == "USPTO_Backgrounds"
    assert sanitize_component_name("Pile-CC") == "Pile-CC"
    for name in PILE_EPOCHS:  # every component is found again from its file name
        assert pile_component(f"/data/pile_{sanitize_component_name(name)}_text_document") == name
    with pytest.raises(ConfigError, match="no Pile component name"):
        pile_component("/data/mystery_text_document")
    w = pile_weights(["x_Pile-CC_doc", "x_Wikipedia__en__doc", "x_Books3_doc"], [100, 100, 200])
    np.testing.assert_allclose(w, np.array([1.0, 3.0, 3.0]) * 100 / 700)  # tokens x epochs (1, 3, 1.5)


# -- build_datasets --------------------------------------------------------------------------

def _write(prefix, n_docs, base, rng):
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for j in range(n_docs):
            b.add_document(np.full(int(rng.integers(1, 40)), base, dtype=np.uint16))
    return prefix


def test_build_datasets_blends_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    a = _write(str(tmp_path / "a"), 200, 1, rng)
    b = _write(str(tmp_path / "b"), 50, 2, rng)
    cfg = SimpleNamespace(prefixes=[a, b], weights=[3.0, 1.0], preset=None, split="90,10,0", cache_dir=None)
    train, valid, test = build_datasets(cfg, seq_length=16, seed=1, num_samples=(400, 40, 10))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None
    assert len(train) == 400 and len(valid) == 40
    assert os.path.isdir(tmp_path / "index-cache")  # default: beside the first prefix
    tokens = np.stack([train[i] for i in range(400)])
    share_a = np.count_nonzero(tokens == 1) / tokens.size
    assert 0.70 < share_a < 0.80  # 3:1 by samples; EOD-free documents of one token each
    ranges = [d.doc_range for d in train.datasets]
    assert ranges == [(0, 180), (0, 45)]
    assert [d.doc_range for d in valid.datasets] == [(180, 200), (45, 50)]

    one = SimpleNamespace(prefixes=[a], weights=None, preset=None, split="100", cache_dir=str(tmp_path / "c"))
    train, valid, test = build_datasets(one, seq_length=8, seed=1, num_samples=(50, 5, 5))
    assert isinstance(train, GPTDataset) and valid is None and test is None

    with pytest.raises(ConfigError, match="2 weights for 1 prefixes"):
        build_datasets(SimpleNamespace(prefixes=[a], weights=[1, 2], preset=None, split="1", cache_dir=None),
                       seq_length=8, seed=1, num_samples=(5, 0, 0))


# -- BatchLoader -----------------------------------------------------------------------------

class _Counting:
    """Sample i is [i*100, i*100 + 1, ...]: the tokens say which sample a row came from."""

    def __init__(self, n, seq_length=5):
        self.n, self.t = n, seq_length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.arange(self.t + 1, dtype=np.int64) + 100 * i


def _sample_ids(batches):
    return [int(t) // 100 for mb in batches for t in mb["tokens"][:, 0]]


def test_batch_fields():
    loader = BatchLoader(_Counting(50), micro_batch_size=2, dp_rank=0, dp_size=1, eod_token_id=102,
                         eod_mask_loss=True)
    (mb,) = loader.next_global_batch(2)
    assert mb["tokens"].dtype == torch.int64 and mb["tokens"].shape == (2, 5)
    assert torch.equal(mb["labels"], mb["tokens"] + 1)  # shifted by one
    assert mb["loss_mask"].dtype == torch.float32
    assert mb["loss_mask"][0].tolist() == [1, 1, 1, 1, 1]
    assert mb["loss_mask"][1].tolist() == [1, 1, 0, 1, 1]  # sample 1's input token 102 is EOD
    assert torch.equal(mb["position_ids"], torch.arange(5).expand(2, 5))
    assert loader.consumed_samples == 2


def test_dp_ranks_together_cover_the_single_rank_batch():
    single = BatchLoader(_Counting(1000), micro_batch_size=2, dp_rank=0, dp_size=1)
    ranks = [BatchLoader(_Counting(1000), micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for global_batch in (8, 4, 12):  # ramp-up: the size may change between calls
        want = _sample_ids(single.next_global_batch(global_batch))
        per_rank = [ranks[r].next_global_batch(global_batch) for r in range(2)]
        assert sorted(_sample_ids(per_rank[0]) + _sample_ids(per_rank[1])) == sorted(want)
        # Megatron order: in micro-step m, rank r reads the r-th contiguous block of B samples.
        start = single.consumed_samples - global_batch
        assert _sample_ids(per_rank[1][:1]) == [start + 2, start + 3]
    assert single.consumed_samples == ranks[0].consumed_samples == 24


def test_resume_from_consumed_samples_continues_the_sequence(tmp_path):
    ds = _write(str(tmp_path / "a"), 100, 7, np.random.default_rng(1))
    cfg = SimpleNamespace(prefixes=[ds], weights=None, preset=None, split="100", cache_dir=str(tmp_path / "c"))
    train, _, _ = build_datasets(cfg, seq_length=8, seed=3, num_samples=(60, 0, 0))
    first = BatchLoader(train, micro_batch_size=2, dp_rank=1, dp_size=2)
    for _ in range(3):
        first.next_global_batch(8)
    state = first.state_dict()
    expected = [first.next_global_batch(8) for _ in range(5)]  # runs past 60 samples: wraps around
    train2, _, _ = build_datasets(cfg, seq_length=8, seed=3, num_samples=(60, 0, 0))
    resumed = BatchLoader(train2, micro_batch_size=2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_global_batch(8)
        for g, w in zip(got, want):
            for key in w:
                assert torch.equal(g[key], w[key]), key


def test_wraps_around_and_rejects_indivisible_batches():
    loader = BatchLoader(_Counting(5), micro_batch_size=1, dp_rank=0, dp_size=1, consumed_samples=3)
    assert _sample_ids(loader.next_global_batch(4)) == [3, 4, 0, 1]
    with pytest.raises(ConfigError, match="global batch size 6 is not a positive multiple of .* 2 x 2 = 4"):
        BatchLoader(_Counting(5), micro_batch_size=2, dp_rank=0, dp_size=2).next_global_batch(6)
