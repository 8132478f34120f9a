#!/usr/bin/env python
"""Train a GPT-NeoX-family model.

    python launch/run.py deepspeed --num_gpus 8 launch/train.py --config 20B.json --set train.iters=100
    deepspeed --num_gpus 8 launch/train.py --config 20B.json   # the same, but a stop signal cannot save
    deepspeed --hostfile hosts launch/train.py --config pythia-1B.json
    torchrun --nproc_per_node 8 launch/train.py --config 125M.json
    srun python launch/train.py --config 20B.json          # SLURM_PROCID etc. are mapped

`--config NAME` is a path or a file in deepspeed_configs/; `--set key.path=value` overrides any key
(the value is JSON when it parses: numbers, booleans, lists; else a string).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file or name in deepspeed_configs/")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.iters=100 precision=bf16")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from megatron_neox.errors import MegatronNeoxError, error_message
    from megatron_neox.config import load_config
    from megatron_neox.training.launch import configure_threads
    from megatron_neox.training.preemption import report_exit

    code, stopped = 1, False
    try:
        cfg = load_config(args.config, args.overrides)
        configure_threads()
        from megatron_neox.training.trainer import train

        stopped = train(cfg).stopped_by_signal
        code = 0
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable checkpoint or log dir, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr, flush=True)
        code = 2
    finally:
        report_exit(code, stopped)  # for launch/run.py, when it supervises this rank
    return code


if __name__ == "__main__":
    sys.exit(main())
