"""Perplexity of a checkpoint on a split of its (or any) indexed dataset, on one process.

`--iters` global batches of the run's global batch size from the split, with the merged model;
the mean is over tokens. The sample order depends on how many samples are drawn, so with --iters
= eval.iters (the default) and a run without eval.interval, the valid-split batches are those of
the trainer's final evaluation and the loss is the one it logged.
"""
import math
from typing import Optional, Sequence

import torch

SPLITS = ("train", "valid", "test")


def perplexity(loaded, data_prefixes: Optional[Sequence[str]], split: str, iters: Optional[int], tok,
               device="cpu") -> dict:
    """{'loss', 'ppl', 'tokens', 'batches', 'batch_size'} over `iters` global batches of `split`."""
    from megatron_neox.config import DataConfig
    from megatron_neox.data.loader import BatchLoader, build_datasets, loader_options
    from megatron_neox.errors import ConfigError

    run = loaded.run
    data = run.data.model_copy() if run is not None else DataConfig()
    if data_prefixes:
        data = DataConfig(**{**data.model_dump(), "prefixes": list(data_prefixes), "weights": None})
    if not data.prefixes:
        raise ConfigError("no dataset to evaluate on: the checkpoint's run config has no data.prefixes; "
                          "pass --data PREFIX")
    if run is not None:
        micro = run.train.micro_batch_size
        global_batch = run.layout(run.parallel.pp * run.parallel.tp).global_batch_size
        iters = iters or run.eval.iters
        seed = run.train.seed
    else:
        micro, global_batch, iters, seed = 4, 4, iters or 10, 1234
    batch_options = loader_options(data, tok.eod_id if tok is not None else None, fix="pass --tokenizer")
    index = SPLITS.index(split)
    sizes = tuple(iters * global_batch if i == index else 0 for i in range(3))
    datasets = build_datasets(data, seq_length=loaded.model_config.seq_length, seed=seed, num_samples=sizes,
                              vocab_size=loaded.model_config.vocab_size)
    ds = datasets[index]
    if ds is None:
        raise ConfigError(f"data.split={data.split!r} leaves no documents in the {split} split of {data.prefixes}")
    loader = BatchLoader(ds, micro_batch_size=micro, dp_rank=0, dp_size=1, **batch_options)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for _ in range(iters):
            for mb in loader.next_global_batch(global_batch):
                mb = {k: v.to(device) for k, v in mb.items()}
                loss = loaded.model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"],
                                    doc_ids=mb.get("doc_ids"))
                n = float(mb["loss_mask"].sum())
                total += float(loss) * n  # the model returns the masked mean: weight it by its tokens
                count += n
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count), "batches": iters,
            "batch_size": global_batch}
