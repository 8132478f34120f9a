"""Time building the GPT dataset indices (doc_idx, sample_idx, epoch starts) at Pile scale.

    python benchmarks/dataset_index.py                      # 200M documents, ~300B tokens, seq 2048
    python benchmarks/dataset_index.py --num-docs 2000000   # quick run

No .bin file is needed: document sizes are drawn as an array from a long-tailed (log-normal)
distribution scaled to the requested token total -- the Pile has ~210M documents and ~300B
GPT-NeoX tokens, with a median document of a few hundred tokens and books of millions.
The default sample count is GPT-NeoX-20B's run: 150,000 steps x 1538 sequences of 2048 tokens
(~472B tokens, i.e. ~1.6 epochs of this corpus).

Prints wall and CPU time and the peak RSS (resource.getrusage, whole process, including the
sizes array itself). The order is prefix-stable, so every sample of the epochs the request
reaches is indexed (here all of epoch 2, not just 1.6 epochs), and the serving order is computed
per position instead of stored. Target on our 2-core machine: within the figures of the
previous, request-sized build (22.3 s, 4.63 GiB).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from megatron_neox.data.gpt_dataset import SampleOrder, build_indices


def synthetic_doc_sizes(num_docs: int, total_tokens: float, seed: int = 0, sigma: float = 1.6) -> np.ndarray:
    """int32 document sizes, log-normal with shape `sigma`, rescaled so they sum to ~total_tokens."""
    rng = np.random.default_rng(seed)
    sizes = np.empty(num_docs, dtype=np.int32)
    mean = total_tokens / num_docs
    # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2): pick mu so the mean is `mean` tokens.
    mu = np.log(mean) - sigma**2 / 2
    chunk = 1 << 22  # a float64 temporary of the full size would cost 1.6 GB
    for a in range(0, num_docs, chunk):
        draw = rng.lognormal(mu, sigma, size=min(chunk, num_docs - a))
        np.clip(draw, 1, 2**31 - 1, out=draw)
        sizes[a:a + len(draw)] = draw
    return sizes


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads): comparable even on a busy shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-docs", type=int, default=200_000_000)
    ap.add_argument("--total-tokens", type=float, default=300e9)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--num-samples", type=int, default=150_000 * 1538)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    t0 = time.time()
    sizes = synthetic_doc_sizes(args.num_docs, args.total_tokens)
    tokens = int(sizes.sum(dtype=np.int64))
    t_gen = time.time() - t0
    print(f"documents        {args.num_docs:,}  tokens {tokens:,}  (mean {tokens / args.num_docs:.0f}, "
          f"median {int(np.median(sizes[:1_000_000]))}, max {int(sizes.max()):,})")
    print(f"samples          {args.num_samples:,} x {args.seq_length + 1} tokens  "
          f"({args.num_samples * args.seq_length / tokens:.2f} epochs)")
    print(f"generate sizes   {t_gen:6.1f} s   peak RSS {peak_rss_gib():.2f} GiB")

    t0, c0 = time.time(), cpu_seconds()
    doc_idx, sample_idx, starts = build_indices(sizes, (0, args.num_docs), args.num_samples,
                                                args.seq_length, args.seed)
    t_build, c_build = time.time() - t0, cpu_seconds() - c0
    for name, a in (("doc_idx", doc_idx), ("sample_idx", sample_idx)):
        print(f"  {name:12s} {str(a.shape):18s} {a.dtype}  {a.nbytes / 2**30:.2f} GiB")
    print(f"  epochs       {len(starts) - 1} (first samples {starts.tolist()})")
    print(f"build indices    {t_build:6.1f} s   (CPU {c_build:.1f} s over all threads)   "
          f"peak RSS {peak_rss_gib():.2f} GiB")
    order = SampleOrder(starts, args.seed)
    t0 = time.time()
    positions = range(0, args.num_samples, max(1, args.num_samples // 100_000))
    for i in positions:
        order[i]
    print(f"serving order    {(time.time() - t0) / len(positions) * 1e6:.1f} us per sample (per-position evaluation)")


if __name__ == "__main__":
    main()
