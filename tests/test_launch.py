"""The launch paths, end to end on CPU: the SLURM batch script on localhost, a stop signal's save and
the resume after it, kill -9 during asynchronous saves and the resumes after it, the real deepspeed
launcher, and tools/plot_metrics.py.

A real launch costs 10-30 s on this machine, so there are few, and each test checks everything its
launch can show; the batch script's requeue decision is also tested with a stand-in launcher (< 1 s).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _train import REPO, config_dict, make_dataset
from megatron_neox.ranks import free_port

PYTHON = sys.executable


def _deepspeed_for(python: str) -> str:
    """The `deepspeed` launcher installed beside `python`, started by that same interpreter path.

    pip writes the interpreter's path into the script's first line. Where the venv is reached
    through a symlink (`.venv -> ../main/.venv`), that line spells another path than `python`: the
    ranks the launcher starts then import torch and DeepSpeed from that other path, torch's JIT
    sees new include paths in DeepSpeed's shm_comm op and rebuilds it (25-40 s on 2 cores), and
    the next rank started by `python` rebuilds it back. Then a copy of the script with `python` in
    its first line (under the repo's .cache/) is returned instead; else the installed script."""
    installed = os.path.join(os.path.dirname(python), "deepspeed")
    with open(installed) as f:
        first, rest = f.readline(), f.read()
    if first.strip() == f"#!{python}":
        return installed
    copy = os.path.join(REPO, ".cache", "bin", "deepspeed")
    text = f"#!{python}\n{rest}"
    if not (os.path.isfile(copy) and open(copy).read() == text):
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        tmp = f"{copy}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, copy)
    return copy


DEEPSPEED = _deepspeed_for(PYTHON)
TRAIN = os.path.join(REPO, "launch", "train.py")
SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")
PLOT = os.path.join(REPO, "tools", "plot_metrics.py")

# The keys megatron_neox/training/metrics.py documents for a training and an eval record.
TRAIN_KEYS = {"step", "total_steps", "consumed_samples", "tokens", "loss", "lr", "grad_norm", "loss_scale",
              "skipped_steps", "global_batch_size", "tokens_per_sec", "tflops_per_rank", "mfu", "mem_gb", "eta_s",
              "slowest_rank_s", "slowest_rank", "fastest_rank_s", "data_wait_s"}
EVAL_KEYS = {"step", "eval_loss", "eval_ppl"}

# Stand-ins for SLURM's commands, first on PATH. srun runs its command once per task with the
# variables srun sets (all "nodes" are this machine) and records each task's pid and exit status;
# scontrol expands a plain comma-separated node list and records every other call (the requeue).
FAKE_SRUN = r"""#!/bin/bash
per_node=1
while [[ $1 == -* ]]; do
    [[ $1 == --ntasks-per-node=* ]] && per_node=${1#*=}
    shift
done
nnodes=${SLURM_NNODES:-1}
pids=()
for ((node = 0; node < nnodes; node++)); do
    for ((local = 0; local < per_node; local++)); do
        SLURM_NODEID=$node SLURM_PROCID=$((node * per_node + local)) SLURM_LOCALID=$local \
            SLURM_NTASKS=$((nnodes * per_node)) "$@" &
        pids+=($!)
        echo $! >>"$FAKE_SLURM_LOG.pids"
    done
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid"; status=$?
    echo "task $pid exit $status" >>"$FAKE_SLURM_LOG"
    ((status)) && rc=$status
done
exit $rc
"""
FAKE_SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then tr , '\n' <<<"$3"; else echo "scontrol $*" >>"$FAKE_SLURM_LOG"; fi
"""


# ---- helpers ----------------------------------------------------------------------------------


def _env(**extra) -> dict:
    """This environment without any launcher's or SLURM's variables, one thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions")))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _write_config(tmp: Path, pp: int = 1, **overrides) -> Path:
    make_dataset(str(tmp / "data" / "rand"))
    # A fixed peak skips the matmul probe that 'auto' runs on a CPU.
    cfg = config_dict(str(tmp), pp=pp, log__peak_tflops=1.0, **overrides)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _records(log_dir: Path) -> list:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # The last line may be mid-write while a run is going.
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _train_steps(log_dir: Path) -> list:
    return [r["step"] for r in _records(log_dir) if "loss" in r]


def _start(cmd, env, out: Path) -> subprocess.Popen:
    # A session of its own: on failure the test kills the process and everything it started.
    with open(out, "ab") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def _kill_all(procs) -> None:
    """SIGKILL what the test started and is still running: every process in the sessions of `procs`
    (the batch script puts its ranks in process groups of their own, and a launcher that died leaves
    its ranks orphaned, so neither the process group nor the tree finds them all)."""
    import psutil

    sessions = {p.pid for p in procs}
    for pid in psutil.pids():
        try:
            if os.getsid(pid) in sessions:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        p.wait()


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no output)"


