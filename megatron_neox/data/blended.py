"""Weighted mixtures of datasets, train/valid/test document splits, and The Pile preset.

Blending order. Sample n of the mixture is assigned so that after every prefix of n samples,
dataset d has served c_d(n) samples with |c_d(n) - w_d * n| < 1, for every d and every n.

The greedy "give the next sample to the dataset most behind its target" rule (Megatron's
blending helper) does not guarantee this: with many datasets of unequal weights a dataset can
fall more than one sample behind (we measured 1.24 on random 20-way mixtures). We use the
quota method (Balinski & Young 1975; Tijdeman's "chairman assignment" 1980) instead: unit k of
dataset d may be placed no earlier than the first n with w_d*n > k-1 (else it would be ahead by
one) and no later than the first n with w_d*n >= k (else it would be behind by one); among the
datasets whose next unit may be placed now, take the one whose deadline is earliest. Earliest
deadline first always finds such a schedule when one exists, and one always exists.

Weights are rounded to multiples of 1/BLEND_PERIOD (2**20, i.e. ~1e-6). With weights
p_d / P that sum to exactly 1, every count is exact after P samples (|c_d(P) - p_d| < 1 and both
are integers), so the schedule repeats with period P: we run the (sequential, pure-Python)
rule for at most P samples (about 1 s here) and serve any index arithmetically. The one-sample
guarantee is exact for the rounded weights, reported as `BlendedDataset.weights`.
"""
from __future__ import annotations

import functools
import heapq
import os
import re
from typing import Optional, Sequence

import numpy as np

from megatron_neox.errors import ConfigError, DataError

BLEND_PERIOD = 1 << 20

