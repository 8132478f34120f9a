"""GPT packing indices against a slow, obviously-correct reference; caching; rank-0 build."""
import os

import numpy as np
import pytest

import megatron_neox.data.gpt_dataset as gd
from megatron_neox.data.gpt_dataset import GPTDataset, SampleOrder, build_indices, epoch_starts
from megatron_neox.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_neox.errors import ConfigError, DataError

from _dist import run_distributed


def _reference_samples(doc_sizes, doc_range, num_samples, seq_length, seed, doc_idx):
    """Walk the stream token by token: epochs of documents in doc_idx order, each sample the
    next seq_length+1 (document, offset) pairs, consecutive samples sharing one token."""
    stream = [(d, o) for d in doc_idx for o in range(doc_sizes[d])]
    return [stream[i * seq_length: i * seq_length + seq_length + 1] for i in range(num_samples)]


def _sample_from_indices(doc_sizes, doc_idx, sample_idx, i):
    (p0, o0), (p1, o1) = sample_idx[i], sample_idx[i + 1]
    out = []
    for p in range(p0, p1 + 1):
        lo = o0 if p == p0 else 0
        hi = o1 + 1 if p == p1 else doc_sizes[doc_idx[p]]
        out += [(int(doc_idx[p]), o) for o in range(lo, hi)]
    return out


@pytest.mark.parametrize("permutation", ["table", "arithmetic"])
def test_indices_match_slow_reference(monkeypatch, permutation):
    if permutation == "arithmetic":  # force the large-dataset permutation on small inputs
        monkeypatch.setattr(gd, "SMALL_PERMUTATION", 0)
        monkeypatch.setattr(gd, "_CHUNK", 3)  # and many vectorised steps per epoch
    rng = np.random.default_rng(0)
    for trial in range(150):
        seq_length = int(rng.integers(1, 9))
        n_docs = int(rng.integers(1, 12))
        # Documents from empty to several sequences long.
        sizes = rng.integers(0, 3 * seq_length + 2, size=n_docs + 4).astype(np.int32)
        start = int(rng.integers(0, 4))
        doc_range = (start, start + n_docs)
        if sizes[start:start + n_docs].sum() == 0:
            sizes[start] = 1
        num_samples = int(rng.integers(1, 50))  # up to many epochs of a small range
        doc_idx, sample_idx, starts = build_indices(sizes, doc_range, num_samples, seq_length, seed=trial)
        total = int(starts[-1])  # every sample of the epochs reached
        assert total >= num_samples and len(sample_idx) == total + 1

        epochs = len(doc_idx) // n_docs
        for e in range(epochs):  # every full epoch visits each document once
            assert sorted(doc_idx[e * n_docs:(e + 1) * n_docs].tolist()) == list(range(*doc_range))
        assert set(doc_idx[epochs * n_docs:].tolist()) <= set(range(*doc_range))
        assert sample_idx[total, 0] == len(doc_idx) - 1  # no unused tail of documents
        order = SampleOrder(starts, seed=trial)
        for e in range(len(starts) - 1):  # each epoch serves its own samples, in some order
            served = order.range(int(starts[e]), int(starts[e + 1]))
            assert sorted(served.tolist()) == list(range(starts[e], starts[e + 1]))
            assert [order[i] for i in range(starts[e], starts[e + 1])] == served.tolist()

        expected = _reference_samples(sizes, doc_range, total, seq_length, trial, doc_idx)
        for i in range(total):
            assert _sample_from_indices(sizes, doc_idx, sample_idx, i) == expected[i], (trial, i)


def test_epoch_starts_are_the_samples_starting_in_each_epoch():
    # 100 tokens per epoch, samples of 16: sample j starts at token 16 j.
    assert epoch_starts(100, 16, 1).tolist() == [0, 7]
    assert epoch_starts(100, 16, 7).tolist() == [0, 7]
    assert epoch_starts(100, 16, 8).tolist() == [0, 7, 13]
    assert epoch_starts(100, 16, 19).tolist() == [0, 7, 13, 19]
    assert epoch_starts(10, 16, 2).tolist() == [0, 1, 2]  # an epoch shorter than a sample


