#!/usr/bin/env python
"""Run a launcher command so that a stop signal saves: the ranks finish their step, save and exit,
and this command exits 0.

    python launch/run.py deepspeed --num_gpus 8 launch/train.py --config 20B.json
    python launch/run.py deepspeed --hostfile hosts launch/train.py --config 20B.json
    python launch/run.py torchrun --nproc_per_node 8 launch/train.py --config 125M.json

SIGTERM, SIGUSR1 (to this process or its process group) and Ctrl-C are forwarded to the ranks alone;
a second Ctrl-C kills everything. The deepspeed launchers on their own do not forward these
(see megatron_neox/training/preemption.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_neox.training.preemption import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
