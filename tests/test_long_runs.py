"""Long-run machinery: loss-spike rollback, skipped batches, durable/asynchronous checkpoint files,
per-rank timing. The end-to-end checks run real gloo ranks (one spawn per world size); the rest
are single-process unit tests. kill -9 during asynchronous saves is in tests/test_launch.py."""
import json
import os
import time

import numpy as np
import pytest
import torch

from _train import config_dict, run_on_random_data, train_losses as _train

SPIKE = dict(train__iters=8, checkpoint__save_interval=2, train__on_spike="rollback", train__spike_window=3,
             train__spike_skip_batches=2, train__inject_spike_at=[6])


def _world1(rank, world_size, tmp):
    out = {}
    # The spike at step 6 rolls back to the checkpoint of step 4 (written in the background) and
    # skips global batches 4 and 5; the reference run skips them from the start.
    out["rollback"] = _train(config_dict(tmp, checkpoint__dir=os.path.join(tmp, "a"), checkpoint__async_save=True,
                                         **SPIKE))
    out["skipped"] = _train(config_dict(tmp, checkpoint__dir=os.path.join(tmp, "b"), train__iters=8,
                                        data__skip_batches=[[4, 6]]))
    # Stopped two steps after the rollback (7 steps of this run: 1-5, then 5-6 again), resumed to 8.
    split = os.path.join(tmp, "c")
    first, _ = _train(config_dict(tmp, checkpoint__dir=split, train__exit_interval=7, **SPIKE))
    second, state = _train(config_dict(tmp, checkpoint__dir=split, **SPIKE))
    out["split"] = (first, second, state)
    from megatron_neox.errors import MegatronNeoxError

    try:  # every step is injected: the second rollback is one too many
        _train(config_dict(tmp, checkpoint__dir=os.path.join(tmp, "d"), **{**SPIKE, "train__max_rollbacks": 1,
                                                                          "train__inject_spike_at": [3, 4]}))
    except MegatronNeoxError as e:
        out["too_many"] = str(e)
    with open(os.path.join(tmp, "log", "metrics.jsonl")) as f:
        out["records"] = [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    return run_on_random_data(_world1, 1, str(tmp_path_factory.mktemp("spikes")), timeout=900)


def test_spike_rollback_losses_equal_a_run_that_skipped_the_batches_from_the_start(world1):
    losses, state = world1["rollback"]
    reference, _ = world1["skipped"]
    assert len(losses) == 10  # steps 1-6, the rollback to 4, steps 5-8
    assert losses[:4] == reference[:4]
    assert losses[6:] == reference[4:]
    assert losses[4:6] != reference[4:6]  # before the rollback, steps 5-6 trained on batches 4-5
    assert state["iteration"] == 8 and state["consumed_batches"] == 10
    assert state["consumed_samples"] == 10 * 8 and state["consumed_tokens"] == 8 * 8 * 16
    (rb,) = state["rollbacks"]
    assert rb["step"] == 6 and rb["restored_step"] == 4 and rb["skipped_batches"] == [4, 6]
    assert rb["reason"] == "injected (train.inject_spike_at)" and rb["loss"] == losses[5]


def test_rollback_is_logged_in_metrics(world1):
    rollbacks = [r for r in world1["records"] if "rollback_to" in r]
    first = rollbacks[0]
    assert first["step"] == 6 and first["rollback_to"] == 4 and first["skipped_batches"] == [4, 6]
    assert first["rollbacks"] == 1 and first["spike_loss"] == world1["rollback"][0][5]
    assert "loss" not in first  # plotting tools read training records by their "loss" key


def test_plot_metrics_keeps_the_replayed_timeline_after_a_rollback(world1, tmp_path):
    from _train import load_tool

    plot_metrics = load_tool("plot_metrics")
    records = world1["records"]
    end = next(i for i, r in enumerate(records) if "rollback_to" in r and r["step"] == 6)
    end = next(i for i in range(end, len(records)) if records[i].get("step") == 8 and "loss" in records[i])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:end + 1]))
    train, _ = plot_metrics.read_metrics(path)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == pytest.approx(world1["rollback"][0][:4] + world1["rollback"][0][6:])


def test_resume_after_a_rollback_is_exact(world1):
    first, second, state = world1["split"]
    losses, _ = world1["rollback"]
    assert first + second == losses
    assert state["rollbacks"] == world1["rollback"][1]["rollbacks"]


