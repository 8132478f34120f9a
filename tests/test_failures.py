"""Nothing lost, round 3 (issue 19): what a hostile user found in the newer features. Each case
runs the CLI the way the user meets it (a subprocess of launch/train.py or tools/*.py, or a tool's
`main` in-process where only argument checks run) and checks the exit status, the message and what
is left on disk; the data-path cases (skips, rollbacks) drive the trainer's own sizing and loader.
Most cases share one 2-step run (`trained`), resumed, resharded and locked in turn."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _train import REPO, config_dict, make_dataset
from test_robustness import _clear_error, _one_rank_env

PYTHON = sys.executable
TOOLS = Path(REPO) / "tools"
TRAIN = os.path.join(REPO, "launch", "train.py")
TASKS = Path(REPO) / "tests" / "eval_tasks"


def _run(script, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1", **_one_rank_env(), **(env or {})}
    return subprocess.run([PYTHON, str(script), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tokenizer (300 ids), a random dataset and a config writer for 1-rank runs of the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    tmp = tmp_path_factory.mktemp("failures")
    texts = [f"city {i % 11} is where person {i} was born." for i in range(200)]
    tok, _ = train_bpe(((t, None) for t in texts), 300)
    save_tokenizer(tok, tmp / "tokenizer.json")
    make_dataset(str(tmp / "data" / "rand"))
    plain = Tokenizer(models.BPE())  # no <|endoftext|>: fine for a run that uses no end-of-document feature
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain.save(str(tmp / "no_eod_tokenizer.json"))
    return tmp


def _config(tmp: Path, name: str, **overrides) -> Path:
    """A config for a run under tmp/name, sharing the module's dataset and tokenizer."""
    root = tmp / name
    cfg = config_dict(str(root), **{"log__peak_tflops": 1.0, "train__iters": 2, "model__vocab_size": 300,
                                    "tokenizer__path": str(tmp / "tokenizer.json"), **overrides})
    cfg["data"]["prefixes"] = [str(tmp / "data" / "rand")]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.json"
    path.write_text(json.dumps(cfg))
    return path


# ---- 1, 9, 15, 16, 18: lm-eval tasks are checked whole before any work ---------------------------


def test_training_checks_eval_tasks_at_start_up_naming_every_problem(run_dir):
    """Item 1: more few-shot examples than a task has, and a hub task whose data set is not cached
    (no network: HF_DATASETS_OFFLINE=1), are both named (one launch, not one per problem), exit 2
    before the model is built."""
    cfg = _config(run_dir, "fewshot", eval__tasks=["mnx_choice", "lambada_openai"], eval__include_path=str(TASKS),
                  eval__num_fewshot=1000)
    r = _run(TRAIN, "--config", cfg)
    _clear_error(r, "'mnx_choice'", "eval.num_fewshot=1000", "holds 24 documents",
                 "lm-eval task 'lambada_openai' (", "lambada_openai.yaml) needs its data set from the network (the "
                 "Hugging Face Hub), and it is not in the local cache", "offline mode is on (HF_DATASETS_OFFLINE=1",
                 "or evaluate a local task (a YAML with dataset_path: json, its directory as eval.include_path)")
    assert not (run_dir / "fewshot" / "ckpt" / "latest").exists()


