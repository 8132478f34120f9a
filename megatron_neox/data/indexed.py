"""Token datasets in Megatron's memory-mapped MMIDIDX format (`prefix.bin` + `prefix.idx`).

`.bin` holds the raw tokens of every sequence back to back. `.idx` (little-endian) is:

    magic   b"MMIDIDX\\x00\\x00"            9 bytes
    version <Q == 1
    dtype   <B  code, see DTYPE_CODES
    n       <Q  number of sequences
    m       <Q  length of doc_idx (= number of documents + 1)
    sizes   int32[n]    tokens per sequence
    pointer int64[n]    byte offset of each sequence in .bin
    doc_idx int64[m]    sequence index where each document starts; doc_idx[0] == 0, doc_idx[-1] == n

This is the layout written and read by Megatron-LM (megatron/core/datasets/indexed_dataset.py)
and gpt-neox (megatron/data/indexed_dataset.py), so files interchange with both.

A document is one or more consecutive sequences (Megatron splits documents into sentences for
BERT); our preprocessing writes one sequence per document. Writers always lay sequences out
contiguously, so a document's tokens are one contiguous run of `.bin`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
from array import array
from typing import Iterable, Sequence

import numpy as np

from megatron_neox.durable import commit, temporary_name, write_json
from megatron_neox.errors import ConfigError, DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Header: magic, <Q version, <B dtype code, <Q sequence count, <Q doc_idx length.
_HEADER = struct.Struct("<9sQBQQ")

# Codes shared by Megatron-LM and gpt-neox. 6 and 7 are floats, and the two projects swap them
# (Megatron: 6 float64 / 7 float32; gpt-neox: 6 float32 / 7 float64), so we neither read nor write them.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}

# The old non-mmap Megatron/fairseq format ("lazy"/"cached" impl) starts with this magic.
_LEGACY_MAGIC = b"TNTIDX\x00\x00"

# Entries checked per vectorised step at open: bounds the temporary arrays for huge indexes.
_CHECK_CHUNK = 1 << 22

logger = logging.getLogger(__name__)


def best_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype for a vocabulary (Megatron's rule: uint16 below 65500, else int32)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_file_path(prefix: str) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str) -> str:
    return f"{prefix}.idx"


def _dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        allowed = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ConfigError(f"token dtype {dt.name} cannot be stored in an MMIDIDX index; expected one of {allowed}")
    return _CODE_OF[dt]


_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete `prefix.{bin,idx}.tmp-PID-*` left by a writer that was killed (SIGKILL, OOM, node
    loss) before it could clean up; files of a live PID on this machine are kept. Returns what
    was removed, and says so in the log. (A PID is only known on its own machine: two machines
    writing one prefix on a shared filesystem already overwrite each other's output.)"""
    removed = []
    for path in glob.glob(glob.escape(data_file_path(prefix)) + ".tmp-*") + glob.glob(
            glob.escape(index_file_path(prefix)) + ".tmp-*"):
        m = _TMP_RE.search(path)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(path)
        logger.warning("removed %s (%d bytes), left by process %s, which no longer runs", path, size, m.group(1))
    return removed