@pytest.mark.parametrize("permutation", ["table", "arithmetic"])
def test_first_samples_do_not_depend_on_how_many_are_requested(monkeypatch, permutation):
    """Prefix stability: the first k samples served are the same whether 1, 7, ... or 900
    samples were asked for (one epoch here holds ~160 samples)."""
    if permutation == "arithmetic":
        monkeypatch.setattr(gd, "SMALL_PERMUTATION", 0)
    sizes = np.random.default_rng(1).integers(1, 60, size=90).astype(np.int32)

    def served(n):
        doc_idx, sample_idx, starts = build_indices(sizes, (3, 83), n, 16, seed=9)
        order = SampleOrder(starts, seed=9)
        return [_sample_from_indices(sizes, doc_idx, sample_idx, order[i]) for i in range(n)]

    longest = served(900)
    for n in (1, 7, 100, 161, 162, 500):
        assert served(n) == longest[:n], n


def test_epochs_get_different_orders_and_seed_matters():
    sizes = np.full(100, 10, dtype=np.int32)
    doc_idx, _, starts = build_indices(sizes, (0, 100), 300, 9, seed=1)
    assert len(doc_idx) >= 250
    assert doc_idx[:100].tolist() != doc_idx[100:200].tolist()
    order = SampleOrder(starts, seed=1).range(0, 300)
    assert order[:100].tolist() != sorted(order[:100].tolist())  # samples are served shuffled
    other, _, other_starts = build_indices(sizes, (0, 100), 300, 9, seed=2)
    assert doc_idx[:100].tolist() != other[:100].tolist()
    assert order.tolist() != SampleOrder(other_starts, seed=2).range(0, 300).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4096, 4097, 77777])
def test_arithmetic_permutation_is_a_bijection(monkeypatch, n):
    monkeypatch.setattr(gd, "SMALL_PERMUTATION", 0)
    perm = gd._Permutation(n, np.random.default_rng(n))
    out = np.empty(n, dtype=np.int64)
    perm.range(0, n, out)
    assert np.array_equal(np.sort(out), np.arange(n))
    if n >= 1000:  # and it actually shuffles: few fixed points, neighbours land far apart
        assert np.count_nonzero(out == np.arange(n)) < 10
        assert np.median(np.abs(np.diff(out))) > n / 10
    assert [perm.at(i) for i in range(n)][:500] == out[:500].tolist()  # one position = the whole
    part = np.empty(7, dtype=np.int64)
    if n > 10:
        perm.range(3, 10, part)  # any window gives the same values as the whole
        assert np.array_equal(part, out[3:10])


def test_empty_range_is_a_clear_error():
    with pytest.raises(DataError, match=r"document range \[2, 4\) holds no tokens"):
        build_indices(np.array([5, 5, 0, 0], np.int32), (2, 4), 3, 4, seed=0)


# -- on-disk datasets ------------------------------------------------------------------------

def _dataset(tmp_path, sizes, name="ds"):
    """Documents of distinct tokens (document j holds j*1000 + offset), so a sample shows exactly
    which tokens it took."""
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        for j, s in enumerate(sizes):
            b.add_document(np.arange(s, dtype=np.int32) + 1000 * j)
    return IndexedDataset(prefix)


def test_samples_are_the_packed_token_stream(tmp_path):
    sizes = [7, 1, 30, 4, 12, 9, 3]
    ds = _dataset(tmp_path, sizes)
    data = GPTDataset(ds, (1, 6), 25, 8, seed=3, cache_dir=str(tmp_path / "cache"), name="train")
    stream = np.concatenate([np.arange(sizes[d]) + 1000 * d for d in data.doc_idx])
    for i in range(len(data)):
        j = data.order[i]
        sample = data[i]
        assert sample.dtype == np.int64 and sample.shape == (9,)
        np.testing.assert_array_equal(sample, stream[j * 8: j * 8 + 9])
    with pytest.raises(IndexError):
        data[25]


