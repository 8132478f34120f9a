"""Every (pp, tp, dp) layout trains like one rank: same losses and gradient norms (fp32).

Real ranks on CPU with gloo. Process start-up is the cost (~8 s a world), so each world size runs
all its scenarios in one spawn (module-scoped fixtures) and the tests below assert on the results.
"""
import math

import pytest
import torch

from _dist import run_distributed
from _layouts import micro_batches, run_steps, tiny_config

STEPS = 3
RTOL = 1e-5


# ---- what runs inside the ranks ------------------------------------------------------------


def _fp16_scaler_scenario():
    """fp16 + ZeRO-1 with a forced inf gradient at step 1: the step is skipped (weights unchanged),
    the scale halves, and it doubles back after `window` good steps."""
    from deepspeed.accelerator import get_accelerator

    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    acc = get_accelerator()
    acc.is_fp16_supported = lambda: True  # DeepSpeed refuses fp16 on CPU; the scaler logic is generic
    cfg = tiny_config(1, 1, {
        "precision": "fp16", "zero.stage": 1,
        "loss_scale.initial_scale_power": 8, "loss_scale.window": 2, "loss_scale.hysteresis": 1,
    })
    cfg, topo = setup(cfg)
    engine, model, clipper = build_engine(cfg, topo)
    poison = {"on": False}
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)
    out = {"scale": [], "skipped": [], "changed": []}
    for step in range(5):
        poison["on"] = step == 1
        before = [p.detach().clone() for p in model.parameters()]
        r = train_step(engine, micro_batches(step, cfg, topo.dp, topo.dp_rank), topo, clipper)
        out["scale"].append(r.loss_scale)
        out["skipped"].append(r.skipped)
        out["changed"].append(any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())))
        out.setdefault("loss", []).append(r.loss)
    return out


def _bf16_scenario(pp):
    cfg = tiny_config(pp, 1, {"precision": "bf16", "optimizer.lr": 3e-2, "optimizer.clip_grad": 0.0})
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    cfg, topo = setup(cfg)
    engine, _, clipper = build_engine(cfg, topo)
    batch = micro_batches(0, cfg, topo.dp, topo.dp_rank)
    return [train_step(engine, batch, topo, clipper).loss for _ in range(6)]  # one batch, again and again


def _world(rank, world_size, scenarios):
    out = {}
    for name, (pp, tp, overrides) in scenarios.items():
        if name == "fp16":
            out[name] = _fp16_scaler_scenario()
        elif name.startswith("bf16"):
            out[name] = _bf16_scenario(pp)
        else:
            out[name] = run_steps(tiny_config(pp, tp, overrides), STEPS)
    return out


# Packed documents (tests/_layouts.py) with positions and attention reset at every EOD.
DOCS = {"data.reset_position_ids": True, "data.reset_attention_mask": True, "data.eod_mask_loss": True}
ALIBI_LOCAL = {"model.position_embedding": "alibi", "model.attention_pattern": "alternating_local",
               "model.local_window": 4}

WORLDS = {
    1: {
        "ref": (1, 1, {}),
        "ckpt": (1, 1, {"activation_checkpointing.interval": 1}),
        "bf16": (1, 1, {}),
        "docs": (1, 1, DOCS),
        "docs_unmasked": (1, 1, {"data.eod_mask_loss": True}),  # the same tokens and loss mask, no resets
        "docs_alibi_local": (1, 1, {**DOCS, **ALIBI_LOCAL}),
    },
    2: {
        "pp2": (2, 1, {}),
        "tp2": (1, 2, {}),
        "dp2": (1, 1, {}),
        "dp2_zero0": (1, 1, {"zero.stage": 0}),
        "dp2_zero2": (1, 1, {"zero.stage": 2}),
        "dp2_zero3": (1, 1, {"zero.stage": 3}),
        "pp2_zero0": (2, 1, {"zero.stage": 0}),
        "pp2_ckpt": (2, 1, {"activation_checkpointing.interval": 1}),
        "tp2_ckpt_partitioned": (1, 2, {"activation_checkpointing.interval": 2,
                                        "activation_checkpointing.partition_activations": True}),
        "tp2_sequence_parallel": (1, 2, {"parallel.sequence_parallel": True}),
        "pp2_tied": (2, 1, {"model.tie_embeddings": True}),
        "bf16_pp2": (2, 1, {}),
        "fp16": (1, 1, {}),
        "docs_pp2": (2, 1, DOCS),
        "docs_tp2": (1, 2, DOCS),
        "docs_dp2": (1, 1, DOCS),
        "docs_tp2_sequence_parallel_ckpt": (1, 2, {**DOCS, "parallel.sequence_parallel": True,
                                                   "activation_checkpointing.interval": 1}),
        "docs_pp2_ckpt": (2, 1, {**DOCS, "activation_checkpointing.interval": 1}),
        "docs_alibi_local_tp2": (1, 2, {**DOCS, **ALIBI_LOCAL}),
    },
    4: {
        "pp2_tp2": (2, 2, {}),
        "pp2_dp2": (2, 1, {}),
        "tp2_dp2": (1, 2, {}),
    },
    8: {
        "pp2_tp2_dp2": (2, 2, {}),
    },
}


