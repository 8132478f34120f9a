"""GPT-3-style packed samples over a range of documents, with cached indices.

The documents of the range are shuffled (one fresh order per epoch), concatenated into one token
stream, and cut into samples of `seq_length + 1` tokens. Sample j covers stream tokens
[j*seq_length, j*seq_length + seq_length]: consecutive samples share one token, because the
last token of a sample is only ever a label (GPT-3 / Megatron packing). Documents carry their
own EOD token (tools/preprocess_data.py --append-eod), so the stream is EOD-separated.

Prefix-stable order: the first k samples served never depend on how many are requested. Sample
j belongs to the epoch its first token lies in; the samples of epoch 0 are served first, in a
seeded permutation of that epoch, then those of epoch 1 in another, and so on. Asking for more
samples only adds epochs (or reaches further into one already built), so extending
`train.iters` on resume serves exactly the samples a longer run would have served, and two runs
of different lengths evaluate on the same validation samples. (Megatron also shuffles per
epoch, but its last, partial epoch is shuffled over the samples requested, so its order changes
with the request.)

Two indices describe the stream, as in Megatron; the serving order is arithmetic:
    doc_idx       document id at each position of the stream (epochs back to back)
    sample_idx    (position in doc_idx, token offset) where each sample starts; row j+1 also
                  gives where sample j ends (inclusive)
    epoch_starts  first sample of each epoch, S_e = ceil(e * tokens_per_epoch / seq_length)
    SampleOrder   served position -> sample, from the epoch's seeded permutation (no array)

They are built with numpy only (no compiled helper), for all the samples of the epochs the
request touches, and cached as .npy files named by a hash of everything that determines them
(the documents' sizes themselves, not the file's name or mtime), built once by global rank 0 and
memory-mapped by every rank.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import threading
import time
from typing import Optional

import numpy as np

from megatron_neox.data.indexed import IndexedDataset, index_file_path
from megatron_neox.durable import atomic_write, write_json
from megatron_neox.errors import ConfigError, DataError
from megatron_neox.ranks import rank0_first, rank_of

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays changes: old caches then miss instead of being misread.
INDEX_FORMAT_VERSION = 2  # 2: prefix-stable per-epoch order, key from the document sizes

# Below this size a permutation is a numpy Fisher-Yates shuffle. Above it we use a keyed
# arithmetic bijection: Fisher-Yates costs ~135 ns per element on our 2-core machines (a random
# swap across gigabytes of memory per element, 27 s for 200M documents), the bijection ~5 ns,
# and it is computed in cache-sized chunks without a second full-size buffer.
SMALL_PERMUTATION = 1 << 22

# Positions per vectorised step: enough to amortise numpy's per-call cost, while the step's
# temporaries (~10 MB per thread) stay small next to the indices in the peak memory.
_CHUNK = 1 << 18

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

    def at(self, i: int) -> int:
        """pi(i) for one position, in Python integers (the same arithmetic as `range`)."""
        if self._table is not None:
            return int(self._table[i])
        mask, s1, s2, c1, c2 = (int(v) for v in (self._mask, self._s1, self._s2, self._c1, self._c2))
        k0, k1, k2 = (int(k) for k in self._k)
        x = int(i)
        while True:
            x ^= k0
            x ^= x >> s1
            x = (x * c1) & mask
            x = (x + k1) & mask
            x ^= x >> s2
            x = (x * c2) & mask
            x ^= k2
            x ^= x >> s1
            if x < self.n:
                return x

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


def epoch_starts(tokens_per_epoch: int, seq_length: int, num_samples: int) -> np.ndarray:
    """S_0..S_E: the first sample of each epoch (sample j starts at token j*seq_length, which
    lies in epoch e iff S_e <= j < S_{e+1}), for the fewest epochs E with S_E >= num_samples."""
    T, L, N = int(tokens_per_epoch), int(seq_length), int(num_samples)
    epochs = max(1, -(-N * L // T))
    while epochs > 1 and -(-(epochs - 1) * T // L) >= N:
        epochs -= 1
    return np.array([-(-e * T // L) for e in range(epochs + 1)], dtype=np.int64)


class SampleOrder:
    """Served position -> sample: each epoch's samples in their own seeded permutation, epochs in
    order. Evaluated per position (the permutations are arithmetic), so no array of the order is
    stored and nothing about it depends on how many samples are requested."""

    def __init__(self, starts: np.ndarray, seed: int):
        self.starts = [int(v) for v in starts]
        self.seed = int(seed)
        self._perm: tuple[int, _Permutation] | None = None  # the current epoch's (samples are read in order)

    def __len__(self) -> int:
        return self.starts[-1]

    def _epoch(self, e: int) -> _Permutation:
        if self._perm is None or self._perm[0] != e:
            size = self.starts[e + 1] - self.starts[e]
            self._perm = (e, _Permutation(size, _rng(self.seed, _SAMPLE_STREAM, e)))
        return self._perm[1]

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"position {i} is outside the {len(self)} samples of {len(self.starts) - 1} epoch(s)")
        e = bisect.bisect_right(self.starts, i) - 1
        return self.starts[e] + self._epoch(e).at(i - self.starts[e])

    def range(self, start: int, stop: int) -> np.ndarray:
        """The samples served at positions [start, stop), as one array."""
        out = np.empty(max(0, stop - start), dtype=np.int64)
        for e in range(len(self.starts) - 1):
            a, b = max(start, self.starts[e]), min(stop, self.starts[e + 1])
            if a < b:
                self._epoch(e).range(a - self.starts[e], b - self.starts[e], out[a - start:b - start])
                out[a - start:b - start] += self.starts[e]
        return out


def _fill_stream(doc_sizes, start: int, n_docs: int, L: int, seed: int, doc_idx, sample_idx,
                 pos: int, pos_stop: int, base: int, filled: int, last_row: int) -> None:
    """Fill doc_idx[pos:pos_stop] with the epochs' document permutations and the sample_idx rows
    filled..last_row of the boundaries (tokens k*L) that fall in those documents. `base` is the
    stream offset of position `pos` and `filled` the number of boundaries below it. With
    pos_stop=None, stops once row last_row is written (the tail after the last whole epoch).

    Boundary k lies in the document at stream position p iff c_p <= k*L < c_{p+1} (c = exclusive
    cumsum of sizes along doc_idx). The number of boundaries below c_{p+1} is ceil(c_{p+1} / L),
    so each document's boundary count is a difference of ceilings and np.repeat lays out the
    positions: linear time, no search.
    """
    perm, perm_epoch = None, -1
    while (pos < pos_stop) if pos_stop is not None else (filled <= last_row):
        epoch, in_epoch = divmod(pos, n_docs)
        if epoch != perm_epoch:
            perm, perm_epoch = _Permutation(n_docs, _rng(seed, _DOC_STREAM, epoch)), epoch
        stop = pos + min(_CHUNK, n_docs - in_epoch)
        if pos_stop is not None:
            stop = min(stop, pos_stop)
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
        total = min(int(k_end[-1]) - filled, last_row + 1 - filled)
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


def build_indices(doc_sizes: np.ndarray, doc_range: tuple[int, int], num_samples: int, seq_length: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build (doc_idx, sample_idx, epoch_starts) for every sample of the epochs that
    `num_samples` samples reach (see `epoch_starts`); serve them with `SampleOrder`.

    doc_sizes: tokens per document for the whole dataset (only doc_range is used), so a sizes
    array is all this needs -- no .bin file (benchmarks/dataset_index.py relies on that).

    Each epoch is its own permutation of the documents in doc_range. The stream is built up to
    the end of the last sample of the last epoch (a few documents into the next epoch). Whole
    epochs are independent given their first stream offset (e * tokens_per_epoch) and first
    sample (S_e), so they are built in parallel threads (numpy releases the GIL in its loops).
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
        return (np.empty(0, _index_dtype(end)), np.zeros((1, 2), np.int32), np.zeros(1, np.int64))

    starts = epoch_starts(tokens_per_epoch, L, N)
    epochs, total = len(starts) - 1, int(starts[-1])
    # `total` samples need total*L + 1 tokens of stream (one shared token between neighbours, one at the end).
    stream_epochs = -(-(total * L + 1) // tokens_per_epoch)
    doc_idx = np.empty(stream_epochs * n_docs, dtype=_index_dtype(end))  # untouched tail pages cost nothing
    row_dtype = _index_dtype(max(len(doc_idx), int(doc_sizes[start:end].max(initial=0)) + 1))
    sample_idx = np.empty((total + 1, 2), dtype=row_dtype)

    def fill_epoch(e: int) -> None:
        _fill_stream(doc_sizes, start, n_docs, L, seed, doc_idx, sample_idx, e * n_docs, (e + 1) * n_docs,
                     e * tokens_per_epoch, int(starts[e]), int(starts[e + 1]) - 1)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(epochs, cpus, 8)
    threads = [_Thread(target=lambda w=w: [fill_epoch(e) for e in range(w, epochs, workers)]) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.result()
    # The end of the last sample (row `total`): the first documents of the epochs after.
    _fill_stream(doc_sizes, start, n_docs, L, seed, doc_idx, sample_idx, epochs * n_docs, None,
                 epochs * tokens_per_epoch, total, total)
    # Keep only the stream positions some sample touches.
    doc_idx = doc_idx[: int(sample_idx[total, 0]) + 1]
    return doc_idx, sample_idx, starts


# -- caching ---------------------------------------------------------------------------------

_ARRAYS = ("doc_idx", "sample_idx", "epoch_starts")


def _save_npy(path: str, array: np.ndarray) -> None:
    # A rank that finds the final name finds a complete file.
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


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
        sizes = indexed.document_sizes()[a:b]
        tokens = int(sizes.sum(dtype=np.int64))
        epochs = len(epoch_starts(tokens, self.seq_length, self.num_samples)) - 1 if self.num_samples else 0
        # The key is what the arrays are computed from: the documents' sizes (hashed, ~1 s per
        # GB of sizes; a rewritten .idx with the same size and mtime cannot pass for the old one,
        # and a moved or copied one still hits), the range, the length, the seed and the number
        # of epochs -- not num_samples, so a longer run within the same epochs reuses the cache.
        self.description = {
            "kind": "gpt_dataset",
            "format_version": INDEX_FORMAT_VERSION,
            "sizes_sha256": hashlib.sha256(np.ascontiguousarray(sizes).view(np.uint8)).hexdigest(),
            "sizes_dtype": str(sizes.dtype),
            "doc_range": list(self.doc_range),
            "seq_length": self.seq_length,
            "seed": self.seed,
            "epochs": epochs,
        }
        key = cache_key(self.description)
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.join(cache_dir, f"{name}_{key[:20]}")
        self.paths = {a: f"{stem}_{a}.npy" for a in _ARRAYS}
        self.description_path = f"{stem}.json"
        self.built_here = False

        rank0_first(self._build_unless_cached)
        self.doc_idx, self.sample_idx, starts = (
            np.load(self.paths[a], mmap_mode="r", allow_pickle=False) for a in _ARRAYS)
        self.order = SampleOrder(starts, self.seed)
        if (len(starts) != epochs + 1 or len(self.order) < self.num_samples
                or len(self.sample_idx) != len(self.order) + 1):
            raise DataError(f"{stem}_*.npy: cached index arrays do not match {self.description}; delete them to rebuild")

    def _build_unless_cached(self) -> None:
        rank = rank_of()
        if rank == 0:  # checks the arrays whole; the other ranks then find what it checked or built
            problem = self._cache_problem()
            if problem is None:
                return
            if problem != "missing":
                logger.warning("warning: %s: index cache %s; rebuilding it", self.name, problem)
        elif self._cached():
            return
        else:
            # The cache dir is not shared with rank 0 (node-local disk): the build is
            # deterministic, so building here gives the same arrays.
            logger.warning("%s: index cache %s not visible from rank %d; building locally", self.name,
                           self.description_path[:-len(".json")], rank)
        self._build()

    def _cached(self) -> bool:
        # The description is written last, so its presence means all three arrays are complete.
        return os.path.exists(self.description_path) and all(os.path.exists(p) for p in self.paths.values())

    def _cache_problem(self) -> Optional[str]:
        """None when the cached arrays match the sizes and SHA-256 recorded with them when they were
        built; "missing"; or what is wrong with them (a truncated or altered file would otherwise
        fail every run with numpy's IndexError until the user deleted it)."""
        if not self._cached():
            return "missing"
        try:
            with open(self.description_path) as f:
                recorded = json.load(f).get("arrays") or {}
        except (OSError, ValueError, AttributeError) as e:
            return f"{self.description_path} is unreadable ({e})"
        for a, path in self.paths.items():
            want = recorded.get(a)
            if not want:
                return f"{self.description_path} records no checksum for {path} (written by an older version)"
            size = os.path.getsize(path)
            if size != want["bytes"]:
                return f"{path} holds {size} bytes, {want['bytes']} were written (truncated or replaced)"
            if _sha256(path) != want["sha256"]:
                return f"{path} differs from the checksum recorded when it was built (altered or corrupt)"
        return None

    def _build(self) -> None:
        t0 = time.time()
        arrays = build_indices(self.indexed.document_sizes(), self.doc_range, self.num_samples,
                               self.seq_length, self.seed)
        for a, arr in zip(_ARRAYS, arrays):
            _save_npy(self.paths[a], arr)
        # The file name is for people reading the cache, not part of the key; the arrays' sizes and
        # hashes let a later run tell a truncated or altered file from a good one.
        checksums = {a: {"bytes": os.path.getsize(p), "sha256": _sha256(p)} for a, p in self.paths.items()}
        write_json(self.description_path, {**self.description, "arrays": checksums,
                                           "index_file": os.path.abspath(index_file_path(self.indexed.prefix))},
                   indent=1)
        self.built_here = True
        logger.info("%s: built indices for %d epoch(s), %d samples, in %.1f s", self.name,
                    self.description["epochs"], len(arrays[1]) - 1, time.time() - t0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"{self.name}: sample {i} out of range [0, {self.num_samples})")
        j = self.order[i]
        p0, o0 = (int(v) for v in self.sample_idx[j])
        p1, o1 = (int(v) for v in self.sample_idx[j + 1])
        doc = self.indexed.get_document
        if p0 == p1:
            return doc(int(self.doc_idx[p0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [doc(int(self.doc_idx[p0]), o0)]
        parts += [doc(int(d)) for d in self.doc_idx[p0 + 1:p1]]
        parts.append(doc(int(self.doc_idx[p1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64, copy=False)
