"""End-to-end training: exact resume, resume at another layout, damaged checkpoints, metrics.

Real gloo ranks on CPU. Each world size runs all its scenarios in one spawn (start-up is the
cost); the tests assert on what they returned.
"""
import json
import math
import os
import shutil

import pytest
import torch.distributed as dist

from _train import config_dict, run_on_random_data, train_losses as _train

HALF = 3  # steps before the interruption; runs are 2 * HALF steps


def _straight_and_split(tmp, pp, tp, name):
    """(losses of 2*HALF straight steps, losses of HALF + resume + HALF)."""
    straight, _ = _train(config_dict(tmp, pp, tp, checkpoint__dir=os.path.join(tmp, f"{name}_a")))
    split_dir = os.path.join(tmp, f"{name}_b")
    first, _ = _train(config_dict(tmp, pp, tp, checkpoint__dir=split_dir, train__exit_interval=HALF))
    second, state = _train(config_dict(tmp, pp, tp, checkpoint__dir=split_dir))
    return {"straight": straight, "split": first + second, "state": state}


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _world1(rank, world_size, tmp):
    from megatron_neox.errors import MegatronNeoxError

    out = {"resume": _straight_and_split(tmp, 1, 1, "r111")}

    # Two checkpoints (steps 2 and 4); then damage the newest in two ways.
    base = os.path.join(tmp, "damaged")
    _train(config_dict(tmp, checkpoint__dir=base, train__iters=4, checkpoint__save_interval=2))
    out["tags"] = {t: os.path.isfile(os.path.join(base, t, "complete.json"))
                   for t in os.listdir(base) if t.startswith("global_step")}
    with open(os.path.join(base, "latest")) as f:
        out["latest"] = f.read()
    with open(os.path.join(base, "global_step4", "complete.json")) as f:
        out["saved_config"] = json.load(f)["config"]

    def resumed_from(ckpt):
        # iters=5: one more step after a resume from step 4, two after a resume from step 2.
        losses, state = _train(config_dict(tmp, checkpoint__dir=ckpt, train__iters=5))
        return 5 - len(losses)

    corrupt = os.path.join(tmp, "corrupt_latest")
    shutil.copytree(base, corrupt)
    with open(os.path.join(corrupt, "latest"), "w") as f:
        f.write("\x00garbage")
    out["corrupt_latest_resumed_from"] = resumed_from(corrupt)

    truncated = os.path.join(tmp, "truncated")
    shutil.copytree(base, truncated)
    shard = os.path.join(truncated, "global_step4", "mp_rank_00_model_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    out["truncated_resumed_from"] = resumed_from(truncated)

    partial = os.path.join(tmp, "partial")
    shutil.copytree(base, partial)
    os.remove(os.path.join(partial, "global_step4", "complete.json"))  # a save that crashed midway
    os.remove(os.path.join(partial, "latest"))
    out["partial_resumed_from"] = resumed_from(partial)

    only_bad = os.path.join(tmp, "only_bad")
    shutil.copytree(base, only_bad)
    for tag in ("global_step2", "global_step4"):
        p = os.path.join(only_bad, tag, "mp_rank_00_model_states.pt")
        with open(p, "r+b") as f:
            f.truncate(10)
    try:
        resumed_from(only_bad)
    except MegatronNeoxError as e:
        out["only_bad_error"] = str(e)

    try:
        _train(config_dict(tmp, checkpoint__dir=os.path.join(tmp, "x"), checkpoint__load=base,
                           model__hidden_size=48))
    except MegatronNeoxError as e:
        out["mismatch_error"] = str(e)

    try:  # an absurd learning rate: every step overflows to inf/nan and is skipped
        _train(config_dict(tmp, checkpoint__dir=os.path.join(tmp, "diverge"), optimizer__lr=1e12,
                           train__max_skipped_steps=2, optimizer__clip_grad=0.0, train__iters=20))
    except MegatronNeoxError as e:
        out["abort_error"] = str(e)

    with open(os.path.join(tmp, "log", "metrics.jsonl")) as f:
        out["metrics"] = [json.loads(line) for line in f]
    return out


def _world2(rank, world_size, tmp):
    from megatron_neox.convert.universal import to_universal

    out = {"pp2": _straight_and_split(tmp, 2, 1, "r211"), "tp2": _straight_and_split(tmp, 1, 2, "r121")}
    # Interrupted at pp=2, resumed at tp=2 and at dp=2 through a universal checkpoint.
    src = os.path.join(tmp, "r211_b")
    first_half = os.path.join(tmp, "pp2_half")
    _train(config_dict(tmp, 2, 1, checkpoint__dir=first_half, train__exit_interval=HALF))
    if rank == 0:
        to_universal(first_half, os.path.join(tmp, "universal"))
    _barrier()
    for name, (pp, tp) in {"to_tp2": (1, 2), "to_dp2": (1, 1)}.items():
        losses, _ = _train(config_dict(tmp, pp, tp, checkpoint__dir=os.path.join(tmp, name),
                                       checkpoint__load=os.path.join(tmp, "universal")))
        out[name] = losses
    out["src_exists"] = os.path.isdir(src)
    return out


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    return run_on_random_data(_world1, 1, str(tmp_path_factory.mktemp("train1")), timeout=600)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_on_random_data(_world2, 2, str(tmp_path_factory.mktemp("train2")), timeout=900)


def _same(a, b):
    assert len(a) == len(b) == 2 * HALF, (a, b)
    assert a == b, f"resumed losses differ:\n straight {a}\n resumed  {b}"


def test_resume_is_exact_on_one_rank(world1):
    r = world1["resume"]
    _same(r["straight"], r["split"])
    assert r["state"]["iteration"] == 2 * HALF and r["state"]["consumed_samples"] == 2 * HALF * 8


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_resume_is_exact_at_parallel_layouts(world2, layout):
    _same(world2[layout]["straight"], world2[layout]["split"])


def test_parallel_layouts_train_like_one_rank(world1, world2):
    for layout in ("pp2", "tp2"):
        for a, b in zip(world2[layout]["straight"], world1["resume"]["straight"]):
            assert math.isclose(a, b, rel_tol=1e-5), (layout, a, b)


@pytest.mark.parametrize("target", ["to_tp2", "to_dp2"])
def test_resume_at_another_layout_continues_the_same_losses(world2, target):
    expected = world2["pp2"]["straight"][HALF:]
    got = world2[target]
    assert len(got) == HALF
    for a, b in zip(got, expected):
        assert math.isclose(a, b, rel_tol=1e-5), (target, got, expected)


def test_checkpoints_are_marked_complete(world1):
    assert world1["tags"] == {"global_step2": True, "global_step4": True}
    assert world1["latest"] == "global_step4"


def test_checkpoint_records_the_resolved_config(world1):
    zero = world1["saved_config"]["zero"]
    # The file said zero.stage=1 and overlap_comm null ('auto'): the checkpoint says what ran.
    assert zero["stage"] == 1 and zero["overlap_comm"] is False


def test_corrupt_latest_falls_back_to_newest_complete_checkpoint(world1):
    assert world1["corrupt_latest_resumed_from"] == 4


def test_truncated_shard_falls_back_to_previous_checkpoint(world1):
    assert world1["truncated_resumed_from"] == 2


def test_partial_checkpoint_is_never_resumed(world1):
    assert world1["partial_resumed_from"] == 2


def test_no_intact_checkpoint_is_a_clear_error(world1):
    msg = world1["only_bad_error"]
    assert "no intact checkpoint" in msg and "mp_rank_00_model_states.pt" in msg and "truncated" in msg


def test_mismatched_model_is_a_clear_error(world1):
    msg = world1["mismatch_error"]
    assert "does not match the model" in msg and "model.hidden_size: checkpoint 32, config 48" in msg


def test_diverging_run_aborts_with_clear_message(world1):
    msg = world1["abort_error"]
    assert "2 consecutive skipped or non-finite steps" in msg and "train.max_skipped_steps" in msg


def test_metrics_jsonl_has_every_documented_key(world1):
    train_keys = {"step", "consumed_samples", "tokens", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps",
                  "tokens_per_sec", "tflops_per_rank", "mfu", "mem_gb", "eta_s"}
    records = world1["metrics"]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert steps and evals
    for r in steps:
        assert train_keys <= set(r), train_keys - set(r)
    first = steps[0]
    assert first["tokens"] == 8 * 16 * first["step"] and first["tokens_per_sec"] > 0 and first["mfu"] > 0
    for r in evals:
        assert math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-6)


