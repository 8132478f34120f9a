"""Run lm-evaluation-harness tasks on our model, after training (tools/evaluate.py) or during it.

`run_tasks` is lm-eval's own `simple_evaluate` on a `NeoXLM`; its result has lm-eval's structure
(`results[task]["acc,none"]`, ...), and `lm_eval.utils.make_table` prints lm-eval's table.
`flatten_metrics` turns it into the `eval/<task>/<metric>` keys of metrics.jsonl.

`TrainingHarness` is the trainer's view: `after_step(state, last_step)` runs `eval.tasks` every
`eval.tasks_interval` steps (and after the last step) on the sharded training engine, logs the
metrics (metrics.jsonl, TensorBoard, wandb) and returns them. lm-eval reseeds Python's, numpy's and torch's global
generators; the training RNG states are put back afterwards, so evaluating does not change what
training does next (dropout masks, resume exactness).
"""
import contextlib
import functools
import logging
import math
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_neox.errors import ConfigError
from megatron_neox.evaluation.presets import expand_tasks


@functools.lru_cache(maxsize=8)
def task_manager(include_path: Optional[str] = None):
    """lm-eval's task index (built once per include path and process: indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(names: Sequence[str], manager) -> List[str]:
    """The task list with presets expanded; unknown names are a ConfigError listing close matches."""
    import difflib

    tasks = expand_tasks(names)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean {difflib.get_close_matches(t, known, n=3)}?" for t in unknown)
        raise ConfigError(f"unknown lm-eval task(s) {unknown} ({hints}); presets: neox20b, gpt3; local tasks need "
                          "their directory as --include-path / eval.include_path")
    return tasks


def run_tasks(lm, tasks: Sequence[str], *, num_fewshot: Optional[int] = None, include_path: Optional[str] = None,
              limit: Optional[float] = None, bootstrap_iters: int = 100000, manager=None,
              log_samples: bool = False) -> Optional[Dict[str, Any]]:
    """lm-eval's result dict (`results`, `versions`, `n-shot`, `configs`, ...) for `tasks` on `lm`;
    None on processes whose LOCAL_RANK is not 0 (lm-eval reports on a node's first process only)."""
    import lm_eval

    manager = manager or task_manager(include_path)
    names = check_tasks(tasks, manager)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, task_manager=manager, log_samples=log_samples)
    return out


def flatten_metrics(results: Dict[str, Any]) -> Dict[str, float]:
    """{'eval/<task>/<metric>': value} from lm-eval's `results` (stderr and aliases left out).

    lm-eval names a metric `name,filter`; the default filter `none` is dropped from the key
    (`acc,none` -> `acc`), others stay after an underscore (`exact_match,strict-match` ->
    `exact_match_strict-match`).
    """
    flat: Dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            # Metrics are `name,filter`; `alias` and `sample_len` are not.
            if not comma or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = name if filt == "none" else f"{name}_{filt}"
            flat[f"eval/{task}/{metric}"] = float(value)
    return flat


@contextlib.contextmanager
def preserved_rng():
    """Put the global RNG states (Python, numpy, torch CPU and accelerator) back afterwards."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class TrainingHarness:
    """`eval.tasks` on the training engine; see the module docstring."""

    def __init__(self, cfg, engine=None, topo=None, tokenizer=None, metrics=None):
        self.cfg, self.metrics = cfg, metrics
        self.enabled = bool(cfg.eval.tasks)
        if not self.enabled:
            return
        from megatron_neox.evaluation.backends import EngineModel
        from megatron_neox.evaluation.lm import NeoXLM

        self.manager = task_manager(cfg.eval.include_path)
        self.tasks = check_tasks(cfg.eval.tasks, self.manager)  # before the first step, not at the first eval
        backend = EngineModel(engine, topo, tokenizer.vocab_size, cfg.parallel.sequence_parallel)
        self.lm = NeoXLM(backend, tokenizer, max_length=cfg.model.seq_length, batch_size=cfg.train.micro_batch_size,
                         seed=cfg.train.seed, show_progress=False)

    def should_evaluate(self, step: int, last_step: int) -> bool:
        interval = self.cfg.eval.tasks_interval
        return self.enabled and (step == last_step or bool(interval and step % interval == 0))

    def after_step(self, state, last_step: int, trained: bool = True) -> bool:
        """The trainer's component convention (training/trainer.py): evaluate when due after a
        trained step; never asks the run to stop."""
        if trained and self.should_evaluate(state.iteration, last_step):
            self.evaluate(state.iteration)
        return False

    def evaluate(self, step: int) -> Dict[str, float]:
        """`eval/<task>/<metric>` values at `step`. Every rank must call it (the engine's forward
        passes are collective); the values come back on each node's first process (LOCAL_RANK 0,
        global rank 0 among them), the others get {}."""
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # lm-eval logs every task build at INFO on every rank
        try:
            with preserved_rng():
                out = run_tasks(self.lm, self.tasks, num_fewshot=self.cfg.eval.num_fewshot,
                                limit=self.cfg.eval.tasks_limit, bootstrap_iters=0, manager=self.manager)
        finally:
            quiet.setLevel(level)
        if out is None:  # not a node's first process: it ran the same requests, rank 0 logs
            return {}
        values = {k: v for k, v in flatten_metrics(out).items() if math.isfinite(v)}
        if self.metrics is not None:
            self.metrics.log({"step": step, **values})
        return values
