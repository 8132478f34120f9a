#!/usr/bin/env python
"""Tokenize jsonl / jsonl.zst / txt documents into Megatron MMIDIDX datasets.

    python tools/preprocess_data.py --input pile/00.jsonl.zst --tokenizer 20B_tokenizer.json \\
        --output-prefix data/pile_00 --append-eod --workers 32

writes data/pile_00_text_document.{bin,idx}. With --split-by-meta pile_set_name, one dataset per
Pile component: data/pile_00_{component}_text_document.{bin,idx}.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.data.preprocess import PreprocessOptions, format_summary, preprocess  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="input files or glob patterns (.jsonl, .jsonl.zst, .txt = one document per file)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizers tokenizer.json")
    p.add_argument("--output-prefix", required=True, help="output path prefix (its directory must exist)")
    p.add_argument("--jsonl-keys", "--json-keys", nargs="+", default=["text"], dest="keys",
                   help="JSON fields to tokenize, one dataset each (default: text)")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document: <|endoftext|>, else the family's "
                        "own <|end_of_text|> (Llama-3) or </s> (Llama-2, Mistral)")
    p.add_argument("--no-bos", dest="bos", action="store_false",
                   help="do not start documents with the BOS the tokenizer's own template adds (<s>, "
                        "<|begin_of_text|>; tokenizers without one get none either way)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--workers", type=int, default=cpus,
                   help="encoding processes (default: the CPUs available; 0 = in this process)")
    p.add_argument("--domain-tokens", action="store_true",
                   help="prepend <|domain:NAME|> (NAME = meta.pile_set_name) to every document")
    p.add_argument("--split-by-meta", metavar="FIELD", choices=["pile_set_name"],
                   help="write one dataset per value of meta.FIELD (only pile_set_name)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted, first few listed) instead of stopping")
    p.add_argument("--encoder", choices=["auto", "tiktoken", "hf"], default="auto",
                   help="auto: tiktoken's engine when it provably gives HF's ids, else HF (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = PreprocessOptions(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, keys=args.keys,
        append_eod=args.append_eod, workers=args.workers, domain_tokens=args.domain_tokens,
        split_by_meta=args.split_by_meta, skip_bad_lines=args.skip_bad_lines, encoder=args.encoder, bos=args.bos,
        progress=not args.no_progress,
    )
    try:
        summary = preprocess(opts)
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
