#!/usr/bin/env python
"""Write the built-in chat (SFT) and preference (DPO) sets of `make demo-chat`, from the sample
corpus's biographies (see megatron_neox/data/chat_corpus.py). No download.

    python tools/make_chat_data.py --facts data/sample/bios_facts.jsonl --out data/chat
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.data.chat_corpus import RULE, make_chat_data  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", required=True, help="bios_facts.jsonl of tools/make_sample_corpus.py")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        counts = make_chat_data(args.out, args.facts, seed=args.seed)
    except (MegatronNeoxError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/sft.jsonl ({counts['sft']} examples), {args.out}/prefs.jsonl ({counts['prefs']} pairs; "
          f"chosen answers end with {RULE!r}), {args.out}/tasks/chat_facts.* ({counts['task']} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