def test_cache_is_reused_and_keyed(tmp_path):
    ds = _dataset(tmp_path, [50] * 40)  # 2000 tokens: 125 samples of 16 start in each epoch
    cache = str(tmp_path / "cache")
    first = GPTDataset(ds, (0, 40), 100, 16, seed=5, cache_dir=cache, name="train")
    assert first.built_here
    files = sorted(os.listdir(cache))
    assert len(files) == 4  # three .npy arrays and the description
    again = GPTDataset(ds, (0, 40), 100, 16, seed=5, cache_dir=cache, name="train")
    assert not again.built_here  # loaded, not rebuilt
    for a in ("doc_idx", "sample_idx"):
        np.testing.assert_array_equal(getattr(first, a), getattr(again, a))
        assert isinstance(getattr(again, a), np.memmap)
    assert sorted(os.listdir(cache)) == files
    # A longer run within the same epoch reuses the arrays, and serves the same first samples.
    longer = GPTDataset(ds, (0, 40), 125, 16, seed=5, cache_dir=cache, name="train")
    assert not longer.built_here and len(longer) == 125
    assert all(np.array_equal(longer[i], first[i]) for i in range(100))
    # Anything that changes the indices changes the key.
    for kwargs in ({"seed": 6}, {"num_samples": 126}, {"seq_length": 15}, {"doc_range": (0, 39)}):
        args = dict(doc_range=(0, 40), num_samples=100, seq_length=16, seed=5) | kwargs
        assert GPTDataset(ds, cache_dir=cache, name="train", **args).built_here, kwargs


def test_rewritten_index_of_same_size_and_mtime_misses_the_cache(tmp_path):
    ds = _dataset(tmp_path, [50] * 40)
    cache = str(tmp_path / "cache")
    old = GPTDataset(ds, (0, 40), 100, 16, seed=5, cache_dir=cache, name="train")
    idx = tmp_path / "ds.idx"
    st = os.stat(idx)
    ds2 = _dataset(tmp_path, [60, 40] * 20)  # same document count and .idx size, other sizes
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(idx).st_size == st.st_size and os.stat(idx).st_mtime_ns == st.st_mtime_ns
    new = GPTDataset(ds2, (0, 40), 100, 16, seed=5, cache_dir=cache, name="train")
    assert new.built_here
    stream = np.concatenate([np.arange(ds2.document_sizes()[d]) + 1000 * d for d in new.doc_idx])
    j = new.order[0]
    np.testing.assert_array_equal(new[0], stream[16 * j: 16 * j + 17])
    assert not np.array_equal(np.asarray(new.sample_idx), np.asarray(old.sample_idx))


def _build_on_two_ranks(rank, world_size, prefix, cache):
    ds = IndexedDataset(prefix)
    data = GPTDataset(ds, (0, ds.num_documents), 200, 16, seed=7, cache_dir=cache, name="dist")
    return data.built_here, np.asarray(data.sample_idx).tolist(), [data[i].tolist() for i in range(0, 200, 37)]


def test_rank0_builds_and_other_ranks_load(tmp_path):
    ds = _dataset(tmp_path, list(range(1, 60)))
    results = run_distributed(_build_on_two_ranks, 2, ds.prefix, str(tmp_path / "cache"))
    assert [r[0] for r in results] == [True, False]
    assert results[0][1:] == results[1][1:]


def test_dataset_arguments_are_checked_before_building(tmp_path):
    ds = _dataset(tmp_path, [5, 0, 0, 5])
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"ds\.idx: documents \[1, 3\) hold no tokens; cannot cut 4 samples \(valid\)"):
        GPTDataset(ds, (1, 3), 4, 8, seed=0, cache_dir=cache, name="valid")
    with pytest.raises(ConfigError, match=r"document range \[2, 9\) is outside .*ds \(4 documents\)"):
        GPTDataset(ds, (2, 9), 4, 8, seed=0, cache_dir=cache, name="train")
    assert not os.path.exists(cache)