# The 22 components of The Pile and the number of epochs each gets in the Pile's own training
# mixture: Table 1 of Gao et al. 2020, "The Pile: An 800GB Dataset of Diverse Text for Language
# Modeling". Keys are the `meta.pile_set_name` values of the Pile's jsonl files.
PILE_EPOCHS = {
    "Pile-CC": 1.0,
    "PubMed Central": 2.0,
    "Books3": 1.5,
    "OpenWebText2": 2.0,
    "ArXiv": 2.0,
    "Github": 1.0,
    "FreeLaw": 1.5,
    "StackExchange": 2.0,
    "USPTO Backgrounds": 2.0,
    "PubMed Abstracts": 2.0,
    "Gutenberg (PG-19)": 2.5,
    "OpenSubtitles": 1.5,
    "Wikipedia (en)": 3.0,
    "DM Mathematics": 2.0,
    "Ubuntu IRC": 2.0,
    "BookCorpus2": 1.5,
    "EuroParl": 2.0,
    "HackerNews": 2.0,
    "YoutubeSubtitles": 2.0,
    "PhilPapers": 2.0,
    "NIH ExPorter": 2.0,
    "Enron Emails": 2.0,
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def sanitize_component_name(name: str) -> str:
    """File-name form of a component name, as used in dataset prefixes.

    Every character other than ASCII letters, digits, '.', '_' and '-' becomes '_', one for one
    (no collapsing, so the mapping is easy to predict): "Gutenberg (PG-19)" -> "Gutenberg__PG-19_",
    "Wikipedia (en)" -> "Wikipedia__en_", "Pile-CC" -> "Pile-CC". tools/preprocess_data.py
    --split-by-meta names its outputs with this, and `pile_component` finds the name again.
    """
    return _UNSAFE.sub("_", name)


def pile_component(prefix: str) -> str:
    """The Pile component whose sanitised name occurs in the prefix's file name (case-insensitive;
    the longest match wins)."""
    base = os.path.basename(str(prefix)).lower()
    hits = [c for c in PILE_EPOCHS if sanitize_component_name(c).lower() in base]
    if not hits:
        names = ", ".join(sanitize_component_name(c) for c in PILE_EPOCHS)
        raise ConfigError(f"dataset prefix {prefix}: no Pile component name in its file name; expected one of {names}")
    return max(hits, key=len)


def pile_weights(prefixes: Sequence[str], token_counts: Sequence[int]) -> list[float]:
    """Pile mixture weights: tokens x epochs of each prefix's component (several prefixes of one
    component share its epochs in proportion to their tokens), normalised."""
    raw = [float(t) * PILE_EPOCHS[pile_component(p)] for p, t in zip(prefixes, token_counts)]
    total = sum(raw)
    if total <= 0:
        raise DataError(f"pile preset: the datasets {list(prefixes)} hold no tokens")
    return [r / total for r in raw]


# -- the data section's defaults and checks (config.py's DataConfig runs them at read time) --

DEFAULT_SPLIT = "969,30,1"  # GPT-NeoX's default train/valid/test split by documents
PRESETS = ("pile",)


def mixture_problems(prefixes: Sequence[str], weights: Optional[Sequence[float]], preset: Optional[str],
                     split: str) -> list[str]:
    """What is wrong with a data mixture (`data.prefixes/weights/preset/split`); [] when nothing."""
    problems = []
    if weights is not None and len(weights) != len(prefixes):
        problems.append(f"data.weights: {len(weights)} weights for {len(prefixes)} prefixes; give one per prefix")
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        problems.append(f"data.weights={list(weights)}: expected non-negative numbers with a positive sum")
    if weights is not None and preset is not None:
        problems.append("data: set either `weights` or `preset`, not both")
    if preset is not None and preset not in PRESETS:
        problems.append(f"data.preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)} or null")
    try:
        split_weights(split)
    except ConfigError as e:
        problems.append(f"data.{e}")
    return problems


def mixture_weights(prefixes: Sequence[str], weights: Optional[Sequence[float]], preset: Optional[str],
                    tokens: Sequence[int]) -> list[float]:
    """Weights of one split's mixture (checked by `mixture_problems`): explicit, the Pile preset,
    or proportional to each dataset's tokens in the split."""
    if preset == "pile":
        return pile_weights(prefixes, tokens)
    if weights is not None:
        return [float(w) for w in weights]
    return [float(t) for t in tokens]


# -- splits ----------------------------------------------------------------------------------

def split_weights(split: str) -> list[float]:
    """'969,30,1' -> [969.0, 30.0, 1.0]: one to three non-negative weights separated by ',' or '/'
    with a positive sum; missing ones are 0 ('100' = everything to train)."""
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    try:
        w = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"split {split!r}: expected up to three comma-separated numbers, e.g. '969,30,1'") from None
    if not 1 <= len(w) <= 3 or any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"split {split!r}: expected 1 to 3 non-negative numbers with a positive sum, e.g. '969,30,1'")
    return w + [0.0] * (3 - len(w))


def parse_split(split: str, num_docs: int) -> list[tuple[int, int]]:
    """'969,30,1' -> train/valid/test document ranges [a, b) covering [0, num_docs).

    The weights (`split_weights`) are normalised; boundaries are rounded to whole documents.
    """
    w = split_weights(split)
    cum = np.cumsum(w) / sum(w)
    bounds = [0] + [int(round(c * num_docs)) for c in cum[:-1]] + [int(num_docs)]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# -- blending --------------------------------------------------------------------------------

def quantize_weights(weights: Sequence[float], period: int | None = None) -> np.ndarray:
    """Integer shares p_d summing to `period` (default BLEND_PERIOD), as close to weights*period
    as possible (largest remainder); any positive weight keeps at least one share."""
    period = int(period or BLEND_PERIOD)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"blend weights {list(weights)}: expected a non-empty list of non-negative numbers with a positive sum")
    if np.count_nonzero(w) > period:
        raise ConfigError(f"blend weights: {np.count_nonzero(w)} datasets exceed the blend resolution of {period}")
    ideal = w / w.sum() * period
    p = np.floor(ideal).astype(np.int64)
    short = period - int(p.sum())
    if short:
        order = np.argsort(-(ideal - p), kind="stable")
        p[order[:short]] += 1
    for d in np.flatnonzero((w > 0) & (p == 0)):
        p[np.argmax(p)] -= 1
        p[d] = 1
    return p