def _wait_for_step(log_dir: Path, step: int, procs, out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _train_steps(log_dir)):
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process exited before step {step}:\n{_tail(out)}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout} s:\n{_tail(out)}")


def _wait_all(procs, out: Path, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{_tail(out)}")
    return codes


def _latest_checkpoint(ckpt: Path) -> tuple:
    """(iteration, complete.json) of the checkpoint `latest` names; asserts it is complete."""
    tag = (ckpt / "latest").read_text().strip()
    meta_file = ckpt / tag / "complete.json"
    assert meta_file.is_file(), f"{ckpt / 'latest'} names {tag}, which has no complete.json"
    meta = json.loads(meta_file.read_text())
    assert tag == f"global_step{meta['iteration']}"
    return meta["iteration"], meta


# ---- (a) the SLURM batch script ------------------------------------------------------------------


def _fake_slurm(tmp: Path, nodes: int, **extra) -> dict:
    """The environment of a batch job on `nodes` nodes of one rank each, all on this machine."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=tmp / "slurm.log", SLURM_JOB_ID=4242,
               SLURM_JOB_NAME="mnx", SLURM_JOB_NODELIST=",".join(f"node{i}" for i in range(nodes)),
               SLURM_NNODES=nodes, GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
               STATE_DIR=tmp / "state", PYTHON=PYTHON, DEEPSPEED=DEEPSPEED)
    return _env(**{**env, **extra})


def _slurm_calls(tmp: Path) -> list:
    log = tmp / "slurm.log"
    return log.read_text().splitlines() if log.exists() else []


def _srun_tasks(tmp: Path) -> list:
    pids = tmp / "slurm.log.pids"
    return [int(pid) for pid in pids.read_text().split()] if pids.exists() else []


def test_sbatch_two_nodes_train_with_dp2_save_on_usr1_and_requeue(tmp_path):
    """train.sbatch on two 'nodes' of one rank each (both this machine): one deepspeed launcher per
    node with --no_ssh --node_rank, a world of 2. SIGUSR1 to every process of the srun step (what
    slurmstepd does under proctrack/cgroup before the time limit) must leave the launchers alive and
    stop the ranks after a save; the job exits 0 and requeues itself."""
    import psutil

    cfg = _write_config(tmp_path, train__iters=300)
    out = tmp_path / "job.out"
    job = _start(["bash", SBATCH, str(cfg)], _fake_slurm(tmp_path, 2), out)
    try:
        _wait_for_step(tmp_path / "log", 2, [job], out, timeout=90)
        tasks = _srun_tasks(tmp_path)
        assert len(tasks) == 2
        step_procs = [p for t in tasks for p in [psutil.Process(t), *psutil.Process(t).children(recursive=True)]]
        assert len(step_procs) >= 8  # per node: wrapper, deepspeed runner, deepspeed.launcher.launch, rank
        for p in step_procs:
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:  # a short-lived helper process that is gone already
                pass
        (rc,) = _wait_all([job], out, timeout=60)
    finally:
        _kill_all([job])

    text = out.read_text(errors="replace")
    assert rc == 0, _tail(out)
    calls = _slurm_calls(tmp_path)
    assert sorted(line.split()[-1] for line in calls if line.startswith("task")) == ["0", "0"], calls
    assert "scontrol requeue 4242" in calls, text
    assert (tmp_path / "state" / "mnx-4242.hostfile").read_text() == "node0 slots=1\nnode1 slots=1\n"
    assert "--node_rank=0" in text and "--node_rank=1" in text  # each runner logs the launch it made
    assert "pp=1 tp=1 dp=2" in text
    steps = _train_steps(tmp_path / "log")
    assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) < 300
    iteration, meta = _latest_checkpoint(tmp_path / "ckpt")
    assert iteration == steps[-1]
    assert meta["layout"] == {"pp": 1, "tp": 1, "dp": 2}


# A stand-in for the deepspeed launcher and its ranks (run by launch/run.py), for the batch script's own logic: records its
# arguments, and with FAKE_WAIT=1 waits for SIGUSR1 (handled as the trainer does) and exits FAKE_RC.
FAKE_DEEPSPEED = """#!{python}
import json, os, signal, sys, time
log = os.environ["FAKE_SLURM_LOG"]
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
with open(log + ".args", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
# As a rank does once its handlers are installed, so that launch/run.py forwards the signal to it.
open(os.path.join(os.environ["MEGATRON_NEOX_SUPERVISOR_DIR"], "rank-%d.json" % os.getpid()), "w").write("{{}}")
if os.environ.get("FAKE_WAIT") == "1":
    open(log + ".ready." + os.environ["SLURM_NODEID"], "w").close()
    deadline = time.monotonic() + 60  # the signal never came: exit rather than linger
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    if not got:
        sys.exit(99)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.mark.parametrize("signalled, exit_code, requeued", [(False, 0, False), (True, 0, True), (True, 3, False)],
                         ids=["finished", "usr1-saved", "usr1-failed"])
def test_sbatch_requeues_only_after_usr1_and_a_clean_exit(tmp_path, signalled, exit_code, requeued):
    """SIGUSR1 sent to the srun task alone (proctrack/pgid, linuxproc) is forwarded to the ranks; the
    job is requeued only when a stop signal came and the run exited 0."""
    fake = tmp_path / "deepspeed"
    fake.write_text(FAKE_DEEPSPEED.format(python=PYTHON))
    fake.chmod(0o755)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config_dict(str(tmp_path))))
    env = _fake_slurm(tmp_path, 2, DEEPSPEED=fake, FAKE_WAIT=int(signalled), FAKE_RC=exit_code)
    out = tmp_path / "job.out"
    job = _start(["bash", SBATCH, str(cfg), "--set", "comment=two words", "train.iters=7"], env, out)
    try:
        if signalled:
            deadline = time.monotonic() + 30
            while len(list(tmp_path.glob("slurm.log.ready.*"))) < 2:
                assert time.monotonic() < deadline and job.poll() is None, _tail(out)
                time.sleep(0.02)
            for pid in _srun_tasks(tmp_path):
                os.kill(pid, signal.SIGUSR1)
        (rc,) = _wait_all([job], out, timeout=30)
    finally:
        _kill_all([job])
    assert rc == exit_code, _tail(out)
    assert ("scontrol requeue 4242" in _slurm_calls(tmp_path)) == requeued, _tail(out)
    args = sorted(json.loads(line) for line in (tmp_path / "slurm.log.args").read_text().splitlines())
    port = env["MASTER_PORT"]
    assert args == [[f"--hostfile={tmp_path}/state/mnx-4242.hostfile", "--no_ssh", f"--node_rank={node}",
                     "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN,
                     "--config", str(cfg), "--set", "comment=two words", "train.iters=7"] for node in (0, 1)]


