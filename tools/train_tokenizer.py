#!/usr/bin/env python
"""Train a GPT-NeoX-style byte-level BPE tokenizer (HF tokenizers) on jsonl / jsonl.zst / txt.

    python tools/train_tokenizer.py --input data/sample/sample.jsonl.zst --vocab-size 8192 \\
        --out data/tokenizer.json [--domain-tokens]

<|endoftext|> is id 0 and <|padding|> id 1. --domain-tokens adds one special <|domain:NAME|> per
meta.pile_set_name seen, after the BPE vocabulary.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.data.readers import iter_documents  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402
from megatron_neox.outputs import check_writable_dir  # noqa: E402
from megatron_neox.tokenizer import domain_token, load_tokenizer, save_tokenizer, train_bpe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input files or glob patterns")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="BPE vocabulary size, <|endoftext|> and <|padding|> included (domain tokens come on top)")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--domain-tokens", action="store_true", help="reserve <|domain:NAME|> per meta.pile_set_name")
    p.add_argument("--jsonl-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of stopping")
    args = p.parse_args(argv)
    try:
        check_writable_dir(Path(args.out).resolve().parent, f"--out {args.out}: parent directory")  # before training
        t0 = time.time()
        bad: list[str] = []
        docs = iter_documents(args.input, key=args.jsonl_key, skip_bad_lines=args.skip_bad_lines, bad_lines=bad)
        hf, domains = train_bpe(docs, args.vocab_size, domain_tokens=args.domain_tokens,
                                min_frequency=args.min_frequency, show_progress=sys.stderr.isatty())
        save_tokenizer(hf, args.out)
        tok = load_tokenizer(args.out)  # proves the file loads, and reports which encoder applies
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: vocab {tok.vocab_size} (BPE {hf.get_vocab_size(with_added_tokens=False)}) "
          f"in {time.time() - t0:.1f} s; eod id {tok.eod_id}, pad id {tok.pad_id}")
    bpe_size = hf.get_vocab_size(with_added_tokens=False)
    if bpe_size < args.vocab_size:
        print(f"note: the input has pairs for only {bpe_size} BPE ids, smaller than the requested {args.vocab_size}")
    if domains:
        print("domain tokens: " + ", ".join(f"{domain_token(d)}={tok.token_to_id(domain_token(d))}" for d in domains))
    if bad:
        print(f"skipped {len(bad)} bad lines; first: {bad[0]}")
    print(f"encoder: {tok.describe_encoder()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
