"""GPT-3-style packed samples over a range of documents, with cached indices.

The documents of the range are shuffled (one fresh order per epoch), concatenated into one token
stream, and cut into samples of `seq_length + 1` tokens. Sample i covers stream tokens
[i*seq_length, i*seq_length + seq_length]: consecutive samples share one token, because the
last token of a sample is only ever a label (GPT-3 / Megatron packing). Documents carry their
own EOD token (tools/preprocess_data.py --append-eod), so the stream is EOD-separated.

Three indices describe this, as in Megatron:
    doc_idx      document id at each position of the stream (epochs back to back)
    sample_idx   (position in doc_idx, token offset) where each sample starts; row i+1 also
                 gives where sample i ends (inclusive)
    shuffle_idx  the order in which samples are served

They are built with numpy only (no compiled helper) and cached as .npy files named by a hash of
everything that determines them, built once by global rank 0 and memory-mapped by every rank.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid

import numpy as np

from megatron_neox.data.indexed import IndexedDataset, index_file_path
from megatron_neox.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays changes: old caches then miss instead of being misread.
INDEX_FORMAT_VERSION = 1

# Below this size a permutation is a numpy Fisher-Yates shuffle. Above it we use a keyed
# arithmetic bijection: Fisher-Yates costs ~135 ns per element on our 2-core machines (a random
# swap across gigabytes of memory per element, 27 s for 200M documents), the bijection ~5 ns,
# and it is computed in cache-sized chunks without a second full-size buffer.
SMALL_PERMUTATION = 1 << 22

_CHUNK = 1 << 20  # positions per vectorised step: big enough to amortise numpy calls, fits in cache

# RNG streams (SeedSequence spawn keys) so that each array's randomness is independent.
_DOC_STREAM, _SAMPLE_STREAM = 0, 1


def _rng(seed: int, stream: int, epoch: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream, epoch)))


class _Permutation:
    """Pseudo-random permutation of [0, n), evaluated on ranges of positions.

    Small n: an explicit numpy permutation. Large n: a keyed bijection of the m-bit integers
    (m = bits of n-1) built from steps that are each invertible modulo 2**m -- xor with a key,
    x ^= x >> s, multiplication by an odd constant, addition of a key -- in the style of the
    splitmix64 finaliser. Values that land in [n, 2**m) are mapped again until they fall in
    [0, n) ("cycle walking"), which keeps the result a bijection of [0, n).
    """

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = int(n)
        if self.n <= SMALL_PERMUTATION:
            self._table = rng.permutation(self.n)
            return
        self._table = None
        m = (self.n - 1).bit_length()
        mask = (1 << m) - 1
        self._mask = np.uint64(mask)
        self._s1 = np.uint64((m + 1) // 2)
        self._s2 = np.uint64(max(1, m // 3))
        # splitmix64 multipliers, truncated to m bits and kept odd (odd <=> invertible mod 2**m).
        self._c1 = np.uint64((0xBF58476D1CE4E5B9 & mask) | 1)
        self._c2 = np.uint64((0x94D049BB133111EB & mask) | 1)
        self._k = [np.uint64(k) for k in rng.integers(0, mask, size=3, endpoint=True, dtype=np.uint64)]

    def _mix(self, x: np.ndarray, tmp: np.ndarray) -> None:
        k0, k1, k2 = self._k
        x ^= k0
        np.right_shift(x, self._s1, out=tmp)
        x ^= tmp
        x *= self._c1  # wraps mod 2**64; the mask then reduces mod 2**m
        x &= self._mask
        x += k1
        x &= self._mask
        np.right_shift(x, self._s2, out=tmp)
        x ^= tmp
        x *= self._c2
        x &= self._mask
        x ^= k2
        np.right_shift(x, self._s1, out=tmp)
        x ^= tmp

    def range(self, start: int, stop: int, out: np.ndarray) -> None:
        """out[j] = pi(start + j) for j in [0, stop - start)."""
        if self._table is not None:
            out[:] = self._table[start:stop]
            return
        x = np.arange(start, stop, dtype=np.uint64)
        self._mix(x, np.empty_like(x))
        todo = np.flatnonzero(x >= self.n)
        while todo.size:
            y = x[todo]
            self._mix(y, np.empty_like(y))
            x[todo] = y
            todo = todo[y >= self.n]
        out[:] = x


def _fill_permutation(out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    perm = _Permutation(len(out), rng)
    for a in range(0, len(out), _CHUNK):
        perm.range(a, min(a + _CHUNK, len(out)), out[a:a + _CHUNK])
    return out


class _Thread(threading.Thread):
    """A thread whose target's return value (or exception) is handed back by result()."""

    def run(self):
        try:
            self._value, self._error = self._target(*self._args), None
        except BaseException as e:  # re-raised in the caller's thread
            self._value, self._error = None, e

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _index_dtype(limit: int):
    return np.int32 if limit < 2**31 else np.int64


