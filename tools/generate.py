#!/usr/bin/env python
"""Continue a prompt with a trained checkpoint (any layout; merged and run on one process).

    python tools/generate.py --checkpoint runs/demo/checkpoints --prompt "def fib(n):"
    python tools/generate.py --checkpoint DIR --prompt "Once" --temperature 0.8 --top-p 0.95 --seed 1
    python tools/generate.py --checkpoint runs/20B --prompt "Once" --device cuda --dtype bf16

Temperature 0 (the default) is greedy decoding. Stops after --max-new-tokens or at the end-of-
document token. The tokenizer defaults to the run config's tokenizer.path. Prints the prompt
followed by its continuation.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.cli import finite_float  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (follows `latest`) or DIR/global_stepN")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run config's tokenizer.path)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default fp32; bf16 halves the memory on GPUs that have it)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        p.error("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")

    from megatron_neox.errors import ConfigError
    from megatron_neox.generate import check_tokenizer_fits, generate_text, load_model, tokenizer_path
    from megatron_neox.hardware import DTYPES
    from megatron_neox.tokenizer import load_tokenizer

    try:
        loaded = load_model(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])
        tok_file = args.tokenizer or tokenizer_path(loaded.run)
        if not tok_file:
            raise ConfigError(f"{args.checkpoint}: the checkpoint names no tokenizer; pass --tokenizer tokenizer.json")
        tok = load_tokenizer(tok_file, verify=False)
        check_tokenizer_fits(tok, loaded.padded_vocab)
        text = generate_text(loaded, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
