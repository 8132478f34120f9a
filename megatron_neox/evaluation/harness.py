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
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_neox.errors import ConfigError
from megatron_neox.evaluation.presets import expand_tasks


def task_manager(include_path: Optional[str] = None, names: Sequence[str] = ()):
    """lm-eval's task index for `names` (each index built once per process).

    Indexing lm-eval's own task YAMLs takes ~5 s of CPU, paid by every rank of a training run with
    eval.tasks. When every name (presets expanded) is a plain task of `include_path`, that
    directory alone is indexed; else (a built-in task, a group, an unknown name, no names) all of
    lm-eval's too, with `include_path` taking precedence as lm-eval does."""
    tasks = expand_tasks(names)
    if include_path is not None and tasks:
        own = _task_index(include_path, include_defaults=False)
        if set(tasks) <= set(own.all_subtasks):
            return own
    return _task_index(include_path, include_defaults=True)


@functools.lru_cache(maxsize=8)
def _task_index(include_path: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_include_path(include_path: Optional[str], flag: str = "--include-path") -> None:
    """A task directory that is missing or a file is named as such (lm-eval would only say that
    the tasks in it are unknown)."""
    if include_path is None:
        return
    path = Path(include_path)
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such directory (expected the directory of the task YAMLs)")
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, expected the directory of the task YAMLs")


def _broken_yamls(include_path: Optional[str]) -> List[str]:
    """'file: reason' for each YAML under `include_path` that lm-eval's index skips (it drops a
    YAML it cannot read without a word, so its tasks look unknown)."""
    if include_path is None:
        return []
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    broken = []
    for yaml_path in sorted(Path(include_path).glob("**/*.yaml")):
        try:  # what lm-eval's TaskIndex.build does for each file
            TaskIndex.process_cfg(load_yaml(yaml_path, resolve_func=False, recursive=True), yaml_path, {})
        except Exception as e:  # noqa: BLE001 -- any reason lm-eval skips the file is worth naming
            broken.append(f"{yaml_path}: {type(e).__name__}: {e}")
    return broken


def check_tasks(names: Sequence[str], manager, include_path: Optional[str] = None,
                flag: str = "--include-path") -> List[str]:
    """The task list with presets expanded; unknown names are a ConfigError listing close matches,
    the include path and the YAMLs in it that lm-eval could not read."""
    import difflib

    check_include_path(include_path, flag)
    tasks = expand_tasks(names)
    if not tasks or any(not t.strip() for t in tasks):
        raise ConfigError(f"the task list {list(names)!r} names no task (or an empty one); name lm-eval tasks, "
                          "comma-separated, or a preset: neox20b, gpt3")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean {difflib.get_close_matches(t, known, n=3)}?" for t in unknown)
        where = (f"not in {flag} {include_path} nor among lm-eval's tasks" if include_path else
                 f"local tasks need their directory as {flag}")
        broken = _broken_yamls(include_path)
        unreadable = f"; task YAMLs lm-eval could not read: {'; '.join(broken)}" if broken else ""
        raise ConfigError(f"unknown lm-eval task(s) {unknown} ({hints}); presets: neox20b, gpt3; "
                          f"{where}{unreadable}")
    return tasks


def _fewshot_asked(task, num_fewshot: Optional[int]) -> Tuple[int, bool]:
    """(few-shot examples lm-eval will draw per document, as `simple_evaluate` decides it -- a task
    configured with 0 keeps 0; whether they come from the evaluated split, where the sampler
    draws one more to leave the document itself out)."""
    own = task.get_config("num_fewshot")
    n = (own if (num_fewshot is None or own == 0) else num_fewshot) or 0
    fewshot = getattr(task, "fewshot_cfg", None)
    return n, fewshot is not None and fewshot.split == task.config.test_split


def check_task_setup(names: Sequence[str], manager, *, num_fewshot: Optional[int] = None,
                     limit: Optional[float] = None, include_path: Optional[str] = None,
                     flags: Tuple[str, str, str] = ("--include-path", "--num-fewshot", "--limit")) -> List[str]:
    """Everything lm-eval would otherwise fail on mid-run, checked before any model work: the
    names, each task built (its YAML, `output_type`, its data reachable), enough documents for
    the few-shot count, a positive limit. Returns the expanded task list; a ConfigError naming
    the task, its YAML and the `flags` (include path, few-shot, limit) otherwise."""
    include_flag, fewshot_flag, limit_flag = flags
    if limit is not None and not limit > 0:
        raise ConfigError(f"{limit_flag}={limit}: expected > 0 (examples per task, or a fraction below 1)")
    tasks = check_tasks(names, manager, include_path, include_flag)
    built, problems = {}, []
    for name in tasks:
        entry = manager.task_index.get(name)
        yaml = f" ({entry.yaml_path})" if entry is not None and entry.yaml_path else ""
        try:
            built.update(manager.load([name])["tasks"])
        except ConnectionError as e:  # `datasets` and the Hub's offline errors are ConnectionErrors
            problems.append(f"lm-eval task {name!r}{yaml} needs its data set from the network (the Hugging Face Hub), "
                            f"and it is not in the local cache: {e}; {_offline_hint(include_flag)}")
        except Exception as e:  # noqa: BLE001 -- lm-eval raises what its task code and `datasets` raise
            problems.append(f"lm-eval task {name!r}{yaml} cannot be built: {type(e).__name__}: {e}")
    for name, task in built.items():
        n, same_split = _fewshot_asked(task, num_fewshot)
        docs = task.fewshot_docs() if n else None
        if docs is not None and len(docs) < n + same_split:
            problems.append(
                f"lm-eval task {name!r}: {n} few-shot examples per document ({fewshot_flag}={num_fewshot}, the "
                f"task's own {task.get_config('num_fewshot')}) but its few-shot split holds {len(docs)} documents"
                f"{' (one of them the evaluated document itself)' if same_split else ''}; ask for fewer")
    if problems:  # every one at once: a user fixing them one launch at a time waits for each
        raise ConfigError("\n".join(problems))
    return tasks


def _offline_hint(include_flag: str) -> str:
    """What to do about a hub data set that cannot be fetched: the offline switches that are on, if any."""
    import os

    on = [f"{k}={os.environ[k]}" for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
          if os.environ.get(k, "").lower() in ("1", "true", "yes", "on")]
    where = (f"offline mode is on ({', '.join(on)}): download it where there is network and copy the cache (HF_HOME)"
             if on else "check the network, or download it where there is network and copy the cache (HF_HOME)")
    return f"{where}; or evaluate a local task (a YAML with dataset_path: json, its directory as {include_flag})"


def run_tasks(lm, tasks: Sequence[str], *, num_fewshot: Optional[int] = None, include_path: Optional[str] = None,
              limit: Optional[float] = None, bootstrap_iters: int = 100000, manager=None,
              log_samples: bool = False) -> Optional[Dict[str, Any]]:
    """lm-eval's result dict (`results`, `versions`, `n-shot`, `configs`, ...) for `tasks` on `lm`;
    None on processes whose LOCAL_RANK is not 0 (lm-eval reports on a node's first process only)."""
    import lm_eval

    manager = manager or task_manager(include_path, tasks)
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


def check_training_tasks(cfg) -> List[str]:
    """eval.tasks checked whole (`check_task_setup`) with the config's key names; [] when none."""
    if not cfg.eval.tasks:
        return []
    check_include_path(cfg.eval.include_path, "eval.include_path")  # before lm-eval indexes it
    return check_task_setup(cfg.eval.tasks, task_manager(cfg.eval.include_path, cfg.eval.tasks),
                            num_fewshot=cfg.eval.num_fewshot, limit=cfg.eval.tasks_limit,
                            include_path=cfg.eval.include_path,
                            flags=("eval.include_path", "eval.num_fewshot", "eval.tasks_limit"))


class TrainingHarness:
    """`eval.tasks` on the training engine; see the module docstring."""

    def __init__(self, cfg, engine=None, topo=None, tokenizer=None, metrics=None, tasks: Optional[List[str]] = None):
        """`tasks`: what `check_training_tasks(cfg)` returned (the trainer calls it before building
        the model, so a bad task costs seconds); checked here when not given."""
        self.cfg, self.metrics = cfg, metrics
        self.enabled = bool(cfg.eval.tasks)
        if not self.enabled:
            return
        from megatron_neox.evaluation.backends import EngineModel
        from megatron_neox.evaluation.lm import NeoXLM

        self.manager = task_manager(cfg.eval.include_path, cfg.eval.tasks)
        self.tasks = tasks if tasks is not None else check_training_tasks(cfg)
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
        except Exception as e:  # noqa: BLE001 -- see below
            # What start-up could check it did; what is left (a task's own code, its data going away)
            # must not cost the run its next checkpoint: every rank runs the same requests and fails
            # alike, so each goes on training (rank 0 logs the failure).
            record = {"step": step, "eval_tasks_error": f"{type(e).__name__}: {e}"}
            if self.metrics is not None:
                self.metrics.log(record)  # rank 0 prints it (training/metrics.py) and keeps it in metrics.jsonl
            else:
                print(f"warning: eval.tasks at step {step} failed, training goes on: {record['eval_tasks_error']}",
                      flush=True)
            return {}
        finally:
            quiet.setLevel(level)
        if out is None:  # not a node's first process: it ran the same requests, rank 0 logs
            return {}
        values = {k: v for k, v in flatten_metrics(out).items() if math.isfinite(v)}
        if self.metrics is not None:
            self.metrics.log({"step": step, **values})
        return values
