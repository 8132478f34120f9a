#!/usr/bin/env python
"""Prepare a checkpoint for resuming at another layout (pp, tp or dp).

    python tools/reshard.py --checkpoint runs/20B/checkpoints --out runs/20B/universal
    deepspeed launch/train.py --config 20B.json --set parallel.pp=8 checkpoint.load=runs/20B/universal

Runs DeepSpeed's `ds_to_universal` on the newest complete checkpoint (or --tag) and writes DIR2
with `latest`/`latest_universal` and our completion marker. A run that loads DIR2 detects that it
is universal and lets DeepSpeed re-split the weights and optimizer states for its own layout.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (with `latest`)")
    parser.add_argument("--out", required=True, help="output directory for the universal checkpoint")
    parser.add_argument("--tag", default=None, help="global_stepN to convert (default: the newest complete one)")
    parser.add_argument("--workers", type=int, default=2, help="extraction/merge worker processes")
    args = parser.parse_args(argv)

    from megatron_neox.convert.universal import to_universal
    from megatron_neox.errors import MegatronNeoxError, error_message

    try:
        out = to_universal(args.checkpoint, args.out, tag=args.tag, workers=args.workers)
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote universal checkpoint {out}; resume with --set checkpoint.load={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