def test_throughput_leaves_out_validation_and_saves(tmp_path, monkeypatch):
    """Time in `MetricsLogger.paused()` (the loop wraps validation, lm-eval and checkpoint saves in
    it) is not in the window's tokens_per_sec; eta_s still counts it."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.training import metrics as metrics_mod

    clock = [100.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(metrics_mod.MetricsLogger, "_rank_times", lambda self: {})
    cfg = config_from_dict(config_dict(str(tmp_path)))
    m = metrics_mod.MetricsLogger(cfg, world_size=1, enabled=True, peak_tflops=1.0)
    m.start(0, 4)
    for step in (1, 2):
        clock[0] += 1.0  # a step of training
        m.record_step(4.0, tokens=1000, counted=True)
        with m.paused():
            clock[0] += 3.0  # an evaluation or a save
    clock[0] += 1.0
    m.record_step(4.0, tokens=1000, counted=True)
    m.log_step({"iteration": 3, "consumed_samples": 0, "consumed_tokens": 3000, "skipped_steps": 0},
               lr=1e-3, grad_norm=1.0, loss_scale=None, global_batch_size=8)
    record = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_sec"] == pytest.approx(1000.0)  # 3000 tokens in 3 s of training, not 9 s
    assert record["eta_s"] == pytest.approx(3.0)  # 9 s for 3 steps: 1 step left
