#!/usr/bin/env python
"""Concatenate MMIDIDX datasets (.bin/.idx pairs) into one, keeping every document boundary.

    python tools/merge_datasets.py --inputs data/pile_00_text_document data/pile_01_text_document \\
        --output-prefix data/pile_text_document

Prefixes are given without .bin/.idx. All inputs must share one token dtype. The output is
written under temporary names and only appears once complete.
Exit status: 0 merged, 2 bad input (missing or corrupt file, dtype mismatch, bad arguments).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.data.indexed import IndexedDataset, merge_datasets  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes to concatenate, in order")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    args = p.parse_args(argv)
    try:
        t0 = time.time()
        merge_datasets(args.inputs, args.output_prefix)
        out = IndexedDataset(args.output_prefix)
        tokens = int(out.sizes.sum(dtype="int64"))
        print(f"wrote {args.output_prefix}.bin/.idx: {out.num_documents} documents, {len(out)} sequences, "
              f"{tokens} tokens ({out.dtype.name}) from {len(args.inputs)} inputs in {time.time() - t0:.1f}s")
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
