"""Fine-tuning samples and batches: whole SFT examples packed into sequences, and DPO pairs.

SFT. Examples (a conversation, a prompt + completion) are never cut between samples: each epoch's
examples, in a seeded order, fill samples of `seq_length + 1` tokens next-fit (an example that does
not fit closes the sample, padded with `pad_id` tokens that carry no loss); an example longer than
`seq_length + 1` is an error at start-up (preprocess with --max-length or --truncate). Every token
carries the index of its example in the sample, which becomes `doc_ids` (attention stays within an
example) and restarts the positions -- always, whatever `data.reset_*` say, since the packing is
ours. The label of position i is trained when the mask marks it and it belongs to the same example.

DPO. A sample is one pair; a micro-batch of B pairs is 2B rows, chosen answers first, each sequence
padded to `seq_length` (a pair never spans micro-batches, so the loss sees both halves).

Both orders are prefix-stable like GPT samples: epoch e is a seeded permutation of the range, and
the first k samples do not depend on how many are asked for. The indices are small (one entry per
example) and built in memory at start-up.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_neox.data.blended import DEFAULT_SPLIT, parse_split
from megatron_neox.data.chat_preprocess import dpo_prefixes, sft_prefixes
from megatron_neox.data.indexed import IndexedDataset
from megatron_neox.data.loader import BatchLoader, document_positions
from megatron_neox.errors import ConfigError

_SFT_STREAM, _DPO_STREAM = 7, 8  # SeedSequence spawn keys: orders independent of the GPT samples'


def _epoch_order(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream, epoch))).permutation(n)


def _open_side_by_side(prefixes: Sequence[str]) -> list[IndexedDataset]:
    """The datasets of one fine-tuning set; every one must hold documents of the same sizes."""
    sets = [IndexedDataset(p) for p in prefixes]
    for p, ds in zip(prefixes[1:], sets[1:]):
        if ds.num_documents != sets[0].num_documents:
            raise ConfigError(f"{p}: {ds.num_documents} documents, but {prefixes[0]} has {sets[0].num_documents}; "
                              "they must come from the same tools/preprocess_data.py run")
    for k in range(0, len(sets), 2):
        if not np.array_equal(sets[k].document_sizes(), sets[k + 1].document_sizes()):
            raise ConfigError(f"{prefixes[k + 1]}: its document sizes differ from {prefixes[k]}'s; "
                              "they must come from the same tools/preprocess_data.py run")
    return sets


def _check_lengths(sizes: np.ndarray, first: int, limit: int, prefix: str) -> None:
    if sizes.size and int(sizes.max()) > limit:
        j = int(np.argmax(sizes))
        raise ConfigError(f"{prefix}: example {first + j} has {int(sizes[j])} tokens, more than model.seq_length + 1 "
                          f"= {limit}; preprocess with --max-length {limit} (and --truncate to cut such examples)")


class PackedSFTDataset:
    """Samples of `seq_length + 1` (tokens, mask, example index) from whole examples of a range."""

    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, doc_range: tuple[int, int], seq_length: int,
                 seed: int, num_samples: int, pad_id: int = 0):
        self.tokens, self.mask, self.pad_id = tokens, mask, int(pad_id)
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.indexed = tokens  # what split_tokens() and size warnings read
        self.sample_len = seq_length + 1
        a, b = self.doc_range
        sizes = tokens.document_sizes()[a:b]
        _check_lengths(sizes, a, self.sample_len, tokens.prefix)
        docs, starts = [], [0]  # docs of sample j: docs[starts[j]:starts[j+1]]
        epoch = 0
        while len(starts) - 1 < max(int(num_samples), 1):
            fill = 0
            for d in _epoch_order(seed, _SFT_STREAM, epoch, b - a):
                if fill + sizes[d] > self.sample_len:
                    starts.append(len(docs))
                    fill = 0
                docs.append(a + int(d))
                fill += int(sizes[d])
            starts.append(len(docs))  # an epoch's last sample is not topped up with the next epoch
            epoch += 1
        self.docs, self.starts = np.asarray(docs, dtype=np.int64), np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.sample_len
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        mask = np.zeros(n, dtype=np.uint8)
        example = np.zeros(n, dtype=np.int64)
        at = 0
        docs = self.docs[self.starts[j]:self.starts[j + 1]]
        for k, d in enumerate(docs):
            ids = self.tokens.get_document(int(d))
            tokens[at:at + len(ids)] = ids
            mask[at:at + len(ids)] = self.mask.get_document(int(d))
            example[at:at + len(ids)] = k
            at += len(ids)
        example[at:] = len(docs)  # the padding is an example of its own
        return tokens, mask, example

    def trained_tokens(self, j: int) -> int:
        _, mask, example = self[j]
        return int((mask[1:].astype(bool) & (example[1:] == example[:-1])).sum())


class PairDataset:
    """Sample j: one preference pair of the range (chosen ids/mask, rejected ids/mask, pair index)."""

    def __init__(self, sets: Sequence[IndexedDataset], doc_range: tuple[int, int], seq_length: int, seed: int,
                 num_samples: int, reference: Optional[np.ndarray] = None, pad_id: int = 0):
        self.sets = list(sets)
        self.pad_id = int(pad_id)
        self.indexed = self.sets[0]
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seed, self.sample_len = seed, seq_length + 1
        a, b = self.doc_range
        for k in (0, 2):
            _check_lengths(self.sets[k].document_sizes()[a:b], a, self.sample_len, self.sets[k].prefix)
        self.reference = reference
        self.pairs = b - a
        self.epochs = max(1, -(-int(num_samples) // max(self.pairs, 1)))  # whole epochs covering the request
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.pairs * self.epochs

    def pair_index(self, j: int) -> int:
        n = self.pairs
        epoch = j // n
        if epoch not in self._orders:
            self._orders[epoch] = _epoch_order(self.seed, _DPO_STREAM, epoch, n)
        return self.doc_range[0] + int(self._orders[epoch][j % n])

    def __getitem__(self, j: int):
        d = self.pair_index(j)
        return d, [s.get_document(d) for s in self.sets]


class FinetuneLoader(BatchLoader):
    """BatchLoader for `train.objective` sft or dpo: same global-batch order, resume state and skip
    ranges; the micro-batches are built from the datasets above."""

    def __init__(self, dataset, objective: str, **kwargs):
        super().__init__(dataset, **kwargs)  # the data.* EOD flags are refused with these objectives (config.py)
        self.objective = objective

    def next_global_batch(self, global_batch_size: int) -> list[dict]:
        batches = super().next_global_batch(global_batch_size)
        if self.objective == "sft":
            # Weights that make the step's loss the mean over every trained token of the global
            # batch (training/objectives.py): every rank counts the whole batch's trained tokens.
            n = len(self.dataset)
            first = self.consumed_samples - global_batch_size
            trained = sum(self.dataset.trained_tokens((first + j) % n) for j in range(global_batch_size))
            scale = len(batches) * self.dp_size / max(trained, 1)
            for mb in batches:
                mb["loss_mask"] = mb["loss_mask"] * scale
        return batches

    def _micro_batch(self, rows) -> dict:
        return sft_micro_batch(rows) if self.objective == "sft" else dpo_micro_batch(rows, self.dataset)


def sft_micro_batch(rows) -> dict:
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.float32))
    example = torch.from_numpy(np.stack([r[2] for r in rows]))
    same = (example[:, 1:] == example[:, :-1]).to(torch.float32)
    doc_ids = example[:, :-1].contiguous()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:] * same, "position_ids": document_positions(doc_ids), "doc_ids": doc_ids}


def dpo_micro_batch(rows, dataset: PairDataset) -> dict:
    n, pad_id = dataset.sample_len, dataset.pad_id
    seqs = [r[1][0] for r in rows] + [r[1][2] for r in rows]
    masks = [r[1][1] for r in rows] + [r[1][3] for r in rows]
    tokens = np.full((len(seqs), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), n), dtype=np.float32)
    for i, (ids, m) in enumerate(zip(seqs, masks)):
        tokens[i, :len(ids)] = ids
        mask[i, :len(m)] = m
    pairs = np.array([r[0] for r in rows], dtype=np.int64)
    ref = np.zeros(len(seqs), dtype=np.float64)
    if dataset.reference is not None:
        ref = np.concatenate([dataset.reference[pairs, 0], dataset.reference[pairs, 1]])
    t = torch.from_numpy(tokens)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.from_numpy(mask[:, 1:].copy()),
            "position_ids": torch.arange(n - 1, dtype=torch.int64).expand(len(seqs), n - 1).contiguous(),
            "ref_logps": torch.from_numpy(ref), "pair_ids": torch.from_numpy(pairs)}


def build_finetune_datasets(data_cfg, objective: str, *, seq_length: int, seed: int, num_samples: Sequence[int],
                            pad_id: int = 0, reference: Optional[np.ndarray] = None):
    """(train, valid, test) of `data.prefixes[0]` (the --output-prefix of tools/preprocess_data.py
    --format sft|dpo), split by examples with `data.split`; None for an empty split."""
    prefixes = [str(p) for p in getattr(data_cfg, "prefixes", None) or []]
    if len(prefixes) != 1:
        raise ConfigError(f"data.prefixes: train.objective={objective} takes one dataset (the --output-prefix of "
                          f"tools/preprocess_data.py --format {objective}), got {len(prefixes)}")
    names = sft_prefixes(prefixes[0]) if objective == "sft" else dpo_prefixes(prefixes[0])
    sets = _open_side_by_side(names)
    ranges = parse_split(getattr(data_cfg, "split", None) or DEFAULT_SPLIT, sets[0].num_documents)
    out = []
    for (a, b), n in zip(ranges, num_samples):
        if b <= a or n <= 0:
            out.append(None)
        elif objective == "sft":
            out.append(PackedSFTDataset(sets[0], sets[1], (a, b), seq_length, seed, n, pad_id))
        else:
            out.append(PairDataset(sets, (a, b), seq_length, seed, n, reference, pad_id))
    return tuple(out)
