"""Shared pieces of the multi-rank training tests: a tiny config and deterministic batches.

The batches come from the real BatchLoader over random samples (global batch = samples
[step*G, (step+1)*G); micro-step k of data-parallel rank r takes its contiguous `micro` samples),
so every layout sees the same global batch and the same mean loss. A config with any of
data.eod_mask_loss / reset_position_ids / reset_attention_mask trains on packed documents instead
(every token divisible by 5 becomes the EOD id 0, about 3 documents per sample).
"""
import copy

import torch

from megatron_neox.config import config_from_dict

from _train import TINY_MODEL, set_keys

TINY = {
    "model": TINY_MODEL,
    "train": {"iters": 3, "micro_batch_size": 2, "global_batch_size": 8, "seed": 1234},
    "optimizer": {"lr": 1e-2, "weight_decay": 0.1, "clip_grad": 1.0},
    "zero": {"stage": 1},
}


def tiny_config(pp=1, tp=1, overrides=None, base=None):
    data = copy.deepcopy(base or TINY)
    data.setdefault("parallel", {}).update(pp=pp, tp=tp)
    return config_from_dict(set_keys(data, overrides or {}))


def sample(i: int, seq_length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + i)
    return torch.randint(0, vocab, (seq_length + 1,), generator=g)


EOD = 0


class Samples:
    """sample(i) for every i; `packed`: every token divisible by 5 turned into EOD (a stream of
    short documents)."""

    def __init__(self, seq_length: int, vocab: int, packed: bool = False):
        self.seq_length, self.vocab, self.packed = seq_length, vocab, packed

    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        s = sample(i, self.seq_length, self.vocab)
        return (torch.where(s % 5 == 0, EOD, s) if self.packed else s).numpy()


def packed(cfg) -> bool:
    d = cfg.data
    return d.eod_mask_loss or d.reset_position_ids or d.reset_attention_mask


def micro_batches(step: int, cfg, dp: int, dp_rank: int):
    """This rank's micro-batches of global batch `step`, from the real BatchLoader."""
    from megatron_neox.data.loader import BatchLoader, loader_options

    G = cfg.train.global_batch_size
    loader = BatchLoader(Samples(cfg.model.seq_length, cfg.model.vocab_size, packed(cfg)),
                         micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                         consumed_samples=step * G, **loader_options(cfg.data, EOD if packed(cfg) else None))
    return loader.next_global_batch(G)


def run_steps(cfg, steps: int):
    """Build the engine for cfg on the current world and train `steps` steps; (losses, norms)."""
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup

    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    return train_steps(engine, cfg, topo, clipper, steps)


def train_steps(engine, cfg, topo, clipper, steps: int):
    """`steps` steps of `engine` on the deterministic micro-batches of step 0, 1, ...; (losses, norms)."""
    from megatron_neox.training.step import train_step

    losses, norms = [], []
    for s in range(steps):
        r = train_step(engine, micro_batches(s, cfg, topo.dp, topo.dp_rank), topo, clipper)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return losses, norms
