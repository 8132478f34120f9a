"""What packed-document masking and the attention flavours cost on this machine (fp32, CPU).

    python benchmarks/attention_masks.py [--seq 1024] [--layers 4] [--hidden 256] [--steps 3]

For each flavour (rotary, ALiBi, GPT-3 alternating local) with and without
data.reset_attention_mask (about 8 documents per sample): the kernel the model picked, the time of
one forward + backward, the time to build the forward's masks (once per forward; the old code
built them in every layer), and the host syncs counted in the step (expected 0).
"""
import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_neox.config import ModelConfig
from megatron_neox.data.loader import document_ids, document_positions
from megatron_neox.model.gpt_neox import GPTNeoX

FLAVOURS = {
    "rotary": dict(rotary_pct=0.25),
    "alibi": dict(position_embedding="alibi"),
    "gpt3_local": dict(position_embedding="learned", parallel_residual=False, attention_pattern="alternating_local",
                       local_window=128),
}


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in ("_local_scalar_dense", "nonzero", "equal", "is_nonzero"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(1, 1000, (a.batch, a.seq))
    tokens[torch.rand(a.batch, a.seq) < 8 / a.seq] = 0  # EOD id 0: about 8 documents per sample
    doc = document_ids(tokens, 0)
    pos = document_positions(doc)
    print(f"B={a.batch} T={a.seq} layers={a.layers} hidden={a.hidden} fp32 CPU threads={torch.get_num_threads()}")
    print(f"{'flavour':<12}{'documents':<11}{'kernel':<8}{'fwd+bwd ms':>11}{'masks ms':>10}{'syncs':>7}")
    for name, extra in FLAVOURS.items():
        cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=8, seq_length=a.seq,
                          vocab_size=1000, **extra)
        model = GPTNeoX(cfg, cfg.padded_vocab(1))
        for docs in (False, True):
            d = doc if docs else None
            positions = pos if docs else None
            model(tokens, positions, labels=tokens, doc_ids=d).backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(a.steps):
                model(tokens, positions, labels=tokens, doc_ids=d).backward()
            step = (time.perf_counter() - t0) / a.steps
            ids = positions if positions is not None else torch.arange(a.seq).expand(a.batch, -1)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                model.attention_plan.context(ids, d, dtype=torch.float32)
            masks = (time.perf_counter() - t0) / a.steps
            with _Syncs() as syncs:
                model(tokens, positions, labels=tokens, doc_ids=d).backward()
            kernels = sorted(set(model.attention_plan.chosen.values()))
            print(f"{name:<12}{str(docs):<11}{'/'.join(kernels):<8}{step * 1e3:>11.1f}{masks * 1e3:>10.2f}{syncs.n:>7}")


if __name__ == "__main__":
    main()
