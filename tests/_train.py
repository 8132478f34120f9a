"""Small datasets and configs for end-to-end training tests (tokens are random; vocab 96)."""
import copy
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model every multi-rank test trains (tests/_layouts.py too).
TINY_MODEL = {
    "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 96,
    "rotary_pct": 0.5, "make_vocab_size_divisible_by": 8,
}

BASE = {
    "model": TINY_MODEL,
    "train": {"iters": 6, "micro_batch_size": 2, "global_batch_size": 8, "seed": 1234},
    "optimizer": {"lr": 1e-2},
    "lr_schedule": {"warmup_iters": 2},
    "zero": {"stage": 1},
    "data": {"split": "90,10,0"},
    "log": {"interval": 1},
    "eval": {"iters": 2},
}


def make_dataset(prefix: str, num_docs: int = 300, seed: int = 0) -> str:
    """An indexed dataset of random documents (lengths 1..60), EOD (0) at each end."""
    from megatron_neox.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(1, 60))
        builder.add_document(np.append(rng.integers(2, 96, n), 0))
    builder.finalize()
    return prefix


def config_dict(tmp: str, pp: int = 1, tp: int = 1, **overrides) -> dict:
    """BASE with data/checkpoint/log dirs under `tmp` and `a.b=value` overrides (as keyword a__b)."""
    d = copy.deepcopy(BASE)
    d["parallel"] = {"pp": pp, "tp": tp}
    d["data"]["prefixes"] = [os.path.join(tmp, "data", "rand")]
    d["checkpoint"] = {"dir": os.path.join(tmp, "ckpt")}
    d["log"]["dir"] = os.path.join(tmp, "log")
    return set_keys(d, {key.replace("__", "."): value for key, value in overrides.items()})


def set_keys(d: dict, overrides: dict) -> dict:
    """Set dotted keys ('optimizer.lr') of config dict `d` in place; returns `d`."""
    for key, value in overrides.items():
        node = d
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return d


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is scripts, not a package): its main() runs in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_losses(cfg_dict: dict):
    """Train config dict `cfg_dict` in this rank: (losses, final state as a dict)."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.training.trainer import train

    r = train(config_from_dict(cfg_dict))
    return r.losses, r.state.to_dict()


def run_on_random_data(fn, world_size: int, tmp: str, timeout: float):
    """A random dataset at tmp/data/rand, then `fn(rank, world_size, tmp)` in `world_size` gloo
    ranks; rank 0's result."""
    from _dist import run_distributed

    make_dataset(os.path.join(tmp, "data", "rand"))
    return run_distributed(fn, world_size, tmp, timeout=timeout)[0]