@pytest.fixture(scope="module")
def trained(run_dir, tmp_path_factory):
    """One 1-rank run of 2 steps at ZeRO-1, saving every step, with an lm-eval task whose own code
    fails at evaluation time (start-up cannot see it). Later tests resume it, reshard it, lock it."""
    tasks = tmp_path_factory.mktemp("boom_tasks")
    yaml = (TASKS / "mnx_choice.yaml").read_text().replace("task: mnx_choice", "task: mnx_boom")
    yaml = yaml.replace("tests/eval_tasks/", str(TASKS) + "/") + "process_results: !function utils.boom\n"
    (tasks / "mnx_boom.yaml").write_text(yaml)
    (tasks / "utils.py").write_text("def boom(doc, results):\n    raise RuntimeError('task code failed')\n")
    cfg = _config(run_dir, "run", eval__tasks=["mnx_boom"], eval__include_path=str(tasks), eval__tasks_interval=1,
                  eval__tasks_limit=2, checkpoint__save_interval=1, zero__stage=1)
    r = _run(TRAIN, "--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"cfg": cfg, "root": run_dir / "run", "ckpt": run_dir / "run" / "ckpt", "out": r.stdout}


def test_a_failing_eval_task_during_training_costs_no_checkpoint(trained):
    """Issue 19 item 1: the failure is logged (stdout and metrics.jsonl) and training goes on to save."""
    assert "eval.tasks at step 1 failed, training goes on: RuntimeError: task code failed" in trained["out"]
    assert (trained["ckpt"] / "latest").read_text().strip() == "global_step2"
    lines = (trained["root"] / "log" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "eval_tasks_error" in line] == [1, 2]


def _losses(log_dir: Path) -> dict:
    return {x["step"]: x["loss"] for x in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in x}


def test_readme_universal_resume_recipe_on_one_fp32_rank_with_zero_auto(trained, tmp_path):
    """Item 14, the README's recipe as a user runs it: tools/reshard.py to a universal checkpoint
    (of step 1), then launch/train.py with checkpoint.load=<it> on one fp32 rank at zero.stage auto
    (which picks ZeRO-1: DeepSpeed loads universal optimizer state into ZeRO only). Step 2 trains to
    the uninterrupted run's loss (the tolerance of the universal resumes in test_training.py)."""
    import math

    from _train import load_tool

    universal = tmp_path / "universal"
    assert load_tool("reshard").main(["--checkpoint", str(trained["ckpt"]), "--out", str(universal),
                                      "--tag", "global_step1"]) == 0
    r = _run(TRAIN, "--config", trained["cfg"], "--set", "zero.stage=auto", f"checkpoint.load={universal}",
             f"checkpoint.dir={tmp_path / 'ckpt'}", f"log.dir={tmp_path / 'log'}", "eval.tasks=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZeRO-1 (auto: " in r.stdout and "universal" in r.stdout.split("ZeRO-1 (auto: ")[1].split(")")[0]
    resumed, straight = _losses(tmp_path / "log"), _losses(trained["root"] / "log")
    assert list(resumed) == [2]
    assert math.isclose(resumed[2], straight[2], rel_tol=1e-5), (resumed, straight)


def test_reshard_refuses_to_write_into_another_runs_checkpoint_dir(trained, tmp_path):
    """Item 2: --out holding a training checkpoint (a copy of the run, as another run B) is refused
    before any conversion; B's `latest` still names its own step."""
    other = tmp_path / "B" / "ckpt"
    shutil.copytree(trained["ckpt"], other)
    r = _run(TOOLS / "reshard.py", "--checkpoint", trained["ckpt"], "--out", other)
    _clear_error(r, f"--out {other}: global_step1 there is a training checkpoint")
    assert (other / "latest").read_text().strip() == "global_step2"
    assert not (other / "latest_universal").exists()


def test_a_second_run_on_a_locked_checkpoint_dir_is_refused_naming_the_holder(trained):
    """Item 3: another live run holds checkpoint.dir (here this test process holds its lock): the
    new run exits 2 naming that run's pid and host, before building anything."""
    import fcntl
    import socket

    lock = trained["ckpt"] / ".run.lock"
    with open(lock, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
        f.flush()
        r = _run(TRAIN, "--config", trained["cfg"], "--set", "train.iters=3")
    _clear_error(r, f"checkpoint.dir {trained['ckpt']}: in use by another run (pid {os.getpid()} on host "
                    f"{socket.gethostname()}")
    assert (trained["ckpt"] / "latest").read_text().strip() == "global_step2"


def test_resume_repairs_a_torn_metrics_tail_rebuilds_a_bad_cache_and_ignores_a_dead_runs_lock(trained):
    """Items 4, 13, 3: the run before was cut mid-record in metrics.jsonl, one cached index array was
    truncated, and the lock file names a run that is gone (no flock held): the resumed run says so
    for the first two, goes on, and plot_metrics reads the result."""
    from _train import load_tool

    log = trained["root"] / "log" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 4.')
    cache = sorted((trained["root"].parent / "data").rglob("*_doc_idx.npy"))[0]
    cache.write_bytes(cache.read_bytes()[:-8])
    (trained["ckpt"] / ".run.lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "gone", "started": "then"}))
    # Item 18 too: a tokenizer without <|endoftext|> is fine when nothing needs the end-of-document id.
    r = _run(TRAIN, "--config", trained["cfg"], "--set", "train.iters=3", "eval.tasks=[]",
             f"tokenizer.path={trained['root'].parent / 'no_eod_tokenizer.json'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{log}: its last line was cut mid-record (22 bytes without a newline" in r.stdout
    assert f"{cache} holds" in r.stderr and "were written (truncated or replaced); rebuilding it" in r.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3]
    assert (trained["ckpt"] / "latest").read_text().strip() == "global_step3"
    assert load_tool("plot_metrics").main([str(log.parent), "--out", str(trained["root"] / "loss.png")]) == 0


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


# ---- 11, 12, 18: refused at start-up -----------------------------------------------------


def test_flex_attention_on_cpu_is_refused_before_anything_is_written_or_built(run_dir):
    """Item 11: FlexAttention has no CPU backward; with the EOD flags that make it mask documents
    (data.reset_attention_mask) it is refused at set-up, with the resolved config: no checkpoint or
    log directory made, no data index cached."""
    root = run_dir / "flex"
    cfg = _config(run_dir, "flex", data__reset_attention_mask=True, data__cache_dir=str(root / "cache"))
    r = _run(TRAIN, "--config", cfg, "--set", "model.attention_kernel=flex")
    _clear_error(r, "model.attention_kernel='flex' cannot train on the CPU")
    assert sorted(p.name for p in root.iterdir()) == ["config.json"]


def test_config_errors_found_when_the_config_is_read(tmp_path, capsys):
    """Item 12: a config that is not UTF-8 is named with its line; item 18: inject_spike_at under
    on_spike=abort (which looks for no spikes) is refused. launch/train.py's main, in-process: both
    come before any process group is joined."""
    train_main = _load_train()
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{\n  "comment": "caf\xe9"\n}\n')
    assert train_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8 text (byte b'\\xe9' at offset 19)" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(config_dict(str(tmp_path), train__inject_spike_at=[3])))
    assert train_main(["--config", str(good)]) == 2
    assert "train.inject_spike_at=[3] tests the rollback policy" in capsys.readouterr().err


def _load_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ---- 14: the README's universal-resume recipe on one fp32 rank ----------------------------------------


def test_zero_auto_picks_zero_1_to_load_a_universal_checkpoint_on_one_rank(tmp_path):
    """Item 14: at one data-parallel rank fp32 'auto' means ZeRO-0, which DeepSpeed cannot load a
    universal checkpoint's optimizer state into; with checkpoint.load naming one, 'auto' picks ZeRO-1."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.precision import auto_zero_stage

    universal = tmp_path / "universal"
    (universal / "global_step4").mkdir(parents=True)
    (universal / "global_step4" / "complete.json").write_text(json.dumps({"universal": True, "iteration": 4}))
    (universal / "latest").write_text("global_step4")
    plain = config_from_dict(config_dict(str(tmp_path), zero__stage="auto"))
    assert auto_zero_stage(plain, dp=1)[0] == 0
    loading = config_from_dict(config_dict(str(tmp_path), zero__stage="auto", checkpoint__load=str(universal)))
    stage, why = auto_zero_stage(loading, dp=1)
    assert stage == 1 and "universal" in why


# ---- 17, 18: signals and deaths under the launchers ------------------------------------------------


def test_sigterm_to_the_plain_deepspeed_runner_makes_its_rank_save_and_exit(run_dir):
    """Item 17: `deepspeed --num_gpus 1 launch/train.py ...` and SIGTERM to the runner's pid. The
    runner dies of it (DeepSpeed's own code, exit 143); the rank notices its runner is gone,
    finishes the step, saves it and exits, and its per-node launcher with it: nothing trains on."""
    import psutil
    import signal
    import time

    from megatron_neox.ranks import free_port
    from test_launch import DEEPSPEED, _env, _kill_all, _latest_checkpoint, _start, _tail, _train_steps, _wait_for_step

    cfg = _config(run_dir, "runner", train__iters=300)
    root = run_dir / "runner"
    out = root / "deepspeed.out"
    # The runner through this interpreter (as `deepspeed` does via its shebang): its ranks then import
    # DeepSpeed from the same path as every other launch here. Through a venv reached by two paths (a
    # worktree's symlinked .venv), torch would rebuild DeepSpeed's shm extension at each change of path.
    proc = _start([PYTHON, DEEPSPEED, "--num_gpus", "1", "--master_port", str(free_port()), TRAIN, "--config",
                   str(cfg)], _env(), out)
    try:
        _wait_for_step(root / "log", 2, [proc], out, timeout=300)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        deadline = time.monotonic() + 180
        while [p for p in psutil.process_iter() if _session_of(p) == proc.pid]:
            assert time.monotonic() < deadline, f"the rank trains on as an orphan:\n{_tail(out)}"
            time.sleep(0.5)
    finally:
        _kill_all([proc])
    steps = _train_steps(root / "log")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 300
    iteration, _ = _latest_checkpoint(root / "ckpt")
    assert iteration == steps[-1], _tail(out)  # the step in flight, saved
    assert "the deepspeed runner (pid" in out.read_text() and "is gone" in out.read_text()


def _session_of(p) -> int:
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return -1


def test_run_py_names_the_rank_that_died_and_the_signal(tmp_path, capsys):
    """Item 18: DeepSpeed's per-node launcher exits 247 when a rank is SIGKILLed (256 - 9); launch/run.py
    says which announced rank never reported its exit, and how it died. Its decision function on
    the files two ranks leave (one reported, one killed)."""
    from megatron_neox.training.preemption import _exit_status

    (tmp_path / "rank-101.json").write_text(json.dumps({"rank": "0"}))
    (tmp_path / "rank-102.json").write_text(json.dumps({"rank": "1"}))
    (tmp_path / "exit-101.json").write_text(json.dumps({"rank": "0", "code": 1, "stopped_by_signal": False}))
    assert _exit_status(247, tmp_path, signalled=False) == 247
    err = capsys.readouterr().err
    assert "rank 1 (pid 102) died without reporting its exit: killed by SIGKILL (the launcher's exit 247" in err
    assert "rank 0" not in err


# ---- 5, 6: skipped batches and rollbacks --------------------------------------------------------------


def _trained_tokens(tmp: Path, iters: int, **overrides) -> list:
    """The tokens of each global batch a 1-rank run of `iters` steps trains on, through the trainer's
    own dataset sizing and the loader (no model: what the data path hands the step)."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.data.loader import BatchLoader, build_datasets
    from megatron_neox.resolve import resolve
    from megatron_neox.training.schedules import Schedule
    from megatron_neox.training.trainer import _dataset_sizes

    cfg = resolve(config_from_dict(config_dict(str(tmp), train__iters=iters, **overrides)), 1)
    train_ds, _, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                                    num_samples=_dataset_sizes(cfg, Schedule.from_config(cfg)))
    loader = BatchLoader(train_ds, micro_batch_size=2, dp_rank=0, dp_size=1,
                         skip_ranges=cfg.data.skip_batches)
    out = [np.concatenate([m["tokens"].numpy().ravel() for m in loader.next_global_batch(8)]) for _ in range(iters)]
    assert loader.consumed_samples <= len(train_ds)  # never past the end: no wrap into the first samples
    return out


@pytest.mark.parametrize("blend, skips", [(True, [[1, 3]]), (False, [[0, 10]])])
def test_skipped_batches_are_covered_by_the_dataset_and_keep_a_longer_run_prefix_stable(tmp_path, blend, skips):
    """Item 5: a run of 4 steps with data.skip_batches trains on the first 4 batches of the same run
    at 8 steps (blended data or one prefix), and none of them repeats an earlier one."""
    prefixes = [str(tmp_path / "data" / "rand")]
    make_dataset(prefixes[0])
    if blend:
        prefixes.append(make_dataset(str(tmp_path / "data" / "other"), seed=1))
    short = _trained_tokens(tmp_path, 4, data__prefixes=prefixes, data__skip_batches=skips)
    long = _trained_tokens(tmp_path, 8, data__prefixes=prefixes, data__skip_batches=skips)
    for a, b in zip(short, long):
        assert np.array_equal(a, b)
    assert len({t.tobytes() for t in long}) == 8


def test_rollback_room_is_reserved_and_repeated_rollbacks_skip_onward(tmp_path):
    """Items 5 and 6: with on_spike=rollback the train split holds room for every rollback's skip,
    and a second rollback to the same checkpoint skips the batches after the first one's range."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.training.checkpointer import TrainState
    from megatron_neox.training.spikes import SpikePolicy
    from megatron_neox.training.trainer import train_batches_needed

    cfg = config_from_dict(config_dict(str(tmp_path), train__iters=5, train__on_spike="rollback",
                                       checkpoint__save_interval=2, train__spike_skip_batches=3,
                                       train__max_rollbacks=2, data__skip_batches=[[1, 3], [2, 4], [100, 200]]))
    assert train_batches_needed(cfg, 5) == 5 + 3 + 2 * 3  # [1, 4) merged; [100, 200) lies past the run
    policy, restored = SpikePolicy(cfg), TrainState(iteration=6, consumed_batches=8)
    first = policy.record(9, 5.0, "spike", restored, [])
    second = policy.record(9, 5.0, "spike", restored, [first])
    assert first["skipped_batches"] == [8, 11] and second["skipped_batches"] == [11, 14]


def test_repeated_rollbacks_to_one_checkpoint_skip_onward_and_eod_flags_without_eod_warn(run_dir):
    """Item 6 through launch/train.py (the issue's command scaled down, spikes injected so that two
    of them roll back to one checkpoint): the second rollback to step 6 skips the batches after the
    first one's, the replayed step 7 trains on other data each time, and the run ends. Item 8 in
    the same launch: the EOD flags on data preprocessed without --append-eod are said, with numbers."""
    from test_robustness import _write_index

    rng = np.random.default_rng(0)
    prefix = _write_index(run_dir / "no_eod" / "data", [rng.integers(2, 96, 40) for _ in range(200)])
    cfg = _config(run_dir, "rollbacks", train__iters=10, checkpoint__save_interval=3, train__on_spike="rollback",
                  train__spike_skip_batches=2, train__max_rollbacks=2, train__inject_spike_at=[7, 8],
                  data__reset_attention_mask=True, data__eod_mask_loss=True)
    r = _run(TRAIN, "--config", cfg, "--set", f"data.prefixes=[\"{prefix}\"]")
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "rollbacks" / "log" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [(x["step"], x["rollback_to"], x["skipped_batches"]) for x in records if "rollback_to" in x]
    assert rollbacks == [(7, 6, [6, 8]), (8, 6, [8, 10])]
    trained = [(x["step"], x["loss"]) for x in records if "loss" in x]
    assert [step for step, _ in trained] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert trained[6][1] != trained[7][1]  # step 7 after each rollback: batch 8, then batch 10
    assert (run_dir / "rollbacks" / "ckpt" / "latest").read_text().strip() == "global_step10"
    # (10 steps + 2 rollbacks x 2 skipped batches) x 8 samples of 17 tokens
    assert ("data.eod_mask_loss, data.reset_attention_mask: the first 112 training samples (1,904 tokens)" in r.stdout
            and "hold no end-of-document token (id 0), so these flags change nothing" in r.stdout), r.stdout[-3000:]


# ---- 7, 10: resuming under another data setup; a full disk during a save ------------------------------


def test_resume_with_a_changed_data_setup_is_refused_naming_key_and_values(trained):
    """Item 7: the saved data position counts samples of the checkpoint's order; another seed or
    sequence length would read other data from it. Refused (exit 2) with each key and both values,
    at start-up: no sample index is built for the new seed and length."""
    cached = sorted((trained["root"].parent / "data").rglob("*.npy"))
    r = _run(TRAIN, "--config", trained["cfg"], "--set", "train.iters=4", "train.seed=42", "model.seq_length=8",
             "eval.tasks=[]")
    _clear_error(r, "resuming with another data setup", "model.seq_length: checkpoint 16, now 8",
                 "train.seed: checkpoint 1234, now 42", "checkpoint.allow_data_change=true")
    assert sorted((trained["root"].parent / "data").rglob("*.npy")) == cached


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_during_a_save_is_named_and_latest_kept(trained, tmp_path):
    """Item 10: checkpoint.dir on a tmpfs with room for one checkpoint of this model (a real full
    disk, ENOSPC from the kernel): the second save fails with exit 2 naming the file and "No space
    left on device", and `latest` still names the first."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    room = int(_tree_bytes(trained["ckpt"] / "global_step1") * 1.5)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cfg = _config(trained["root"].parent, "full", train__iters=3, checkpoint__save_interval=1, zero__stage=1,
                      checkpoint__dir=str(mnt / "ckpt"))
        r = _run(TRAIN, "--config", cfg)
        _clear_error(r, str(mnt / "ckpt" / "global_step2"), "No space left on device",
                     "`latest` still names the last complete checkpoint")
        assert (mnt / "ckpt" / "latest").read_text().strip() == "global_step1"
    finally:
        subprocess.run(["umount", str(mnt)])


# ---- 10: the checkpoint directory made unwritable mid-run --------------------------------------------


@pytest.fixture
def immutable():
    """`chattr +i PATH` (even root cannot add, replace or remove an immutable file's entries: EPERM),
    undone at the end; skips where the file system has no immutable flag."""
    done = []

    def make(path: Path) -> None:
        if shutil.which("chattr") is None:
            pytest.skip("no chattr on this machine (e2fsprogs)")
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
        done.append(path)

    yield make
    for path in done:
        subprocess.run(["chattr", "-i", str(path)])


def _start_ranks(cfg: Path, out: Path, world: int) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **_one_rank_env()}
    with open(out, "ab") as f:
        return [subprocess.Popen([PYTHON, TRAIN, "--config", str(cfg)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                      "LOCAL_WORLD_SIZE": str(world)})
                for r in range(world)]


def _when_latest_is(ckpt: Path, tag: str, procs, out: Path, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ((ckpt / "latest").is_file() and (ckpt / "latest").read_text().strip() == tag):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), out.read_text()[-3000:]
        time.sleep(0.01)


def _exit_codes(procs, out: Path, timeout: float = 120) -> list:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still runs {timeout} s after the failed save (waiting for the others?):\n"
                    f"{out.read_text()[-3000:]}")
    finally:
        for p in procs:
            p.kill()


def test_an_immutable_checkpoint_dir_mid_run_is_named_exit_2_latest_kept(run_dir, immutable):
    """Item 10, one rank, synchronous saves: checkpoint.dir made immutable after the save at step 30;
    the save at step 60 cannot create its directory: exit 2 naming it and "not writable", no
    traceback, `latest` still at step 30."""
    cfg = _config(run_dir, "immutable", train__iters=90, checkpoint__save_interval=30)
    ckpt, out = run_dir / "immutable" / "ckpt", run_dir / "immutable" / "out.txt"
    procs = _start_ranks(cfg, out, world=1)
    _when_latest_is(ckpt, "global_step30", procs, out)
    immutable(ckpt)
    assert _exit_codes(procs, out) == [2], out.read_text()[-3000:]
    text = out.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert (f"error: {ckpt / 'global_step60'}: creating the checkpoint directory failed: not writable (Operation "
            "not permitted); `latest` still names the last complete checkpoint") in text, text[-3000:]
    assert (ckpt / "latest").read_text().strip() == "global_step30" and not (ckpt / "global_step60").exists()


def test_a_failure_only_rank_0_meets_in_an_async_save_ends_every_rank_with_exit_2(run_dir, immutable):
    """Item 10, two ranks, checkpoint.async_save: `latest` made immutable after the save at step 30,
    so only rank 0 (which alone writes it) fails, declaring step 60 complete while rank 1 trains on.
    Both ranks exit 2 at once, naming the file; rank 1 is not left waiting in a collective."""
    cfg = _config(run_dir, "immutable2", train__iters=90, checkpoint__save_interval=30,
                  checkpoint__async_save=True)
    ckpt, out = run_dir / "immutable2" / "ckpt", run_dir / "immutable2" / "out.txt"
    procs = _start_ranks(cfg, out, world=2)
    _when_latest_is(ckpt, "global_step30", procs, out)
    immutable(ckpt / "latest")
    assert _exit_codes(procs, out) == [2, 2], out.read_text()[-3000:]
    text = out.read_text()
    failure = (f"{ckpt / 'latest'}: writing the checkpoint file failed: not writable (Operation not permitted); "
               "`latest` still names the last complete checkpoint")
    assert "Traceback" not in text, text[-3000:]
    assert f"error: {failure}" in text, text[-3000:]  # rank 0
    assert f"error: the checkpoint save failed on rank 0: {failure}" in text, text[-3000:]  # rank 1
    assert (ckpt / "latest").read_text().strip() == "global_step30"