# ---- (b) SIGTERM: finish the step, save, exit 0; the next launch resumes ---------------------------


def _launch_two_ranks(cfg: Path, out: Path, *extra) -> list:
    port = free_port()
    return [_start([PYTHON, TRAIN, "--config", str(cfg), *extra],
                   _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port), out)
            for rank in range(2)]


def test_sigterm_saves_a_complete_checkpoint_and_the_next_launch_resumes_after_it(tmp_path):
    cfg = _write_config(tmp_path, train__iters=300)
    log_dir, out = tmp_path / "log", tmp_path / "ranks.out"
    ranks = _launch_two_ranks(cfg, out)
    try:
        _wait_for_step(log_dir, 2, ranks, out, timeout=90)
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        codes = _wait_all(ranks, out, timeout=60)
    finally:
        _kill_all(ranks)
    assert codes == [0, 0], _tail(out)
    steps = _train_steps(log_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 300
    iteration, meta = _latest_checkpoint(tmp_path / "ckpt")
    assert iteration == steps[-1]  # the step in flight was finished and saved, none after it
    assert meta["layout"]["dp"] == 2

    ranks = _launch_two_ranks(cfg, out, "--set", "train.exit_interval=1")
    try:
        codes = _wait_all(ranks, out, timeout=90)
    finally:
        _kill_all(ranks)
    assert codes == [0, 0], _tail(out)
    assert _train_steps(log_dir)[len(steps)] == iteration + 1
    assert f"(iteration {iteration})" in out.read_text()  # checkpoint.py's "resumed from ..." line
    assert _latest_checkpoint(tmp_path / "ckpt")[0] == iteration + 1


# ---- (c) kill -9 while checkpoints are written in the background ------------------------------------


def _losses_by_step(log_dir: Path) -> dict:
    """step -> every loss logged for it (a step trained again after a resume is logged again)."""
    out = {}
    for r in _records(log_dir):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def _saving(ckpt: Path) -> bool:
    """A save is under way: a file being written (temporary name) or a newer step dir than `latest`."""
    if any(ckpt.glob("global_step*/*.tmp-*")):
        return True
    latest = ckpt / "latest"
    done = int(latest.read_text().strip()[len("global_step"):]) if latest.is_file() else 0
    return any(int(p.name[len("global_step"):]) > done for p in ckpt.glob("global_step*"))


def _run_two_ranks_to_the_end(cfg: Path, out: Path) -> None:
    ranks = _launch_two_ranks(cfg, out)
    try:
        assert _wait_all(ranks, out, timeout=240) == [0, 0], _tail(out)
    finally:
        _kill_all(ranks)


def _kill_when(ranks, out: Path, log_dir: Path, ckpt: Path, after_step: int, during_save: bool) -> dict:
    """kill -9 both ranks once step `after_step` is logged and, if `during_save`, a save is seen under
    way (else at once; no save seen within 20 s fails the test); returns what the kill left: the step
    `latest` names (0: none yet, the first checkpoint was still being written), the unfinished tags,
    and whether the kill landed inside a save (a temporary file, or a tag of step >= `after_step`
    newer than `latest` without its complete.json)."""
    _wait_for_step(log_dir, after_step, ranks, out, timeout=120)
    deadline = time.monotonic() + 20
    while during_save and not _saving(ckpt):
        if time.monotonic() > deadline:
            pytest.fail(f"no save seen under way within 20 s of step {after_step}:\n{_tail(out)}")
        time.sleep(0.001)
    _kill_all(ranks)
    latest = _latest_checkpoint(ckpt)[0] if (ckpt / "latest").exists() else 0
    partial = sorted(p.name for p in ckpt.glob("global_step*") if not (p / "complete.json").exists())
    unfinished = [t for t in partial if int(t[len("global_step"):]) >= max(after_step, latest + 1)]
    inside = bool(unfinished or list(ckpt.glob("global_step*/*.tmp-*")))
    return {"after_step": after_step, "latest": latest, "partial": partial, "inside_save": inside}


def test_kill_9_during_async_saves_resumes_every_loss_exactly(tmp_path):
    """Saving every step with checkpoint.async_save, the whole launch is killed with SIGKILL three
    times (right after a step, and twice inside a save: each of these kills must leave an unfinished
    save behind, else it is tried again a step later, twice at most); each relaunch resumes from the
    newest complete checkpoint, and every loss logged by any launch equals the uninterrupted run's.
    A wider model than the other tests makes each save write ~10 MB per rank, so the kills land
    inside writes."""
    wide = dict(train__iters=12, checkpoint__save_interval=1, checkpoint__async_save=True, model__hidden_size=192)
    ref_dir = tmp_path / "ref"
    cfg = _write_config(ref_dir, **wide)
    _run_two_ranks_to_the_end(cfg, tmp_path / "ref.out")
    expected = {step: losses[0] for step, losses in _losses_by_step(ref_dir / "log").items()}
    assert sorted(expected) == list(range(1, 13))

    run = tmp_path / "killed"
    cfg = _write_config(run, **wide)
    ckpt, log_dir = run / "ckpt", run / "log"
    kills, outs = [], []
    for after_step, during_save in ((2, False), (5, True), (8, True)):
        for attempt in range(3):
            out = tmp_path / f"launch{len(outs)}.out"
            outs.append(out)
            ranks = _launch_two_ranks(cfg, out)
            try:
                step = max([after_step] + [s + 1 for s in _train_steps(log_dir)]) if attempt else after_step
                kills.append(_kill_when(ranks, out, log_dir, ckpt, step, during_save))
            finally:
                _kill_all(ranks)
            if not during_save or kills[-1]["inside_save"]:
                break
        else:
            pytest.fail(f"three kills in a row missed the save they were aimed at: {kills}")
    out = tmp_path / "last.out"
    _run_two_ranks_to_the_end(cfg, out)

    relaunches = [o.read_text() for o in outs[1:]] + [out.read_text()]
    for k, text in zip(kills, relaunches):  # each relaunch resumed from the newest complete checkpoint
        started = f"(iteration {k['latest']})" if k["latest"] else "12 steps from step 0"
        assert started in text, (kills, text[-3000:])
    got = _losses_by_step(log_dir)
    assert sorted(got) == list(range(1, 13))
    for step, losses in got.items():
        assert all(loss == expected[step] for loss in losses), (step, losses, expected[step], kills)
    assert sum(len(v) for v in got.values()) > 12  # steps after a checkpoint were trained (and logged) twice
    assert _latest_checkpoint(ckpt)[0] == 12
    assert not list(ckpt.glob("global_step12/*.tmp-*"))
    print("kill -9 left:", kills)


# ---- (d) the real deepspeed launcher, (e) plot_metrics on its output ------------------------------


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """`deepspeed --num_gpus 2` with pp=2 for 2 steps: (log dir, launcher output)."""
    tmp = tmp_path_factory.mktemp("deepspeed_pp2")
    cfg = _write_config(tmp, pp=2, train__iters=2)
    out = tmp / "deepspeed.out"
    proc = _start([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", str(cfg)],
                  _env(), out)
    try:
        (rc,) = _wait_all([proc], out, timeout=120)
    finally:
        _kill_all([proc])
    assert rc == 0, _tail(out)
    return tmp / "log", out.read_text(errors="replace")


def test_deepspeed_launcher_pp2_logs_every_documented_metric(deepspeed_run):
    log_dir, text = deepspeed_run
    assert "pp=2 tp=1 dp=1" in text
    records = _records(log_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [2]
    for r in train:
        assert set(r) == TRAIN_KEYS
        for key in ("loss", "lr", "tokens"):
            assert isinstance(r[key], (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key]), (key, r)
        assert r["total_steps"] == 2 and r["tokens"] == r["step"] * 8 * 16  # global batch 8 x seq 16
    assert set(evals[0]) == EVAL_KEYS


def test_plot_metrics_writes_a_png_and_names_a_malformed_line(deepspeed_run, tmp_path):
    log_dir, _ = deepspeed_run
    png = tmp_path / "loss.png"
    r = subprocess.run([PYTHON, PLOT, str(log_dir), "--out", str(png)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    bad = tmp_path / "bad" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text("\n".join([lines[0], '{"step": 2, "loss": 4.7', *lines[1:]]) + "\n")
    r = subprocess.run([PYTHON, PLOT, str(bad.parent), "--out", str(tmp_path / "bad.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}:2:" in r.stderr and "malformed JSON" in r.stderr
    assert not (tmp_path / "bad.png").exists()


# ---- (e) launch/run.py: a stop signal through the real deepspeed launchers saves and exits 0 ------

RUN = os.path.join(REPO, "launch", "run.py")


def _losses(log_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in _records(log_dir) if "loss" in r}


@pytest.mark.parametrize("target", ["pid", "group", "launch.py"])
def test_run_py_deepspeed_stop_signal_saves_exits_0_and_resumes_exactly(tmp_path, target):
    """`python launch/run.py deepspeed --num_gpus 2 ...` and SIGTERM to its pid, to its process group
    (a terminal, SLURM's pgid tracking) or to deepspeed.launcher.launch (what SLURM's cgroup
    tracking also signals; it exits 1 by itself): the ranks finish the step, save and exit, and the
    command exits 0. For the pid, the run then resumes and gives the losses of an uninterrupted run."""
    import psutil

    cfg = _write_config(tmp_path, train__iters=300)
    log_dir, out = tmp_path / "log", tmp_path / "run.out"

    def supervised(*extra):
        return _start([PYTHON, RUN, DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
                       "--config", str(cfg), *extra], _env(), out)

    proc = supervised()
    try:
        _wait_for_step(log_dir, 2, [proc], out, timeout=120)
        if target == "pid":
            proc.send_signal(signal.SIGTERM)
        elif target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            (launch,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
            launch.send_signal(signal.SIGTERM)
        (rc,) = _wait_all([proc], out, timeout=90)
    finally:
        _kill_all([proc])
    assert rc == 0, _tail(out)
    steps = _train_steps(log_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 300
    iteration, meta = _latest_checkpoint(tmp_path / "ckpt")
    assert iteration == steps[-1] and meta["layout"]["dp"] == 2  # the step in flight, saved
    if target == "launch.py":
        assert "the launcher exited 1 after a stop signal, but all 2 ranks saved and exited 0" in out.read_text()
    if target != "pid":
        return

    proc = supervised("--set", "train.exit_interval=2")
    try:
        (rc,) = _wait_all([proc], out, timeout=120)
    finally:
        _kill_all([proc])
    assert rc == 0, _tail(out)
    assert f"(iteration {iteration})" in out.read_text()
    resumed = _losses(log_dir)

    ref_cfg = _write_config(tmp_path / "ref", train__iters=300)  # the same run, never interrupted
    ranks = _launch_two_ranks(ref_cfg, tmp_path / "ref.out", "--set", f"train.exit_interval={iteration + 2}")
    try:
        assert _wait_all(ranks, tmp_path / "ref.out", timeout=120) == [0, 0], _tail(tmp_path / "ref.out")
    finally:
        _kill_all(ranks)
    reference = _losses(tmp_path / "ref" / "log")
    assert [resumed[s] for s in (iteration + 1, iteration + 2)] == [reference[s] for s in (iteration + 1, iteration + 2)]
