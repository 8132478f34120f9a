"""MMIDIDX writer/reader: byte layout, round trips, corrupt-file errors, atomic writes, merging."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_neox.data.indexed import (
    DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path,
    merge_datasets)
from megatron_neox.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_docs(rng, dtype, n=20):
    info = np.iinfo(dtype)
    hi = min(int(info.max), 50_000)
    return [rng.integers(max(int(info.min), 0), hi, size=int(rng.integers(0, 30))).astype(dtype) for _ in range(n)]


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    docs = _random_docs(rng, dtype)
    prefix = str(tmp_path / "ds")
    _write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == len(docs) and ds.num_documents == len(docs)
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64 and ds.doc_idx.dtype == np.int64
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
    assert ds.pointers.tolist() == (np.cumsum([0] + [len(d) for d in docs[:-1]]) * dtype.itemsize).tolist()
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        assert ds[i].dtype == dtype
    big = max(range(len(docs)), key=lambda i: len(docs[i]))
    view = ds.get(big, 2, 5)
    np.testing.assert_array_equal(view, docs[big][2:7])
    assert not view.flags.owndata and not view.flags.writeable  # zero-copy view of the mmap


def test_header_bytes_follow_megatron_layout(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        b.add_item([1, 2, 3])
        b.add_item([4])
        b.end_document()
        b.add_document([5, 6])
    raw = open(index_file_path(prefix), "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n, m) == (1, 4, 3, 3)
    off = 34
    assert np.frombuffer(raw, "<i4", 3, off).tolist() == [3, 1, 2]
    assert np.frombuffer(raw, "<i8", 3, off + 12).tolist() == [0, 12, 16]  # byte offsets, int32 tokens
    assert np.frombuffer(raw, "<i8", 3, off + 36).tolist() == [0, 2, 3]
    assert len(raw) == off + 12 + 24 + 24
    assert open(data_file_path(prefix), "rb").read() == np.arange(1, 7, dtype="<i4").tobytes()


def test_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_item([1, 2])
        b.add_item([3])
        b.end_document()
        b.end_document()  # no sequence since the last boundary: no empty document
        b.add_document([4, 5, 6])
        b.add_item([7])  # left open: finalize closes it
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 3, 4]
    assert ds.document_sizes().tolist() == [3, 3, 1]
    np.testing.assert_array_equal(ds.get_document(0), [1, 2, 3])
    np.testing.assert_array_equal(ds.get_document(1, 1, 2), [5, 6])


def test_best_dtype_follows_vocab_size():
    assert best_dtype(50277) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(256000) == np.int32


def test_builder_rejects_tokens_outside_dtype_and_float_dtypes(tmp_path):
    with pytest.raises(DataError, match=r"token ids span \[0, 70000\].*uint16"):
        with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as b:
            b.add_document(np.array([0, 70000]))
    with pytest.raises(ConfigError, match="float32 cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "f"), np.float32)
    assert os.listdir(tmp_path) == []


def test_exception_inside_builder_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as b:
            b.add_document([1, 2, 3])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_close_without_finalize_leaves_no_file(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16)
    b.add_document([1, 2, 3])
    assert len(os.listdir(tmp_path)) == 1  # only the temporary .bin so far
    b.close()
    assert os.listdir(tmp_path) == []
    b = IndexedDatasetBuilder(str(tmp_path / "ds2"), np.uint16)
    b.add_document([1])
    del b  # dropped without close()
    assert os.listdir(tmp_path) == []


# -- corrupt files ---------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, [[1, 2, 3], [4, 5], [6]])
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_missing_files_are_named(good, tmp_path):
    with pytest.raises(DataError, match=r"nothere\.idx: index file not found"):
        IndexedDataset(str(tmp_path / "nothere"))
    os.remove(data_file_path(good))
    with pytest.raises(DataError, match=r"ds\.bin: data file not found"):
        IndexedDataset(good)


def test_wrong_magic(good):
    _patch(index_file_path(good), 0, b"GARBAGE!!")
    with pytest.raises(DataError, match=r"ds\.idx: not an MMIDIDX index: found magic b'GARBAGE!!'"):
        IndexedDataset(good)
    _patch(index_file_path(good), 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(DataError, match="old non-mmap 'TNTIDX' format"):
        IndexedDataset(good)


def test_wrong_version(good):
    _patch(index_file_path(good), 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"ds\.idx: unsupported index version 2, expected 1"):
        IndexedDataset(good)


@pytest.mark.parametrize("code,why", [(6, "float code"), (7, "float code"), (9, "unknown code"), (0, "unknown code")])
def test_bad_dtype_code(good, code, why):
    _patch(index_file_path(good), 17, struct.pack("<B", code))
    with pytest.raises(DataError, match=rf"ds\.idx: dtype code {code} is an? {why}.*expected one of \[1, 2, 3, 4, 5, 8\]"):
        IndexedDataset(good)


def test_truncated_index(good):
    idx = index_file_path(good)
    full = os.path.getsize(idx)
    _truncate(idx, full - 8)
    with pytest.raises(DataError, match=rf"ds\.idx: truncated index: {full - 8} bytes, expected {full} for 3 sequences"):
        IndexedDataset(good)
    _truncate(idx, 20)
    with pytest.raises(DataError, match=r"ds\.idx: truncated index: 20 bytes, the header alone needs 34"):
        IndexedDataset(good)


def test_trailing_bytes_in_index(good):
    with open(index_file_path(good), "ab") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(DataError, match=r"ds\.idx: 5 unexpected bytes after the index"):
        IndexedDataset(good)


def test_bin_size_must_match_index(good):
    _truncate(data_file_path(good), 10)  # 6 uint16 tokens = 12 bytes
    with pytest.raises(DataError, match=r"ds\.bin: 10 bytes, but .*ds\.idx \(last pointer \+ size\) describes 12"):
        IndexedDataset(good)
    with open(data_file_path(good), "ab") as f:
        f.write(b"\x00" * 6)
    with pytest.raises(DataError, match=r"ds\.bin: 16 bytes, but .* describes 12"):
        IndexedDataset(good)


def test_bad_doc_idx(good):
    _patch(index_file_path(good), 34 + 12 * 3 + 8 * 3, struct.pack("<q", 7))  # last doc_idx entry
    with pytest.raises(DataError, match=r"ds\.idx: doc_idx must start at 0 and end at the sequence count 3; found first 0, last 7"):
        IndexedDataset(good)


# -- merging ---------------------------------------------------------------------------------

def test_merge_keeps_document_boundaries(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
    with IndexedDatasetBuilder(a, np.uint16) as w:
        w.add_document([1, 2])
        w.add_item([3])
        w.add_item([4, 5])
        w.end_document()
    _write(b, [[6], [], [7, 8, 9]])
    merge_datasets([a, b, a], out)
    m = IndexedDataset(out)
    assert m.sizes.tolist() == [2, 1, 2, 1, 0, 3, 2, 1, 2]
    assert m.doc_idx.tolist() == [0, 1, 3, 4, 5, 6, 7, 9]
    docs = [m.get_document(j).tolist() for j in range(m.num_documents)]
    assert docs == [[1, 2], [3, 4, 5], [6], [], [7, 8, 9], [1, 2], [3, 4, 5]]
    assert m.pointers.tolist() == (np.cumsum([0] + m.sizes.tolist()[:-1]) * 2).tolist()


def test_merge_refuses_mixed_dtypes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, [[1]], np.uint16)
    _write(b, [[1]], np.int32)
    with pytest.raises(DataError, match=r"b\.idx: token dtype int32 differs from uint16"):
        merge_datasets([a, b], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


def test_merge_tool_cli(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
    _write(a, [[1, 2], [3]])
    _write(b, [[4]])
    tool = os.path.join(REPO, "tools", "merge_datasets.py")
    ok = subprocess.run([sys.executable, tool, "--inputs", a, b, "--output-prefix", out],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "3 documents" in ok.stdout
    assert IndexedDataset(out).doc_idx.tolist() == [0, 1, 2, 3]
    bad = subprocess.run([sys.executable, tool, "--inputs", a, str(tmp_path / "missing"), "--output-prefix",
                          str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "missing.idx: index file not found" in bad.stderr
    assert not any(n.startswith("out2") for n in os.listdir(tmp_path))
