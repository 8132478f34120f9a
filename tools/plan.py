#!/usr/bin/env python
"""Show what a config becomes on a cluster: layout, exact parameter count, pipeline stages, memory.

    python tools/plan.py --config 20B.json [--gpus 96] [--gpu-memory-gb 80] [--set a.b=value ...]

Without --gpus the layout uses pp*tp GPUs (dp = 1). With --gpus the tool says whether the
config's layout fits (divisibility, batch identity, memory per GPU) and, unless
parallel.pp/parallel.tp were overridden, lists every (pp, tp) layout of that many GPUs that fits.
Exit status: 0 fits, 1 does not fit, 2 bad input (config, override or arguments).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.config import load_config  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config path, or a name in deepspeed_configs/")
    p.add_argument("--gpus", type=_positive(int), help="total GPUs (ranks); default pp*tp")
    p.add_argument("--gpu-memory-gb", type=_positive(float), default=80.0,
                   help="memory per GPU in GiB (default 80, an A100/H100 80GB)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parallel.pp=2 (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Imported after the config is valid: it pulls in torch and DeepSpeed (seconds).
        from megatron_neox import plan as planner

        result = planner.make_plan(cfg, args.gpus, args.gpu_memory_gb)
        print(f"config: {args.config}")
        print(planner.format_plan(result))
        auto = planner.format_auto_recompute(cfg, args.gpus)
        if auto:
            print(auto)
        layout_overridden = any(o.split("=", 1)[0].strip() in ("parallel.pp", "parallel.tp") for o in args.overrides)
        if args.gpus is not None and not layout_overridden:
            print(planner.format_candidates(planner.candidate_layouts(cfg, args.gpus, args.gpu_memory_gb),
                                            args.gpus, args.gpu_memory_gb))
    except (MegatronNeoxError, OSError) as e:  # OSError: an unreadable config file
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
