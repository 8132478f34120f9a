"""From dataset prefixes to train/valid/test datasets, and resumable data-parallel batches."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_neox.data.blended import (DEFAULT_SPLIT, BlendedDataset, blend_counts, mixture_problems,
                                        mixture_weights, parse_split)
from megatron_neox.data.gpt_dataset import GPTDataset
from megatron_neox.data.indexed import IndexedDataset, check_token_ids
from megatron_neox.errors import ConfigError
from megatron_neox.ranks import rank0_first

SPLIT_NAMES = ("train", "valid", "test")


def build_datasets(data_cfg, *, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                   cache_dir: Optional[str] = None, vocab_size: Optional[int] = None):
    """(train, valid, test): a GPTDataset, a BlendedDataset of several, or None for an empty split.

    Every prefix is split by its own documents (`data_cfg.split`), so each dataset contributes
    to every split; a split's mixture is built from the prefixes that have documents in it.
    With `vocab_size`, every token id must lie below it (a scan per dataset, cached).
    """
    prefixes = [str(p) for p in getattr(data_cfg, "prefixes", None) or []]
    if not prefixes:
        raise ConfigError("data.prefixes: no dataset given; expected prefixes of .bin/.idx pairs (without extension)")
    weights, preset = getattr(data_cfg, "weights", None), getattr(data_cfg, "preset", None)
    split = getattr(data_cfg, "split", None) or DEFAULT_SPLIT
    problems = mixture_problems(prefixes, weights, preset, split)  # a DataConfig has passed them already
    if problems:
        raise ConfigError(problems[0])
    if len(num_samples) != 3:
        raise ConfigError(f"num_samples: expected (train, valid, test), got {num_samples!r}")
    cache_dir = cache_dir or getattr(data_cfg, "cache_dir", None) or os.path.join(
        os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = [parse_split(split, ds.num_documents) for ds in indexed]
    if vocab_size is not None:
        rank0_first(lambda: [check_token_ids(ds, vocab_size, cache_dir) for ds in indexed])

    out = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        parts = [(p, ds, r[s]) for p, ds, r in zip(prefixes, indexed, ranges)]
        tokens = [int(ds.document_sizes()[a:b].sum(dtype=np.int64)) for _, ds, (a, b) in parts]
        if n <= 0 or sum(tokens) == 0:
            out.append(None)
            continue
        mix = mixture_weights(prefixes, weights, preset, tokens)
        keep = [i for i in range(len(parts)) if mix[i] > 0 and tokens[i] > 0]
        if not keep:
            out.append(None)
            continue
        mix = [mix[i] for i in keep]
        parts = [parts[i] for i in keep]
        counts = blend_counts(mix, n) if len(parts) > 1 else [n]
        try:
            datasets = [
                GPTDataset(ds, rng, int(c), seq_length, seed, cache_dir, f"{os.path.basename(p)}_{name}")
                for (p, ds, rng), c in zip(parts, counts)
            ]
        except OSError as e:
            raise ConfigError(f"index cache {cache_dir}: cannot write {e.filename or 'there'} ({e.strerror or e}); "
                              "set data.cache_dir to a writable directory") from None
        out.append(datasets[0] if len(datasets) == 1 else BlendedDataset(datasets, mix, n))
    return tuple(out)


def document_ids(tokens: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """[B, T] index of each token's document within its row. An end-of-document token belongs to the
    document it ends (Megatron-LM's `get_ltor_masks_and_position_ids`: the token after an EOD starts
    a new one). One cumulative sum, no loop over documents."""
    is_eod = (tokens == eod_token_id).to(torch.int64)
    return is_eod.cumsum(dim=1) - is_eod


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its document: 0 at every document start."""
    B, T = doc_ids.shape
    index = torch.arange(T, dtype=torch.int64, device=doc_ids.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # start of the document each token is in
    return index - first


_EOD_FLAGS = ("eod_mask_loss", "reset_position_ids", "reset_attention_mask")


def eod_flags(data_cfg) -> list[str]:
    """The `data` flags that are on and act at end-of-document tokens."""
    return [k for k in _EOD_FLAGS if getattr(data_cfg, k, False)]


def _check_eod_flags(flags: dict, eod_token_id: Optional[int], fix: str) -> None:
    """A flag that needs the end-of-document id is refused without one; the message ends with `fix`."""
    wanted = [k for k, on in flags.items() if on]
    if wanted and eod_token_id is None:
        raise ConfigError(f"data.{wanted[0]}=true needs the tokenizer (to know the end-of-document id): {fix}")


def loader_options(data_cfg, eod_token_id: Optional[int], fix: str = "set tokenizer.path") -> dict:
    """BatchLoader keyword arguments from the `data` config section; a flag that needs the
    end-of-document id is refused without one (no tokenizer): the message ends with `fix`."""
    flags = {k: bool(getattr(data_cfg, k, False)) for k in _EOD_FLAGS}
    _check_eod_flags(flags, eod_token_id, fix)
    return {"eod_token_id": eod_token_id, **flags}


def micro_batch(samples, *, eod_token_id: Optional[int] = None, eod_mask_loss: bool = False,
                reset_position_ids: bool = False, reset_attention_mask: bool = False) -> dict:
    """The one micro-batch builder (the loader, the tests and the benchmarks use it): [B, T+1] token
    rows -> tokens, labels, loss_mask, position_ids and, with reset_attention_mask, doc_ids."""
    samples = np.asarray(samples)
    tokens = torch.from_numpy(np.ascontiguousarray(samples[:, :-1], dtype=np.int64))
    labels = torch.from_numpy(np.ascontiguousarray(samples[:, 1:], dtype=np.int64))
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    if eod_mask_loss:
        # Megatron's rule: where the input is EOD, the label is the first token of an unrelated
        # document, which the model cannot predict; leave it out of the loss.
        loss_mask[tokens == eod_token_id] = 0.0
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if reset_position_ids or reset_attention_mask:
        doc_ids = document_ids(tokens, eod_token_id)
        if reset_attention_mask:
            batch["doc_ids"] = doc_ids
    if reset_position_ids:
        batch["position_ids"] = document_positions(doc_ids)
    else:
        batch["position_ids"] = torch.arange(tokens.shape[1], dtype=torch.int64).expand_as(tokens).contiguous()
    return batch


def split_tokens(ds) -> int:
    """Tokens in the documents a split's dataset (a GPTDataset or a blend of them) draws from."""
    return sum(int(d.indexed.document_sizes()[d.doc_range[0]:d.doc_range[1]].sum(dtype=np.int64))
               for d in getattr(ds, "datasets", [ds]))


def size_warnings(data_cfg, train_ds, valid_ds, *, seq_length: int, train_tokens: int, eval_iters: int) -> list[str]:
    """What a user should hear about splits too small for the run: samples that repeat the same
    few tokens, a run that passes over its data many times, a configured eval that cannot run."""
    out = []
    sample = seq_length + 1
    if train_ds is not None:
        n = split_tokens(train_ds)
        if n < sample:
            out.append(f"the train split of {data_cfg.prefixes} holds {n} tokens, fewer than one sample "
                       f"(model.seq_length + 1 = {sample}): every sample repeats the same {n} tokens; "
                       "add data or lower model.seq_length")
        elif train_tokens > n:
            out.append(f"the run reads {train_tokens:,} tokens from a train split of {n:,}: it passes over "
                       f"the data {train_tokens / n:.1f} times")
    if valid_ds is None:
        out.append(f"data.split={data_cfg.split!r} leaves no validation documents in {data_cfg.prefixes}: "
                   f"the configured evaluation (eval.iters={eval_iters}) is skipped")
    elif split_tokens(valid_ds) < sample:
        out.append(f"the valid split holds {split_tokens(valid_ds)} tokens, fewer than one sample ({sample}): "
                   "every eval sample repeats them")
    return out


def eod_warnings(data_cfg, train_ds, eod_token_id: Optional[int], samples: int = 256) -> list[str]:
    """The EOD flags act where the data holds the end-of-document token; on data preprocessed
    without --append-eod they change nothing, which the user should hear, with the numbers."""
    wanted = [f"data.{k}" for k in eod_flags(data_cfg)]
    if not wanted or eod_token_id is None or train_ds is None:
        return []
    n = min(len(train_ds), samples)
    tokens = sum(len(train_ds[i]) for i in range(n))
    if any((np.asarray(train_ds[i]) == eod_token_id).any() for i in range(n)):
        return []
    return [f"{', '.join(wanted)}: the first {n} training samples ({tokens:,} tokens) of {data_cfg.prefixes} hold no "
            f"end-of-document token (id {eod_token_id}), so these flags change nothing; preprocess with --append-eod "
            "(tools/preprocess_data.py) for them to act"]


class BatchLoader:
    """Micro-batches for one data-parallel rank. Global batch j covers samples [consumed, consumed+G)
    (Megatron's pretraining sampler order); this rank takes its contiguous share of each micro-step.

    Micro-step m of a global batch covers samples consumed + m*B*dp + [0, B*dp), and rank r reads
    the B samples starting at consumed + m*B*dp + r*B. Nothing here depends on the tensor- or
    pipeline-parallel rank, so every rank of a tensor-parallel group reads the same batch. The
    only state is `consumed_samples`, so resuming from it continues the exact sequence, and the
    global batch size may change between calls (batch-size ramp-up). Past the end of the
    dataset, indices wrap around (another pass) rather than raise.

    With `reset_position_ids` positions restart after every EOD; with `reset_attention_mask` each
    micro-batch also carries `doc_ids` (the model then attends within a document only).

    Global batches are numbered in the order they are drawn (`consumed_batches`); a batch whose
    number lies in one of `skip_ranges` ([start, end) pairs) is drawn at the size asked for and
    thrown away, so the batches after it are the ones an unskipped run would have read there.
    """

    def __init__(self, dataset, *, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 eod_token_id: Optional[int] = None, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, consumed_batches: int = 0,
                 skip_ranges: Sequence[Sequence[int]] = ()):
        if len(dataset) == 0:
            raise ConfigError("BatchLoader: the dataset is empty")
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"BatchLoader: need micro_batch_size >= 1 and 0 <= dp_rank < dp_size; got "
                              f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.options = {"eod_mask_loss": bool(eod_mask_loss), "reset_position_ids": bool(reset_position_ids),
                        "reset_attention_mask": bool(reset_attention_mask)}
        _check_eod_flags(self.options, eod_token_id, "pass eod_token_id to BatchLoader")
        self.options["eod_token_id"] = eod_token_id
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)
        self.consumed_batches = int(consumed_batches)
        self.skip_ranges = [(int(a), int(b)) for a, b in skip_ranges]

    def _skipped(self, batch: int) -> bool:
        return any(a <= batch < b for a, b in self.skip_ranges)

    def next_global_batch(self, global_batch_size: int) -> list[dict]:
        B, dp = self.micro_batch_size, self.dp_size
        if global_batch_size < 1 or global_batch_size % (B * dp):
            raise ConfigError(f"global batch size {global_batch_size} is not a positive multiple of "
                              f"micro_batch_size x data-parallel size = {B} x {dp} = {B * dp}")
        while self._skipped(self.consumed_batches):
            self.consumed_samples += global_batch_size
            self.consumed_batches += 1
        n = len(self.dataset)
        batches = []
        for m in range(global_batch_size // (B * dp)):
            first = self.consumed_samples + m * B * dp + self.dp_rank * B
            rows = [self.dataset[(first + j) % n] for j in range(B)]
            batches.append(micro_batch(np.stack(rows), **self.options))
        self.consumed_samples += global_batch_size
        self.consumed_batches += 1
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "consumed_batches": self.consumed_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s position (training/checkpointer.py TrainState.data_position
        supplies it, also for checkpoints older than consumed_batches)."""
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_batches = int(state["consumed_batches"])
