"""Preprocessing throughput: tools/preprocess_data.py vs the common multiprocessing baseline.

    python benchmarks/preprocess.py [--size-mb 64] [--vocab-size 32768] [--workers 2] [--repeat 3]

Both sides run as child processes of this script (interpreter start included, as a user sees
it) on the same sample corpus and tokenizer, and write the same MMIDIDX format:

  ours      tools/preprocess_data.py --workers N --append-eod
  baseline  what Megatron-LM's / gpt-neox's preprocess_data.py do: multiprocessing.Pool(N),
            `pool.imap(encode, lines, chunksize=32)` with ONE document per task, HF
            `Tokenizer.encode` per document, each document written as it comes back.

Prints tokens/s both ways and the ratio (best of --repeat, runs interleaved so machine load hits
both alike), then checks that every document's ids are identical (the baseline *is* HF
tokenizers, so this is the "identical to HF for every document" check).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- the baseline (runs in a child process: `benchmarks/preprocess.py --baseline ...`) ----------

_TOK = None


def _baseline_init(tokenizer_path: str) -> None:
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(tokenizer_path)
    _TOK.encode_special_tokens = True  # same semantics as ours: special-token text stays text


def _baseline_encode(line: bytes):
    text = json.loads(line)["text"]
    return _TOK.encode(text, add_special_tokens=False).ids


def run_baseline(input_path: str, tokenizer_path: str, prefix: str, workers: int) -> None:
    import zstandard
    from tokenizers import Tokenizer

    from megatron_neox.data.indexed import IndexedDatasetBuilder, best_dtype

    tok = Tokenizer.from_file(tokenizer_path)
    eod = tok.token_to_id("<|endoftext|>")
    dtype = best_dtype(tok.get_vocab_size(with_added_tokens=True))
    with open(input_path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zf, \
            Pool(workers, initializer=_baseline_init, initargs=(tokenizer_path,)) as pool, \
            IndexedDatasetBuilder(prefix, dtype) as builder:
        for ids in pool.imap(_baseline_encode, io.BufferedReader(zf), 32):
            if ids:
                builder.add_document(ids + [eod])


# -- the driver --------------------------------------------------------------------------------


def prepare(cache: Path, size_mb: float, vocab_size: int, seed: int) -> tuple[Path, Path]:
    from megatron_neox.data.corpus import make_sample_corpus
    from megatron_neox.data.readers import iter_documents
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    corpus_dir = cache / f"corpus_{size_mb:g}mb_seed{seed}"
    corpus = corpus_dir / "sample.jsonl.zst"
    if not corpus.exists():
        print(f"making a {size_mb:g} MB sample corpus in {corpus_dir} ...", flush=True)
        make_sample_corpus(corpus_dir, size_mb=size_mb, seed=seed)
    tokenizer = corpus_dir / f"tokenizer_{vocab_size}.json"
    if not tokenizer.exists():
        print(f"training a {vocab_size}-token BPE on it ...", flush=True)
        hf, _ = train_bpe(iter_documents([str(corpus)]), vocab_size)
        save_tokenizer(hf, tokenizer)
    return corpus, tokenizer


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole child tree). CPU time barely moves with machine
    load, so it backs up wall-clock figures taken on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(ours: str, base: str) -> str:
    """"" when both datasets hold the same documents with the same ids, else the first difference."""
    import numpy as np

    from megatron_neox.data.indexed import IndexedDataset

    a, b = IndexedDataset(ours), IndexedDataset(base)
    if a.num_documents != b.num_documents:
        return f"{a.num_documents} documents vs {b.num_documents}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    for j in range(a.num_documents):
        if not np.array_equal(a.get_document(j), b.get_document(j)):
            return f"document {j} differs"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=64.0, help="sample corpus size (default 64 MB)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench_preprocess"))
    p.add_argument("--baseline", nargs=3, metavar=("INPUT", "TOKENIZER", "PREFIX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline:
        run_baseline(*args.baseline, workers=args.workers)
        return 0

    from megatron_neox.data.indexed import IndexedDataset

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = prepare(cache, args.size_mb, args.vocab_size, args.seed)
    ours_prefix, base_prefix = str(cache / "ours"), str(cache / "baseline")
    ours_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus),
                "--tokenizer", str(tokenizer), "--output-prefix", ours_prefix, "--append-eod",
                "--workers", str(args.workers), "--no-progress"]
    base_cmd = [sys.executable, __file__, "--workers", str(args.workers),
                "--baseline", str(corpus), str(tokenizer), base_prefix + "_text_document"]

    print(f"input {corpus} ({corpus.stat().st_size / 1e6:.1f} MB zst), tokenizer {tokenizer.name}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    ours_t, base_t = [], []  # (wall, cpu) per run
    for r in range(args.repeat):
        base_t.append(timed(base_cmd))
        ours_t.append(timed(ours_cmd))
        print(f"  run {r + 1}: baseline {base_t[-1][0]:.2f} s ({base_t[-1][1]:.1f} CPU s), "
              f"ours {ours_t[-1][0]:.2f} s ({ours_t[-1][1]:.1f} CPU s)", flush=True)

    tokens = int(IndexedDataset(ours_prefix + "_text_document").sizes.sum())
    best_ours, best_base = tokens / min(w for w, _ in ours_t), tokens / min(w for w, _ in base_t)
    cpu_ours, cpu_base = tokens / min(c for _, c in ours_t), tokens / min(c for _, c in base_t)
    print(f"tokens: {tokens:,}")
    print(f"baseline (Pool({args.workers}), 1 doc/task, HF encode): {best_base:,.0f} tokens/s "
          f"({cpu_base:,.0f} per CPU-second)")
    print(f"ours (tools/preprocess_data.py --workers {args.workers}):   {best_ours:,.0f} tokens/s "
          f"({cpu_ours:,.0f} per CPU-second)")
    print(f"ratio: {best_ours / best_base:.2f}x wall-clock, {cpu_ours / cpu_base:.2f}x per CPU-second "
          f"(load average now {os.getloadavg()[0]:.1f})")
    diff = compare(ours_prefix + "_text_document", base_prefix + "_text_document")
    print("token ids identical to HF tokenizers for every document" if not diff else f"MISMATCH: {diff}")
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())
