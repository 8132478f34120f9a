#!/usr/bin/env python
"""Write the embedded sample corpus (stdlib Python as `Github` + synthetic `BioS` biographies).

    python tools/make_sample_corpus.py --out data/sample [--size-mb 8] [--seed 1234]

Outputs DIR/sample.jsonl.zst (Pile format) and DIR/bios_facts.jsonl. No download.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.data.corpus import MB, make_sample_corpus  # noqa: E402
from megatron_neox.cli import finite_float  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--size-mb", type=finite_float, default=8.0, help="cap on the total text, in MB (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed for sampling, names and templates")
    p.add_argument("--github-fraction", type=finite_float, default=0.5,
                   help="share of the text taken from stdlib sources (default 0.5; bios fill the rest)")
    p.add_argument("--bios-per-person", type=int, default=5, help="bios written per person (default 5)")
    args = p.parse_args(argv)
    try:
        t0 = time.time()
        s = make_sample_corpus(args.out, size_mb=args.size_mb, seed=args.seed,
                               github_fraction=args.github_fraction, bios_per_person=args.bios_per_person)
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {s.corpus_path} ({s.corpus_path.stat().st_size / MB:.2f} MB compressed, "
          f"{s.total_bytes / MB:.2f} MB of text) in {time.time() - t0:.1f}s")
    for name, c in s.components.items():
        print(f"  {name:<8} {c.docs:>8} docs  {c.bytes / MB:8.2f} MB")
    print(f"wrote {s.facts_path} ({s.people} people)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