@pytest.fixture(scope="module")
def results():
    out = {}
    for world, scenarios in WORLDS.items():
        out.update(run_distributed(_world, world, scenarios, timeout=600)[0])
    return out


@pytest.fixture(scope="module")
def tied_ref():
    return run_distributed(_tied_ref, 1, timeout=300)[0]


def _tied_ref(rank, world_size):
    return run_steps(tiny_config(1, 1, {"model.tie_embeddings": True}), STEPS)


def _assert_same(got, want, what):
    (gl, gn), (wl, wn) = got, want
    assert len(gl) == STEPS
    for s in range(STEPS):
        assert math.isclose(gl[s], wl[s], rel_tol=RTOL), f"{what}: step {s} loss {gl[s]} != 1-rank {wl[s]}"
        assert gn[s] is not None and math.isclose(gn[s], wn[s], rel_tol=RTOL), (
            f"{what}: step {s} grad norm {gn[s]} != 1-rank {wn[s]}")


@pytest.mark.parametrize("layout", ["pp2", "tp2", "dp2", "pp2_tp2", "pp2_dp2", "tp2_dp2", "pp2_tp2_dp2"])
def test_layout_matches_one_rank_losses_and_grad_norms(results, layout):
    _assert_same(results[layout], results["ref"], layout)


def test_reference_run_learns(results):
    losses, norms = results["ref"]
    assert losses[0] > losses[-1], losses  # the tiny model does fit its batches
    assert all(n > 0 for n in norms)


@pytest.mark.parametrize("zero", ["dp2_zero0", "dp2_zero2", "dp2_zero3"])
def test_zero_stages_match_zero1(results, zero):
    _assert_same(results[zero], results["dp2"], zero)


def test_pipeline_zero0_has_global_grad_norm(results):
    # DeepSpeed alone would clip each stage by its own norm here; ours is the global one.
    _assert_same(results["pp2_zero0"], results["ref"], "pp2 + ZeRO-0")


@pytest.mark.parametrize("name", ["ckpt", "pp2_ckpt", "tp2_ckpt_partitioned"])
def test_activation_checkpointing_changes_no_loss(results, name):
    _assert_same(results[name], results["ref"], name)


def test_sequence_parallel_matches_one_rank(results):
    _assert_same(results["tp2_sequence_parallel"], results["ref"], "tp2 + sequence parallel")


def test_tied_embeddings_across_stages_match_one_rank(results, tied_ref):
    _assert_same(results["pp2_tied"], tied_ref, "pp2 tied embeddings")


@pytest.mark.parametrize("name", ["bf16", "bf16_pp2"])
def test_bf16_runs_and_lowers_the_loss(results, name):
    losses = results[name]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_fp16_overflow_skips_step_and_rescales(results):
    r = results["fp16"]
    assert r["skipped"] == [False, True, False, False, False]
    assert r["changed"] == [True, False, True, True, True], "a skipped step must leave the weights unchanged"
    # 2**8 to start; halved by the overflow at step 1; DeepSpeed doubles it on the first update
    # after window=2 clean steps (steps 2 and 3), i.e. at step 4.
    assert r["scale"] == [256.0, 128.0, 128.0, 128.0, 256.0]
    assert all(math.isfinite(x) for i, x in enumerate(r["loss"]) if i != 1)


@pytest.mark.parametrize("layout", ["docs_pp2", "docs_tp2", "docs_dp2", "docs_tp2_sequence_parallel_ckpt",
                                    "docs_pp2_ckpt"])
def test_document_masking_layouts_match_one_rank(results, layout):
    _assert_same(results[layout], results["docs"], layout)


def test_document_masking_alibi_local_tp2_matches_one_rank(results):
    # ALiBi slopes are sliced per tensor-parallel rank; the band and documents apply to all heads.
    _assert_same(results["docs_alibi_local_tp2"], results["docs_alibi_local"], "ALiBi + local + documents at tp=2")


def test_document_masking_changes_the_loss(results):
    masked, _ = results["docs"]
    unmasked, _ = results["docs_unmasked"]
    assert all(math.isfinite(x) for x in masked + unmasked)
    # Same tokens, same loss mask: only positions and attention differ. From the first step on
    # (before any update) the masked model predicts differently.
    assert abs(masked[0] - unmasked[0]) > 1e-3, (masked, unmasked)