class IndexedDatasetBuilder:
    """Writes `prefix.bin` / `prefix.idx`.

    Both files are written under temporary names and renamed into place by `finalize()`, so a
    crashed or interrupted run never leaves a half-written dataset that a trainer could read.
    `close()` without `finalize()` deletes the temporary files. As a context manager, a clean
    exit finalizes and an exception discards.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        info = np.iinfo(self.dtype)
        self._lo, self._hi = int(info.min), int(info.max)
        parent = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(parent):
            raise ConfigError(f"output directory {parent} for dataset prefix {self.prefix} does not exist")
        remove_stale_temporaries(self.prefix)
        # Unique suffix: several writers (e.g. one per Pile component) may share a directory.
        self._bin_tmp = temporary_name(data_file_path(self.prefix))
        self._idx_tmp = temporary_name(index_file_path(self.prefix))
        try:
            self._bin = open(self._bin_tmp, "wb")
        except OSError as e:
            raise ConfigError(f"output directory {parent} for dataset prefix {self.prefix}: cannot write there "
                              f"({e.strerror or e}); choose a writable output prefix") from None
        # array('i'/'q') keeps 4/8 bytes per entry: a Python list would cost ~36 bytes per
        # sequence, i.e. gigabytes for a Pile-sized corpus.
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        self._finalized = False
        self._closed = False

    # -- writing -------------------------------------------------------------------------

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.prefix}: a sequence must be a 1-D token array, got shape {arr.shape}")
        if arr.size == 0:
            return arr.astype(self.dtype)
        if arr.dtype.kind not in "iu":
            raise DataError(f"{self.prefix}: tokens must be integers, got dtype {arr.dtype}")
        if arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._lo or hi > self._hi:
                raise DataError(
                    f"{self.prefix}: token ids span [{lo}, {hi}] but the dataset dtype {self.dtype.name} holds "
                    f"[{self._lo}, {self._hi}]; choose the dtype with best_dtype(vocab_size)"
                )
            arr = arr.astype(self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a sequence of {arr.size} tokens exceeds the int32 size field")
        return arr

    def _check_open(self):
        if self._closed or self._finalized:
            raise DataError(f"{self.prefix}: builder is already {'finalized' if self._finalized else 'closed'}")

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (Megatron's multi-sequence documents)."""
        self._check_open()
        # The format is little-endian; on little-endian hosts this is neither a cast nor a copy.
        arr = np.ascontiguousarray(self._as_tokens(tokens), dtype=self.dtype.newbyteorder("<"))
        self._bin.write(arr.data)
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document. A no-op when no sequence was added since the last one,
        so documents are never empty (empty documents would repeat a doc_idx entry)."""
        self._check_open()
        if len(self._sizes) > self._doc_idx[-1]:
            self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """Append a one-sequence document (what tools/preprocess_data.py writes)."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append a whole dataset, keeping its document boundaries (used to merge shards)."""
        self._check_open()
        if len(self._sizes) != self._doc_idx[-1]:
            raise DataError(f"{self.prefix}: call end_document() before add_index({other_prefix!r})")
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(
                f"{index_file_path(other_prefix)}: token dtype {other.dtype.name} differs from "
                f"{self.dtype.name} of {self.prefix}; datasets of different dtypes cannot be merged"
            )
        base = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes, dtype="<i4").tobytes())
        doc_idx = np.asarray(other.doc_idx[1:], dtype=np.int64) + base
        self._doc_idx.frombytes(doc_idx.astype("<i8").tobytes())
        other.close()
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    # -- finishing -----------------------------------------------------------------------

    def finalize(self) -> None:
        """Write the index and move both files to their final names.

        A document left open (add_item without end_document) is closed first.
        """
        self._check_open()
        self.end_document()
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4", copy=False).tobytes())
            f.write(pointers.astype("<i8", copy=False).tobytes())
            f.write(doc_idx.astype("<i8", copy=False).tobytes())
        # .bin first: whoever sees the final .idx can rely on the .bin beside it.
        commit(self._bin_tmp, data_file_path(self.prefix))
        commit(self._idx_tmp, index_file_path(self.prefix))
        self._finalized = True

    def close(self) -> None:
        """Discard everything unless finalize() ran."""
        if self._closed:
            return
        self._closed = True
        if not self._bin.closed:
            self._bin.close()
        if not self._finalized:
            for path in (self._bin_tmp, self._idx_tmp):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self._finalized:
                self.finalize()
        finally:
            self.close()

    def __del__(self):
        # Best effort for builders dropped without close(): never leave temp files behind.
        if hasattr(self, "_closed"):
            self.close()