@functools.lru_cache(maxsize=8)
def _quota_schedule(shares: tuple[int, ...], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset of each of the first `steps` samples (steps <= period) and the sample's index
    within its dataset, by earliest-deadline-first with release times (see module docstring).

    With weights p_d / P, unit k of d (1-based) is released at slot floor((k-1)P / p_d) + 1 and
    due at slot ceil(kP / p_d): exact integer arithmetic, so no float rounding can break the bound.
    """
    P = sum(shares)
    ready = [((P + p - 1) // p, d) for d, p in enumerate(shares) if p > 0]  # (deadline of unit 1, d)
    heapq.heapify(ready)
    done = [0] * len(shares)
    released_at: dict[int, list[int]] = {}  # slot -> datasets whose next unit becomes placeable then
    which = np.empty(steps, dtype=np.int16 if len(shares) < 2**15 else np.int32)
    push, pop = heapq.heappush, heapq.heappop
    for n in range(1, steps + 1):
        waiting = released_at.pop(n, None)
        if waiting:
            for d in waiting:
                push(ready, (((done[d] + 1) * P + shares[d] - 1) // shares[d], d))
        if not ready:  # cannot happen: sum of ceil(w n) >= n always leaves a placeable unit
            raise RuntimeError(f"blend schedule stalled at sample {n}")
        deadline, d = pop(ready)
        if deadline < n:
            raise RuntimeError(f"blend schedule missed a deadline at sample {n}")
        which[n - 1] = d
        k = done[d] = done[d] + 1
        p = shares[d]
        release = k * P // p + 1  # first slot where unit k+1 does not put d a full sample ahead
        if release <= n + 1:
            push(ready, (((k + 1) * P + p - 1) // p, d))
        else:
            released_at.setdefault(release, []).append(d)
    # Index of each sample within its dataset: running count of earlier samples of the same dataset.
    rank = np.empty(steps, dtype=np.int64)
    order = np.argsort(which, kind="stable")
    counts = np.bincount(which, minlength=len(shares))
    firsts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank[order] = np.arange(steps) - np.repeat(firsts, counts)
    which.setflags(write=False)
    rank.setflags(write=False)
    return which, rank


def blend_counts(weights: Sequence[float], size: int) -> np.ndarray:
    """Samples each dataset serves in the first `size` samples of the blend."""
    p = quantize_weights(weights)
    period = int(p.sum())
    which, _ = _quota_schedule(tuple(int(x) for x in p), min(int(size), period))
    full, rest = divmod(int(size), period)
    return full * p + np.bincount(which[:rest], minlength=len(p))


class BlendedDataset:
    """`size` samples drawn from `datasets` in the proportions `weights` (see module docstring)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets = list(datasets)
        if len(self.datasets) != len(weights):
            raise ConfigError(f"BlendedDataset: {len(self.datasets)} datasets but {len(weights)} weights")
        self.size = int(size)
        self._shares = quantize_weights(weights)
        self.period = int(self._shares.sum())
        self.weights = self._shares / self.period
        self._which, self._rank = _quota_schedule(tuple(int(x) for x in self._shares), min(self.size, self.period))
        need = blend_counts(weights, self.size)
        for d, (ds, n) in enumerate(zip(self.datasets, need)):
            if len(ds) < n:
                raise DataError(f"BlendedDataset: dataset {d} ({getattr(ds, 'name', ds)}) has {len(ds)} samples, "
                                f"the blend of {self.size} needs {n}")

    def __len__(self) -> int:
        return self.size

    def locate(self, i):
        """(dataset, sample within dataset) of blended sample(s) i; works on arrays too."""
        q, r = np.divmod(i, self.period)
        d = self._which[r]
        return d, q * self._shares[d] + self._rank[r]

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"blended sample {i} out of range [0, {self.size})")
        d, s = self.locate(int(i))
        return self.datasets[int(d)][int(s)]
