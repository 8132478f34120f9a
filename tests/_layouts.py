"""Shared pieces of the multi-rank training tests: a tiny config and deterministic batches.

The batches follow the data loader's order (global batch = samples [step*G, (step+1)*G); micro-step
k of data-parallel rank r takes its contiguous `micro` samples), so every layout sees the same
global batch and the same mean loss.
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


def micro_batches(step: int, cfg, dp: int, dp_rank: int):
    lay_micro = cfg.train.micro_batch_size
    G = cfg.train.global_batch_size
    T, V = cfg.model.seq_length, cfg.model.vocab_size
    out = []
    for k in range(G // (lay_micro * dp)):
        start = step * G + k * lay_micro * dp + dp_rank * lay_micro
        rows = torch.stack([sample(start + j, T, V) for j in range(lay_micro)])
        out.append({
            "tokens": rows[:, :-1].contiguous(),
            "labels": rows[:, 1:].contiguous(),
            "loss_mask": torch.ones(lay_micro, T),
            "position_ids": torch.arange(T).expand(lay_micro, T).contiguous(),
        })
    return out


def run_steps(cfg, steps: int):
    """Build the engine for cfg on the current world and train `steps` steps; (losses, norms)."""
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    layout, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo, layout)
    losses, norms = [], []
    for s in range(steps):
        r = train_step(engine, micro_batches(s, cfg, topo.dp, topo.dp_rank), topo, clipper)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return losses, norms