def build_indices(doc_sizes: np.ndarray, doc_range: tuple[int, int], num_samples: int, seq_length: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build (doc_idx, sample_idx, shuffle_idx) for `num_samples` samples.

    doc_sizes: tokens per document for the whole dataset (only doc_range is used), so a sizes
    array is all this needs -- no .bin file (benchmarks/dataset_index.py relies on that).

    Epochs: as many as num_samples needs; each is its own permutation of the documents in
    doc_range, and the last one is cut right after the document holding the final token, so
    no index is built for documents that are never read.
    """
    start, end = int(doc_range[0]), int(doc_range[1])
    n_docs = end - start
    L = int(seq_length)
    N = int(num_samples)
    if L < 1:
        raise ConfigError(f"seq_length must be >= 1, got {seq_length}")
    if N < 0:
        raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
    if not 0 <= start <= end <= len(doc_sizes):
        raise ConfigError(f"document range [{start}, {end}) is outside the dataset's {len(doc_sizes)} documents")
    tokens_per_epoch = int(np.sum(doc_sizes[start:end], dtype=np.int64))
    if N and tokens_per_epoch == 0:
        raise DataError(f"document range [{start}, {end}) holds no tokens; cannot cut {N} samples from it")

    if N == 0:
        return (np.empty(0, _index_dtype(end)), np.zeros((1, 2), np.int32), np.empty(0, np.int32))

    # N samples need N*L + 1 tokens of stream (one shared token between neighbours, one at the end).
    epochs = -(-(N * L + 1) // tokens_per_epoch)
    doc_idx = np.empty(epochs * n_docs, dtype=_index_dtype(end))  # untouched tail pages cost nothing
    row_dtype = _index_dtype(max(len(doc_idx), int(doc_sizes[start:end].max(initial=0)) + 1))
    sample_idx = np.empty((N + 1, 2), dtype=row_dtype)

    # The sample order does not depend on the documents: build it on the second core meanwhile
    # (numpy releases the GIL inside its loops).
    shuffle_idx = np.empty(N, dtype=_index_dtype(N + 1))
    shuffler = _Thread(target=_fill_permutation, args=(shuffle_idx, _rng(seed, _SAMPLE_STREAM)))
    shuffler.start()

    # Stream token i*L (the start of boundary i) lies in the document at stream position p iff
    # c_p <= i*L < c_{p+1} (c = exclusive cumsum of sizes along doc_idx). The number of
    # boundaries below c_{p+1} is ceil(c_{p+1} / L), so each document's boundary count is a
    # difference of ceilings and np.repeat lays out the positions: linear time, no search.
    filled = 0           # boundaries written so far
    base = 0             # stream tokens before the current chunk
    pos = 0              # next stream position to fill in doc_idx
    perm = None
    while filled <= N:
        epoch, in_epoch = divmod(pos, n_docs)
        if in_epoch == 0:
            perm = _Permutation(n_docs, _rng(seed, _DOC_STREAM, epoch))
        stop = pos + min(_CHUNK, n_docs - in_epoch)
        ids = doc_idx[pos:stop]
        perm.range(in_epoch, in_epoch + (stop - pos), ids)
        if start:
            ids += start
        sizes = np.take(doc_sizes, ids)
        ends = np.cumsum(sizes, dtype=np.int64)
        ends += base
        next_base = int(ends[-1])
        k_end = ends + (L - 1)
        k_end //= L                      # boundaries strictly below each document's end
        counts = np.diff(k_end, prepend=filled)
        total = min(int(k_end[-1]) - filled, N + 1 - filled)
        if total > 0:
            rel = np.repeat(np.arange(stop - pos, dtype=np.int64), counts)[:total]
            rows = sample_idx[filled:filled + total]
            rows[:, 0] = rel + pos
            ends -= sizes                    # now: stream offset where each document starts
            token = np.arange(filled, filled + total, dtype=np.int64)
            token *= L
            token -= ends[rel]
            rows[:, 1] = token
            filled += total
        base = next_base
        pos = stop

    # Keep only the stream positions some sample touches.
    doc_idx = doc_idx[: int(sample_idx[N, 0]) + 1]

    shuffler.join()
    return doc_idx, sample_idx, shuffler.result()


# -- caching ---------------------------------------------------------------------------------

_ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def _dist():
    """torch.distributed when it is initialised; None otherwise (no torch import just for this)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _save_npy(path: str, array: np.ndarray) -> None:
    # Temporary name + rename: a rank that finds the final name finds a complete file.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class GPTDataset:
    """Samples of `seq_length + 1` tokens (np.int64) packed from documents [doc_range)."""

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, cache_dir: str, name: str):
        self.indexed = indexed
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name
        # Checked on every rank before any waits for rank 0, so bad arguments fail everywhere
        # instead of leaving the other ranks at the barrier.
        a, b = self.doc_range
        if not 0 <= a <= b <= indexed.num_documents:
            raise ConfigError(f"{name}: document range [{a}, {b}) is outside {indexed.prefix} "
                              f"({indexed.num_documents} documents)")
        if self.seq_length < 1 or self.num_samples < 0:
            raise ConfigError(f"{name}: need seq_length >= 1 and num_samples >= 0, got {seq_length} and {num_samples}")
        if self.num_samples and not np.any(indexed.document_sizes()[a:b]):
            raise DataError(f"{index_file_path(indexed.prefix)}: documents [{a}, {b}) hold no tokens; "
                            f"cannot cut {self.num_samples} samples ({name})")
        idx_path = os.path.abspath(index_file_path(indexed.prefix))
        st = os.stat(idx_path)
        # Path + size + mtime identify the index without reading it (a content hash would make
        # every rank read the whole .idx at start-up). Replacing the dataset changes the mtime,
        # so a stale cache is never used; moving it only costs a rebuild.
        self.description = {
            "kind": "gpt_dataset",
            "format_version": INDEX_FORMAT_VERSION,
            "index_file": idx_path,
            "index_size": st.st_size,
            "index_mtime_ns": st.st_mtime_ns,
            "doc_range": list(self.doc_range),
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }
        key = cache_key(self.description)
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.join(cache_dir, f"{name}_{key[:20]}")
        self.paths = {a: f"{stem}_{a}.npy" for a in _ARRAYS}
        self.description_path = f"{stem}.json"
        self.built_here = False

        dist = _dist()
        rank = dist.get_rank() if dist else 0
        failure = None
        if rank == 0 and not self._cached():
            try:
                self._build()
            except BaseException as e:  # still reach the barrier, so no rank is left waiting
                failure = e
        if dist:
            dist.barrier()
        if failure is not None:
            raise failure
        if not self._cached():
            # The cache dir is not shared with rank 0 (node-local disk): the build is
            # deterministic, so building here gives the same arrays.
            logger.warning("%s: index cache %s not visible from rank %d; building locally", name, stem, rank)
            self._build()
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            np.load(self.paths[a], mmap_mode="r", allow_pickle=False) for a in _ARRAYS)
        if len(self.shuffle_idx) != self.num_samples or len(self.sample_idx) != self.num_samples + 1:
            raise DataError(f"{stem}_*.npy: cached index arrays do not match {self.description}; delete them to rebuild")

    def _cached(self) -> bool:
        # The description is written last, so its presence means all three arrays are complete.
        return os.path.exists(self.description_path) and all(os.path.exists(p) for p in self.paths.values())

    def _build(self) -> None:
        t0 = time.time()
        arrays = build_indices(self.indexed.document_sizes(), self.doc_range, self.num_samples,
                               self.seq_length, self.seed)
        for a, arr in zip(_ARRAYS, arrays):
            _save_npy(self.paths[a], arr)
        tmp = f"{self.description_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.description, f, indent=1)
        os.replace(tmp, self.description_path)
        self.built_here = True
        logger.info("%s: built indices for %d samples in %.1f s", self.name, self.num_samples, time.time() - t0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"{self.name}: sample {i} out of range [0, {self.num_samples})")
        j = int(self.shuffle_idx[i])
        p0, o0 = (int(v) for v in self.sample_idx[j])
        p1, o1 = (int(v) for v in self.sample_idx[j + 1])
        doc = self.indexed.get_document
        if p0 == p1:
            return doc(int(self.doc_idx[p0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [doc(int(self.doc_idx[p0]), o0)]
        parts += [doc(int(d)) for d in self.doc_idx[p0 + 1:p1]]
        parts.append(doc(int(self.doc_idx[p1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64, copy=False)