def test_rollbacks_beyond_max_rollbacks_abort(world1):
    msg = world1["too_many"]
    assert msg.startswith("step 4:") and "after 1 rollbacks" in msg and "train.max_rollbacks" in msg


# ---- a straggler shows up in the log -----------------------------------------------------------


def _straggler(rank, world_size, tmp):
    import megatron_neox.training.step as step

    if rank == 1:  # this rank's forward work is 30 ms slower per micro-batch
        to_device = step._to_device
        step._to_device = lambda mb, device: (time.sleep(0.03), to_device(mb, device))[1]
    _train(config_dict(tmp, checkpoint__dir=None, train__iters=3, log__interval=1))
    if rank == 0:
        with open(os.path.join(tmp, "log", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if '"loss"' in line]


def test_slowest_rank_and_its_time_are_logged(tmp_path):
    records = run_on_random_data(_straggler, 2, str(tmp_path), timeout=600)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # 2 micro-batches per rank per step, 30 ms each (the first may start before the timer)
        assert r["slowest_rank"] == 1, r
        assert r["fastest_rank_s"] > 0, r
        if r["step"] > 1:  # step 1 also holds each rank's one-time warm-up, which varies by tens of ms
            assert r["slowest_rank_s"] >= r["fastest_rank_s"] + 0.03, r
        assert 0 <= r["data_wait_s"] < r["slowest_rank_s"], r


# ---- single-process units ----------------------------------------------------------------------


def _policy(**train):
    from megatron_neox.config import config_from_dict
    from megatron_neox.training.spikes import SpikePolicy

    cfg = config_from_dict(config_dict("/tmp", **{"train__on_spike": "rollback", "checkpoint__save_interval": 1,
                                                  **{f"train__{k}": v for k, v in train.items()}}))
    return SpikePolicy(cfg)


def test_spike_is_a_loss_above_factor_times_the_running_median_once_the_window_is_full():
    from megatron_neox.training.checkpointer import TrainState

    policy, state = _policy(spike_window=3, spike_factor=2.0), TrainState()
    for step, loss in enumerate([9.0, 1.0, 1.2], start=1):  # no call before the window is full
        state.iteration = step
        assert policy.check(loss, state) is None
    state.iteration = 4
    assert policy.check(2.41, state) == "loss above train.spike_factor=2.0 x median 1.2 of the last 3"
    assert state.loss_window == [9.0, 1.0, 1.2]  # a spike does not join the window
    assert policy.check(2.39, state) is None and state.loss_window == [1.0, 1.2, 2.39]
    assert policy.check(float("nan"), state) == "non-finite loss"
    assert policy.check(float("inf"), state) == "non-finite loss"


def test_injected_spike_fires_once_per_trajectory():
    from megatron_neox.training.checkpointer import TrainState

    policy, state = _policy(inject_spike_at=[2]), TrainState(iteration=2)
    assert policy.check(1.0, state) == "injected (train.inject_spike_at)"
    state.rollbacks.append(policy.record(2, 1.0, "injected", TrainState(iteration=1, consumed_batches=1)))
    assert state.rollbacks[0]["skipped_batches"] == [1, 201]  # default train.spike_skip_batches
    assert policy.check(1.0, state) is None


def test_abort_policy_calls_no_spike():
    from megatron_neox.config import config_from_dict
    from megatron_neox.training.checkpointer import TrainState
    from megatron_neox.training.spikes import SpikePolicy

    policy = SpikePolicy(config_from_dict(config_dict("/tmp")))
    assert policy.check(float("nan"), TrainState(iteration=1)) is None
    assert policy.check(1e9, TrainState(iteration=1)) is None


@pytest.mark.parametrize("overrides, expected", [
    ({"train__on_spike": "rollback"}, "train.on_spike='rollback' needs checkpoint.dir and checkpoint.save_interval"),
    ({"data__skip_batches": [[5, 5]]}, "data.skip_batches: [5, 5] is not a [start, end) range"),
    ({"train__inject_spike_at": [0]}, "train.inject_spike_at=[0]: expected step numbers >= 1"),
    ({"train__inject_spike_at": [3]}, "train.inject_spike_at=[3] tests the rollback policy, but "
                                      "train.on_spike='abort' looks for no spikes; set train.on_spike=rollback"),
])
def test_unrunnable_spike_settings_are_refused_at_config_time(overrides, expected):
    from megatron_neox.config import config_from_dict
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(config_dict("/tmp", **overrides))


def test_loader_skips_the_given_global_batches_and_counts_them(tmp_path):
    from megatron_neox.data.loader import BatchLoader

    data = np.arange(64 * 5).reshape(64, 5)
    plain = BatchLoader(data, micro_batch_size=2, dp_rank=0, dp_size=1)
    first = [plain.next_global_batch(4)[0]["tokens"][0, 0].item() for _ in range(6)]
    skipping = BatchLoader(data, micro_batch_size=2, dp_rank=0, dp_size=1, skip_ranges=[(1, 3), (4, 5)])
    got = [skipping.next_global_batch(4)[0]["tokens"][0, 0].item() for _ in range(3)]
    assert got == [first[0], first[3], first[5]]
    assert skipping.consumed_batches == 6 and skipping.consumed_samples == 24


def test_state_saved_before_batches_could_be_skipped_counts_one_batch_per_step():
    from megatron_neox.training.checkpointer import TrainState

    old = TrainState.from_saved({"iteration": 7, "consumed_samples": 56, "consumed_tokens": 896, "skipped_steps": 0})
    assert old.consumed_batches == 7 and old.rollbacks == [] and old.loss_window == []


class FileOps:
    """Records, in order, the file-system calls a checkpoint write makes: ("fsync", path of the
    descriptor), ("replace", source, destination), ("unlink", path), ("rmtree", path); paths resolved."""

    def __init__(self, monkeypatch):
        import shutil

        self.events = []
        fsync, replace, unlink, rmtree = os.fsync, os.replace, os.unlink, shutil.rmtree

        def record(*event):
            self.events.append(event)

        def on_fsync(fd):
            record("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))  # what the descriptor is open on
            return fsync(fd)

        monkeypatch.setattr(os, "fsync", on_fsync)
        monkeypatch.setattr(os, "replace", lambda a, b: record("replace", _real(a), _real(b)) or replace(a, b))
        monkeypatch.setattr(os, "unlink", lambda p, **k: record("unlink", _real(p)) or unlink(p, **k))
        monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: record("rmtree", _real(p)) or rmtree(p, *a, **k))

    def index(self, *event) -> int:
        """Position of the first event equal to `event` (paths as str); fails naming the events seen."""
        event = tuple(str(_real(x)) if isinstance(x, os.PathLike) else x for x in event)
        assert event in self.events, (event, self.events)
        return self.events.index(event)

    def durable_write(self, path) -> tuple:
        """(where the temporary file was fsynced, renamed onto `path`, its directory fsynced after)."""
        path = _real(path)
        renames = [(i, e[1]) for i, e in enumerate(self.events) if e[0] == "replace" and e[2] == path]
        assert renames, (path, self.events)
        i, tmp = renames[-1]
        assert tmp != path, (path, "written in place, not under a temporary name then renamed")
        synced = [j for j, e in enumerate(self.events[:i]) if e == ("fsync", tmp)]
        dir_synced = [j for j, e in enumerate(self.events) if j > i and e == ("fsync", os.path.dirname(path))]
        assert synced and dir_synced, (path, "written without fsync of the file or of its directory", self.events)
        return synced[-1], i, dir_synced[0]


def _real(p) -> str:
    return os.path.realpath(os.fspath(p))


def test_background_writer_writes_a_snapshot_durably(tmp_path, monkeypatch):
    import threading

    from megatron_neox.training import writer as writer_module
    from megatron_neox.training.writer import DurableWriter

    ops = FileOps(monkeypatch)
    trained_on = threading.Event()
    save = writer_module.save_durable

    def save_after_training_went_on(obj, path):
        assert trained_on.wait(timeout=60)
        save(obj, path)

    # The writer thread starts its file only once training has changed the tensors (else the race
    # could hide a save of the live tensors).
    monkeypatch.setattr(writer_module, "save_durable", save_after_training_went_on)
    writer = DurableWriter(background=True)
    weights = {"w": torch.zeros(1000), "nested": [torch.ones(3)]}
    writer.save(weights, str(tmp_path / "a.pt"))
    weights["w"] += 5  # training goes on: the checkpoint keeps the values at the save
    weights["nested"][0].zero_()
    trained_on.set()
    writer.wait()
    assert not writer.pending()
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved["w"].sum().item() == 0 and saved["nested"][0].tolist() == [1.0, 1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]  # no temporary left behind
    # Durable: the data fsynced under its temporary name, renamed, then the directory entry fsynced.
    ops.durable_write(tmp_path / "a.pt")


def test_background_write_error_names_the_file_on_the_training_thread(tmp_path):
    from megatron_neox.errors import CheckpointError
    from megatron_neox.training.writer import DurableWriter

    writer = DurableWriter(background=True)
    writer.save({"w": torch.zeros(2)}, str(tmp_path / "missing_dir" / "a.pt"))
    with pytest.raises(CheckpointError, match="missing_dir/a.pt: writing the checkpoint file failed"):
        writer.wait()


def test_async_checkpoint_is_declared_complete_only_when_no_rank_is_still_writing(tmp_path, monkeypatch):
    # A kill -9 while some rank's files are still in flight must not leave a complete.json (or a
    # `latest`) naming them. The test in test_launch.py cannot aim a kill at that moment; here the
    # writers' states are set by hand.
    from types import SimpleNamespace

    from megatron_neox.config import config_from_dict
    from megatron_neox.training import checkpoint
    from megatron_neox.training.checkpointer import Checkpointer, TrainState

    class Writer:  # this rank's background writer
        busy, error = True, None

        def pending(self):
            return self.busy

    class Stop:  # the all-reduce over the ranks of (signalled, busy)
        other_rank_busy = False

        def any_rank(self, busy=False, failed=False):
            return False, busy or self.other_rank_busy, failed

    writer, stop, finalized = Writer(), Stop(), []
    monkeypatch.setattr(checkpoint, "use_durable_writer", lambda engine, background: writer)
    monkeypatch.setattr(checkpoint, "finalize_tag", lambda pending, keep_last: finalized.append(pending.tag))
    cfg = config_from_dict(config_dict(str(tmp_path), checkpoint__async_save=True, checkpoint__save_interval=100))
    ck = Checkpointer(cfg, None, SimpleNamespace(rank=0), stop)
    ck.pending = checkpoint.PendingSave(tmp_path, "global_step4", {"iteration": 4})
    state = TrainState(iteration=5)
    ck.after_step(state, 10)
    assert finalized == []  # this rank is still writing
    writer.busy, stop.other_rank_busy = False, True
    ck.after_step(state, 10)
    assert finalized == []  # this rank is done, another one is not
    stop.other_rank_busy = False
    ck.after_step(state, 10)
    assert finalized == ["global_step4"] and ck.pending is None


def test_finalize_writes_complete_then_latest_and_drops_old_markers_first(tmp_path, monkeypatch):
    from megatron_neox.checkpoint_files import complete_tags
    from megatron_neox.training.checkpoint import PendingSave, finalize_tag

    for step in (1, 2, 3):
        (tmp_path / f"global_step{step}").mkdir()
        (tmp_path / f"global_step{step}" / "rng_state_0.pt").write_bytes(b"x" * step)
        if step == 3:
            ops = FileOps(monkeypatch)  # the calls of the save that retires step 1
        finalize_tag(PendingSave(tmp_path, f"global_step{step}", {"iteration": step}), keep_last=2)
    assert complete_tags(tmp_path) == ["global_step2", "global_step3"]
    assert (tmp_path / "latest").read_text() == "global_step3"
    meta = json.loads((tmp_path / "global_step3" / "complete.json").read_text())
    assert meta == {"iteration": 3, "files": {"rng_state_0.pt": 3}}
    assert not (tmp_path / "global_step1").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))  # no temporary (megatron_neox/durable.py) left behind

    # The order observed: the step's files made durable, then complete.json (durable), then `latest`
    # (durable), and only then the old checkpoint: its marker removed (durably) before its files.
    step3, old = tmp_path / "global_step3", tmp_path / "global_step1"
    files_synced = ops.index("fsync", step3)
    *_, complete_durable = ops.durable_write(step3 / "complete.json")
    _, latest_renamed, latest_durable = ops.durable_write(tmp_path / "latest")
    marker_gone = ops.index("unlink", old / "complete.json")
    old_synced = ops.index("fsync", old)
    files_gone = ops.index("rmtree", old)
    assert files_synced < complete_durable < latest_renamed < latest_durable < marker_gone < old_synced < files_gone
    assert ("unlink", _real(tmp_path / "global_step2" / "complete.json")) not in ops.events  # kept: keep_last=2