class IndexedDataset:
    """Read-only, memory-mapped view of `prefix.bin` / `prefix.idx`.

    `sizes`, `pointers` and `doc_idx` are zero-copy views of the index; `get` returns a
    zero-copy view of the tokens. Opening validates the header and checks that `.bin` is
    exactly as long as the index says, so truncated or mismatched files fail here with the
    file named, not later as garbage tokens.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        self._idx_mm = self._map(idx_path, "index")
        buf = self._idx_mm
        found = len(buf)
        if found < len(MAGIC) or bytes(buf[: len(MAGIC)]) != MAGIC:
            head = bytes(buf[: len(MAGIC)])
            hint = ""
            if head.startswith(_LEGACY_MAGIC[:6]):
                hint = " (this is the old non-mmap 'TNTIDX' format; re-run tools/preprocess_data.py)"
            raise DataError(f"{idx_path}: not an MMIDIDX index: found magic {head!r}, expected {MAGIC!r}{hint}")
        if found < _HEADER.size:
            raise DataError(f"{idx_path}: truncated index: {found} bytes, the header alone needs {_HEADER.size}")
        _, version, code, n, m = _HEADER.unpack_from(buf, 0)
        if version != VERSION:
            raise DataError(f"{idx_path}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            if code in (6, 7):
                why = "a float code, which Megatron-LM and gpt-neox assign differently"
            else:
                why = "an unknown code"
            raise DataError(
                f"{idx_path}: dtype code {code} is {why}; expected one of {sorted(DTYPE_CODES)} "
                f"({', '.join(f'{c}={np.dtype(t).name}' for c, t in DTYPE_CODES.items())})"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 4 * n + 8 * n + 8 * m
        if found < expected:
            raise DataError(
                f"{idx_path}: truncated index: {found} bytes, expected {expected} for {n} sequences "
                f"and {m} doc_idx entries"
            )
        # Megatron's multimodal variant appends one int8 mode per sequence; tolerate it, nothing else.
        if found not in (expected, expected + n):
            raise DataError(f"{idx_path}: {found - expected} unexpected bytes after the index (expected {expected} bytes)")
        off = _HEADER.size
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=off)
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=m, offset=off + 12 * n)
        if m < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n:
            got = f"first {self.doc_idx[0]}, last {self.doc_idx[-1]}" if m else "no entries"
            raise DataError(f"{idx_path}: doc_idx must start at 0 and end at the sequence count {n}; found {got}")

        self._bin_mm = self._map(bin_path, "data")
        bin_size = len(self._bin_mm) if self._bin_mm is not None else 0
        want = self._check_entries(idx_path)
        if bin_size != want:
            raise DataError(
                f"{bin_path}: {bin_size} bytes, but {idx_path} (last pointer + size) describes {want}; "
                "the two files do not belong together or one is truncated"
            )
        self._doc_sizes = None

    def _check_entries(self, idx_path: str) -> int:
        """Every size non-negative, every pointer where the sizes before it put it (writers lay
        sequences out back to back), doc_idx non-decreasing: one vectorised pass over the index,
        so a corrupt entry is named here rather than failing in a rank later. Returns the byte
        size of .bin the index describes."""
        n, item = len(self.sizes), self.dtype.itemsize
        start = 0  # byte offset of the current chunk's first sequence
        for a in range(0, n, _CHECK_CHUNK):
            sizes = self.sizes[a:a + _CHECK_CHUNK]
            if sizes.min() < 0:
                i = a + int(np.argmax(sizes < 0))
                raise DataError(f"{idx_path}: sequence {i} has size {int(self.sizes[i])}, expected >= 0 "
                                "(a corrupt index; re-create it with tools/preprocess_data.py)")
            ends = np.cumsum(sizes, dtype=np.int64)  # where each sequence ends, in bytes from `start`
            ends *= item
            ends += start
            ptrs = self.pointers[a:a + _CHECK_CHUNK]
            if ptrs[0] != start or np.any(ptrs[1:] != ends[:-1]):
                j = 0 if ptrs[0] != start else 1 + int(np.argmax(ptrs[1:] != ends[:-1]))
                want = start if j == 0 else int(ends[j - 1])
                raise DataError(f"{idx_path}: sequence {a + j} has pointer {int(ptrs[j])}, expected {want} "
                                "(sequences are stored back to back in .bin); the index is corrupt, re-create it "
                                "with tools/preprocess_data.py")
            start = int(ends[-1])
        down = self.doc_idx[1:] < self.doc_idx[:-1]
        if down.any():
            j = int(np.argmax(down))
            raise DataError(f"{idx_path}: doc_idx[{j + 1}] = {int(self.doc_idx[j + 1])} is below doc_idx[{j}] = "
                            f"{int(self.doc_idx[j])}; expected non-decreasing sequence indices (a corrupt index)")
        return start

    @staticmethod
    def _map(path: str, what: str):
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""  # mmap refuses empty files; an empty buffer reads the same
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise DataError(f"{path}: {what} file not found (expected {what} of dataset prefix given without .bin/.idx)") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a directory, expected the {what} file of a dataset") from None

    # -- sequences -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i, as a read-only view of `.bin`."""
        size = int(self.sizes[i])
        return self._view(int(self.pointers[i]), size, offset, length, f"sequence {i}")

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def _view(self, ptr: int, size: int, offset: int, length, what: str) -> np.ndarray:
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: [{offset}, {offset + length}) is outside {what} of {size} tokens")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        return np.frombuffer(self._bin_mm, dtype=self.dtype.newbyteorder("<"), count=length,
                             offset=ptr + offset * self.dtype.itemsize)

    # -- documents -----------------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def document_sizes(self) -> np.ndarray:
        """Tokens per document (int32 when every document fits, else int64)."""
        if self._doc_sizes is None:
            if len(self.doc_idx) == len(self.sizes) + 1:
                # One sequence per document (our preprocessing): the index already has the answer.
                self._doc_sizes = self.sizes
            else:
                cum = np.zeros(len(self.sizes) + 1, dtype=np.int64)
                np.cumsum(self.sizes, out=cum[1:])
                ds = cum[self.doc_idx[1:]] - cum[self.doc_idx[:-1]]
                self._doc_sizes = ds.astype(np.int32) if ds.size == 0 or ds.max() < 2**31 else ds
        return self._doc_sizes

    def get_document(self, j: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of document j (its sequences are contiguous in `.bin`)."""
        first = int(self.doc_idx[j])
        return self._view(int(self.pointers[first]) if first < len(self.sizes) else 0,
                          int(self.document_sizes()[j]), offset, length, f"document {j}")

    def close(self) -> None:
        """Release the maps. Views handed out earlier keep them alive until they are dropped."""
        for name in ("sizes", "pointers", "doc_idx", "_doc_sizes"):
            setattr(self, name, None)
        self._idx_mm = self._bin_mm = None


_SCAN_TOKENS = 1 << 26  # tokens per step of a .bin scan


def _token_chunks(ds: "IndexedDataset"):
    total = int(ds.sizes.sum(dtype=np.int64)) if len(ds) else 0
    for a in range(0, total, _SCAN_TOKENS):
        yield a, np.frombuffer(ds._bin_mm, dtype=ds.dtype.newbyteorder("<"), count=min(_SCAN_TOKENS, total - a),
                               offset=a * ds.dtype.itemsize)


def token_id_range(ds: "IndexedDataset", cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in `.bin` ((0, -1) when empty). A scan of the whole file, so
    the answer is cached in `cache_dir` (when given), keyed by both files' paths, sizes and mtimes."""
    stats = [os.stat(data_file_path(ds.prefix)), os.stat(index_file_path(ds.prefix))]
    key = {"prefix": os.path.abspath(ds.prefix), "files": [[st.st_size, st.st_mtime_ns] for st in stats]}
    cache = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"{os.path.basename(ds.prefix)}_token_range_{digest}.json")
        try:
            with open(cache) as f:
                got = json.load(f)
            if got.get("key") == key:
                return int(got["min"]), int(got["max"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    lo, hi = 0, -1
    for i, (_, chunk) in enumerate(_token_chunks(ds)):
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo, hi = (cmin, cmax) if i == 0 else (min(lo, cmin), max(hi, cmax))
    if cache is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            write_json(cache, {"key": key, "min": lo, "max": hi})
        except OSError as e:  # a read-only cache only costs a rescan next time
            logger.warning("could not cache the token range of %s in %s: %s", ds.prefix, cache_dir, e)
    return lo, hi


def check_token_ids(ds: "IndexedDataset", vocab_size: int, cache_dir: str | None = None) -> None:
    """Every token id must be in [0, vocab_size): an id past the model's vocabulary would otherwise
    fail deep inside the embedding lookup. Names the first offending sequence and document."""
    lo, hi = token_id_range(ds, cache_dir)
    if hi < 0 or (lo >= 0 and hi < vocab_size):
        return
    for a, chunk in _token_chunks(ds):
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if bad.size:
            pos = a + int(bad[0])
            seq = int(np.searchsorted(ds.pointers // ds.dtype.itemsize, pos, side="right")) - 1
            doc = int(np.searchsorted(ds.doc_idx, seq, side="right")) - 1
            raise DataError(
                f"{data_file_path(ds.prefix)}: token id {int(chunk[bad[0]])} in sequence {seq} (document {doc}, "
                f"position {pos - int(ds.pointers[seq]) // ds.dtype.itemsize}) is outside the model's vocabulary "
                f"[0, {vocab_size}) (ids span [{lo}, {hi}]); the data was tokenized with another tokenizer, or "
                "model.vocab_size is too small")


def merge_datasets(prefixes: Sequence[str] | Iterable[str], out_prefix: str) -> None:
    """Concatenate datasets into `out_prefix`, keeping every document boundary."""
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise ConfigError("merge_datasets: no input prefixes given")
    if os.path.abspath(out_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ConfigError(f"merge_datasets: output prefix {out_prefix} is also an input")
    first = IndexedDataset(prefixes[0])
    dtype = first.dtype
    first.close()
    with IndexedDatasetBuilder(out_prefix, dtype) as builder:
        for p in prefixes:
            builder.add_index(p)
