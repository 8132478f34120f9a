"""Nothing lost, round 3 (issue 19): what a hostile user found in the newer features. Each case
runs the CLI the way the user meets it (a subprocess) and checks the exit status, the message
and what is left on disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _train import REPO, config_dict, make_dataset

PYTHON = sys.executable
TOOLS = Path(REPO) / "tools"
TRAIN = os.path.join(REPO, "launch", "train.py")
TASKS = Path(REPO) / "tests" / "eval_tasks"


def _run(script, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    from test_robustness import _one_rank_env

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1", **_one_rank_env(), **(env or {})}
    return subprocess.run([PYTHON, str(script), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout)


def _clear_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    from test_robustness import _clear_error as clear

    return clear(r, *needles)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tokenizer (300 ids), a random dataset and a config writer for 1-rank runs of the tiny model."""
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    tmp = tmp_path_factory.mktemp("failures")
    texts = [f"city {i % 11} is where person {i} was born." for i in range(200)]
    tok, _ = train_bpe(((t, None) for t in texts), 300)
    save_tokenizer(tok, tmp / "tokenizer.json")
    make_dataset(str(tmp / "data" / "rand"))
    return tmp


def _config(tmp: Path, name: str, **overrides) -> Path:
    """A config for a run under tmp/name, sharing the module's dataset and tokenizer."""
    root = tmp / name
    cfg = config_dict(str(root), log__peak_tflops=1.0, train__iters=2, model__vocab_size=300,
                      tokenizer__path=str(tmp / "tokenizer.json"), **overrides)
    cfg["data"]["prefixes"] = [str(tmp / "data" / "rand")]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.json"
    path.write_text(json.dumps(cfg))
    return path


# ---- 1, 9, 15, 16, 18: lm-eval tasks are checked whole before any work ---------------------------


def test_training_checks_eval_tasks_few_shot_at_start_up(run_dir):
    cfg = _config(run_dir, "fewshot", eval__tasks=["mnx_choice"], eval__include_path=str(TASKS),
                  eval__num_fewshot=1000)
    r = _run(TRAIN, "--config", cfg)
    _clear_error(r, "mnx_choice", "eval.num_fewshot=1000", "holds 24 documents")
    assert not (run_dir / "fewshot" / "ckpt" / "latest").exists()


def test_a_failing_eval_task_during_training_costs_no_checkpoint(run_dir, tmp_path):
    """A task whose own code fails at evaluation time (start-up cannot see it): the run logs the
    failure, trains on and saves its last step."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (TASKS / "mnx_choice.yaml").read_text().replace("task: mnx_choice", "task: mnx_boom")
    yaml = yaml.replace("tests/eval_tasks/", str(TASKS) + "/") + "process_results: !function utils.boom\n"
    (tasks / "mnx_boom.yaml").write_text(yaml)
    (tasks / "utils.py").write_text("def boom(doc, results):\n    raise RuntimeError('task code failed')\n")
    cfg = _config(run_dir, "boom", eval__tasks=["mnx_boom"], eval__include_path=str(tasks), eval__tasks_interval=1,
                  eval__tasks_limit=2, checkpoint__save_interval=1)
    r = _run(TRAIN, "--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval.tasks at step 1 failed, training goes on: RuntimeError: task code failed" in r.stdout
    ckpt = run_dir / "boom" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    errors = [json.loads(line) for line in (run_dir / "boom" / "log" / "metrics.jsonl").read_text().splitlines()
              if "eval_tasks_error" in line]
    assert [e["step"] for e in errors] == [1, 2]


@pytest.fixture(scope="module")
def bad_tasks(tmp_path_factory):
    """A task directory with a YAML naming an unknown output_type and one that is not YAML."""
    bad = tmp_path_factory.mktemp("bad_tasks")
    yaml = (TASKS / "mnx_choice.yaml").read_text().replace("tests/eval_tasks/", str(TASKS) + "/")
    (bad / "mnx_choice.yaml").write_text(yaml.replace("output_type: multiple_choice", "output_type: frobnicate"))
    (bad / "broken.yaml").write_text("task: [mnx_other\n")
    return bad


def test_evaluate_cli_refuses_an_empty_task_list_before_reading_the_checkpoint(tmp_path):
    r = _run(TOOLS / "evaluate.py", "--checkpoint", tmp_path / "no_checkpoint", "--tasks", ",")
    _clear_error(r, "--tasks ','", "names no task")


@pytest.mark.parametrize("args, needles", [
    (["--tasks", ""], ["--tasks ''", "names no task"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS, "--limit", "0"], ["--limit=0.0", "expected > 0"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS, "--limit", "-1"], ["--limit=-1.0", "expected > 0"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS, "--num-fewshot", "1000"],
     ["'mnx_choice'", "1000 few-shot", "--num-fewshot=1000", "holds 24 documents"]),
    (["--tasks", "mnx_choice", "--include-path", "BAD"], ["mnx_choice.yaml", "invalid output_type 'frobnicate'"]),
    (["--tasks", "mnx_other", "--include-path", "BAD"], ["unknown lm-eval task(s) ['mnx_other']", "--include-path",
                                                         "broken.yaml", "line 2"]),
    (["--tasks", "mnx_choice", "--include-path", "MISSING"], ["--include-path", "missing: no such directory"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS / "mnx_choice.yaml"], ["mnx_choice.yaml: is a file"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS, "--output", "DIR"], ["--output", "is a directory"]),
    (["--tasks", "mnx_choice", "--include-path", TASKS, "--output", "FILE/out.json"], ["is a file, not a directory"]),
])
def test_evaluate_refuses_bad_tasks_and_outputs_before_loading_the_model(bad_tasks, tmp_path, capsys, args, needles):
    """The checkpoint does not exist: each error must come before it is read (seconds, not a whole
    evaluation). In-process (tools/evaluate.py's main), so lm-eval's task index is built once."""
    from _train import load_tool

    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("x")
    subst = {"BAD": bad_tasks, "MISSING": tmp_path / "missing", "DIR": tmp_path / "DIR",
             "FILE/out.json": tmp_path / "FILE" / "out.json"}
    argv = ["--checkpoint", str(tmp_path / "no_checkpoint"), *[str(subst.get(a, a)) for a in args]]
    assert load_tool("evaluate").main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err[-3000:])
    assert "no_checkpoint" not in err
