#!/usr/bin/env python
"""Export a training checkpoint (any pp/tp layout) as a Hugging Face directory of the class its model
section describes (convert/hf_families.py): LlamaForCausalLM (RMSNorm + SwiGLU; MistralForCausalLM with
model.sliding_window), GPTJForCausalLM (interleaved rotary, one shared norm) or GPTNeoXForCausalLM.

    python tools/convert_to_hf.py --checkpoint runs/20B/checkpoints --out hf/neox-20b [--dtype fp16]
    python tools/convert_to_hf.py --checkpoint runs/demo/checkpoints/global_step300 --out hf/demo

`--checkpoint` is a checkpoint directory (its `latest` is used) or one global_stepN inside it.
Writes config.json, model.safetensors, generation_config.json (the vocab-padding ids are
suppressed, so HF's generate never emits them) and, when a tokenizer is given or the run config
names one that exists, tokenizer.json. An existing non-empty --out is replaced only with --overwrite,
and never when it holds a checkpoint or a training run. Exit status 2 on a missing, partial or
corrupt checkpoint, or an --out that cannot be written.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402

from megatron_neox.hardware import DTYPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (follows `latest`) or DIR/global_stepN")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the export (default fp32)")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the run config's tokenizer.path)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never one holding a checkpoint or a training run)")
    args = p.parse_args(argv)

    from megatron_neox.convert.checkpoint_io import load_full_state_dict
    from megatron_neox.convert.hf import SpecialTokens, save_hf
    from megatron_neox.generate import check_tokenizer_fits, tokenizer_path
    from megatron_neox.outputs import check_output_dir
    from megatron_neox.tokenizer import load_tokenizer

    try:
        check_output_dir(args.out, args.overwrite)  # before the (long) load
        ck = load_full_state_dict(args.checkpoint)
        cfg, padded, sd = ck.model, ck.padded_vocab, ck.state_dict
        tok_file = args.tokenizer or tokenizer_path(ck.run)
        if tok_file and not args.tokenizer and not os.path.isfile(tok_file):
            print(f"note: the run's tokenizer {tok_file} does not exist here; exporting without a tokenizer "
                  "(pass --tokenizer to include one)", file=sys.stderr)
            tok_file = None
        tok = load_tokenizer(tok_file, verify=False) if tok_file else None
        if tok is not None:
            check_tokenizer_fits(tok, padded)
        special = SpecialTokens.of(tok) if tok is not None else None  # by token: never assume id 0
        vocab = tok.vocab_size if tok is not None else cfg.vocab_size
        out = save_hf(args.out, sd, cfg, padded, tokenizer_path=tok_file, special=special,
                      dtype=DTYPES[args.dtype], vocab=vocab,
                      chat=ck.run is not None and ck.run.train.objective != "lm")
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {out}: {n:,} parameters ({args.dtype}), vocab {vocab} padded to {padded}"
          + (f", tokenizer {tok_file}" if tok_file else ", no tokenizer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
