"""Preprocessing throughput: tools/preprocess_data.py against gpt-neox's own script.

    python benchmarks/preprocess.py --tokenizer gpt-neox-20b.json --gpt-neox ~/src/gpt-neox \\
        [--size-mb 16] [--workers 2] [--repeat 3]
    python benchmarks/preprocess.py            # no gpt-neox checkout: a BPE trained here, pool baseline

Both sides run as child processes of this script (interpreter start included, as a user sees
it) on the same sample corpus (jsonl.zst) and tokenizer, with --append-eod and N workers:

  ours       tools/preprocess_data.py --workers N
  gpt-neox   with --gpt-neox DIR: DIR/tools/datasets/preprocess_data.py --tokenizer-type
             HFTokenizer --workers N (HF `Tokenizer.encode` per document in a multiprocessing
             Pool, lm_dataformat reader). Its imports need lm_dataformat, ftfy and
             sentencepiece, and its megatron/__init__.py imports NeoXArgs (pkg_resources,
             DeeperSpeed), which this script does not use: --gpt-neox-pythonpath adds a directory
             holding the first three, and a checkout whose __init__ drops that one import works.
  pool       without --gpt-neox: the same design in a few lines (Pool(N), `imap(encode, lines,
             chunksize=32)`, one document per task, HF `Tokenizer.encode`).

The machine is shared and noisy, so runs are paired (baseline then ours, back to back) and the
figures are medians: of tokens/s each way and of the per-pair ratio. CPU time (the whole child
tree) barely moves with load, so tokens per CPU-second are printed too, next to the tokenizer
engine's own single-thread limit on the same documents (our encoder's `encode_batch` in this
process, no reading, parsing, IPC or writing): how close the pipeline gets to the engine.

Last, every document's ids are compared between the two outputs (the baseline *is* HF
`Tokenizer.encode`; gpt-neox's parses special-token text, ours keeps it as text, so a document
that spells "<|endoftext|>" differs there by design -- the sample corpus has none).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- the pool baseline (runs in a child process: `benchmarks/preprocess.py --baseline ...`) -----

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


def prepare(cache: Path, size_mb: float, vocab_size: int, seed: int, tokenizer: str | None) -> tuple[Path, Path]:
    from megatron_neox.data.corpus import make_sample_corpus
    from megatron_neox.data.readers import iter_documents
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    corpus_dir = cache / f"corpus_{size_mb:g}mb_seed{seed}"
    corpus = corpus_dir / "sample.jsonl.zst"
    if not corpus.exists():
        print(f"making a {size_mb:g} MB sample corpus in {corpus_dir} ...", flush=True)
        make_sample_corpus(corpus_dir, size_mb=size_mb, seed=seed)
    if tokenizer:
        return corpus, Path(tokenizer)
    trained = corpus_dir / f"tokenizer_{vocab_size}.json"
    if not trained.exists():
        print(f"training a {vocab_size}-token BPE on it ...", flush=True)
        hf, _ = train_bpe(iter_documents([str(corpus)]), vocab_size)
        save_tokenizer(hf, trained)
    return corpus, trained


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole child tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def engine_limit(corpus: Path, tokenizer: Path) -> tuple[int, float, str]:
    """(tokens, CPU seconds, encoder) of our encoder alone on every document, one thread."""
    from megatron_neox.data.readers import iter_documents
    from megatron_neox.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    texts = [t for t, _ in iter_documents([str(corpus)])]
    t0 = time.process_time()
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens, time.process_time() - t0, tok.describe_encoder()


def compare(ours: str, base: str) -> str:
    """"" when both datasets hold the same documents with the same ids, else the first difference."""
    import numpy as np

    from megatron_neox.data.indexed import IndexedDataset

    a, b = IndexedDataset(ours), IndexedDataset(base)
    if a.num_documents != b.num_documents:
        return f"{a.num_documents} documents vs {b.num_documents}"
    for j in range(a.num_documents):
        if not np.array_equal(a.get_document(j), b.get_document(j).astype(a.dtype)):
            return f"document {j} differs"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=16.0, help="sample corpus size (default 16 MB)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: train a --vocab-size BPE on the corpus)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--gpt-neox", metavar="DIR", help="a gpt-neox checkout: compare with its preprocess_data.py")
    p.add_argument("--gpt-neox-pythonpath", metavar="DIR", default="",
                   help="extra PYTHONPATH for gpt-neox's script (lm_dataformat, ftfy, sentencepiece)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="paired runs; medians are reported")
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
    corpus, tokenizer = prepare(cache, args.size_mb, args.vocab_size, args.seed, args.tokenizer)
    ours_prefix, base_prefix = str(cache / "ours"), str(cache / "baseline")
    ours_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus),
                "--tokenizer", str(tokenizer), "--output-prefix", ours_prefix, "--append-eod",
                "--workers", str(args.workers), "--no-progress"]
    base_env = None
    if args.gpt_neox:
        name = f"gpt-neox preprocess_data.py (HFTokenizer, --workers {args.workers})"
        base_cmd = [sys.executable, str(Path(args.gpt_neox) / "tools" / "datasets" / "preprocess_data.py"),
                    "--input", str(corpus), "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tokenizer),
                    "--output-prefix", base_prefix, "--append-eod", "--workers", str(args.workers)]
        base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            x for x in (args.gpt_neox_pythonpath, args.gpt_neox) if x)}
    else:
        name = f"pool baseline (Pool({args.workers}), 1 doc/task, HF encode)"
        base_cmd = [sys.executable, __file__, "--workers", str(args.workers),
                    "--baseline", str(corpus), str(tokenizer), base_prefix + "_text_document"]

    print(f"input {corpus} ({corpus.stat().st_size / 1e6:.1f} MB zst), tokenizer {tokenizer}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    ours_t, base_t = [], []  # (wall, cpu) per run
    for r in range(args.repeat):
        base_t.append(timed(base_cmd, base_env))
        ours_t.append(timed(ours_cmd))
        print(f"  pair {r + 1}: baseline {base_t[-1][0]:.2f} s ({base_t[-1][1]:.1f} CPU s), ours {ours_t[-1][0]:.2f} s "
              f"({ours_t[-1][1]:.1f} CPU s): {base_t[-1][0] / ours_t[-1][0]:.2f}x "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)

    tokens = int(IndexedDataset(ours_prefix + "_text_document").sizes.sum())
    med = statistics.median
    ours_wall, base_wall = med(w for w, _ in ours_t), med(w for w, _ in base_t)
    ours_cpu, base_cpu = med(c for _, c in ours_t), med(c for _, c in base_t)
    engine_tokens, engine_cpu, encoder = engine_limit(corpus, tokenizer)
    print(f"tokens: {tokens:,}; our encoder: {encoder}")
    print(f"{name}: {tokens / base_wall:,.0f} tokens/s, {tokens / base_cpu:,.0f} per CPU-second (medians)")
    print(f"ours (tools/preprocess_data.py --workers {args.workers}): {tokens / ours_wall:,.0f} tokens/s, "
          f"{tokens / ours_cpu:,.0f} per CPU-second (medians)")
    print(f"ratio: {med(b / o for (b, _), (o, _) in zip(base_t, ours_t)):.2f}x wall-clock (median of "
          f"{args.repeat} pairs), {base_cpu / ours_cpu:.2f}x per CPU-second")
    print(f"engine limit (our encoder alone, 1 thread, same documents): {engine_tokens / engine_cpu:,.0f} tokens "
          f"per CPU-second; the pipeline reaches {tokens / ours_cpu / (engine_tokens / engine_cpu):.0%} of it")
    diff = compare(ours_prefix + "_text_document", base_prefix + "_text_document")
    print("token ids identical to the baseline (HF Tokenizer.encode) for every document" if not diff
          else f"MISMATCH: {diff}")
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())
