"""Run lm-evaluation-harness tasks on our model, after training (tools/evaluate.py) or during it.

`run_tasks` is lm-eval's own `simple_evaluate` on a `NeoXLM`; its result has lm-eval's structure
(`results[task]["acc,none"]`, ...), and `lm_eval.utils.make_table` prints lm-eval's table.
`flatten_metrics` turns it into the `eval/<task>/<metric>` keys of metrics.jsonl.

`TrainingHarness` is the trainer's view: `maybe_evaluate(step, last_step)` runs `eval.tasks` every
`eval.tasks_interval` steps (and after the last step) on the sharded training engine and returns
the metrics for the metrics record. lm-eval reseeds Python's, numpy's and torch's global
generators; the training RNG states are put back afterwards, so evaluating does not change what
training does next (dropout masks, resume exactness).
"""
import contextlib
import logging
import math
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_neox.errors import ConfigError
from megatron_neox.evaluation.presets import expand_tasks


def task_manager(include_path: Optional[str] = None):
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
              log_samples: bool = False) -> Dict[str, Any]:
    """lm-eval's result dict (`results`, `versions`, `n-shot`, `configs`, ...) for `tasks` on `lm`."""
    import lm_eval

    manager = manager or task_manager(include_path)
    names = check_tasks(tasks, manager)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, task_manager=manager, log_samples=log_samples)
    # lm-eval returns None on ranks other than its rank 0; our LM reports rank 0 on every rank.
    if out is None:
        raise ConfigError("lm-eval returned no results")
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
            name, _, filt = key.partition(",")
            if name == "alias" or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = name if filt in ("", "none") else f"{name}_{filt}"
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

    def __init__(self, cfg, engine=None, topo=None, tokenizer=None):
        self.cfg = cfg
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

    def due(self, step: int, last_step: int) -> bool:
        interval = self.cfg.eval.tasks_interval
        return self.enabled and (step == last_step or bool(interval and step % interval == 0))

    def maybe_evaluate(self, step: int, last_step: int) -> Dict[str, float]:
        """`eval/<task>/<metric>` values when evaluation is due at `step`, else {} (on every rank)."""
        if not self.due(step, last_step):
            return {}
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # lm-eval logs every task build at INFO on every rank
        try:
            with preserved_rng():
                out = run_tasks(self.lm, self.tasks, num_fewshot=self.cfg.eval.num_fewshot,
                                limit=self.cfg.eval.tasks_limit, bootstrap_iters=0, manager=self.manager)
        finally:
            quiet.setLevel(level)
        return {k: v for k, v in flatten_metrics(out).items() if math.isfinite(v)}
