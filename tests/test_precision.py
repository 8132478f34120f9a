"""fp16 and bf16 train like fp32, at pp=1 and pp=2, or are refused at config time.

DeepSpeed refuses fp16 on a CPU; patching `is_fp16_supported` in each rank makes the real dynamic
loss scaler run (its logic does not depend on the device). Each world runs all its scenarios in
one spawn; the tests assert on the results.

Tolerances: the fp16/bf16 runs start from the fp32 weights rounded to 2^-11 (fp16) or 2^-8 (bf16)
relative, and their forward passes round every matmul output the same way. The loss (~4.8) is a
mean over 128 tokens of a cross entropy computed in fp32 from rounded logits: its relative error
is at most the rounding of one logit, 2^-11 ~ 5e-4 for fp16 and 2^-8 ~ 4e-3 for bf16, and smaller
as the 128 roundings average out (measured here: at most 1.2e-4 (fp16) and 3.8e-4 (bf16) over 3
steps, pp=1 and pp=2 alike). Adam normalises each update, so a rounded gradient changes an update by
about its own relative error and the step-1/2 losses stay as close. We allow 10x the unit roundoff:
5e-3 (fp16) and 4e-2 (bf16): far below what a wrong scale does (the unscaled fp16 bug left the loss
at 2.88 where fp32 reached 0.55). Gradient norms carry the same errors plus accumulation over ~10^4
terms (measured 6e-5 and 6.5e-4): 2e-2 (fp16) and 5e-2 (bf16).
"""
import math

import pytest
import torch

from _dist import run_distributed
from _layouts import micro_batches, tiny_config
from megatron_neox.training.engine import deepspeed_config

STEPS = 3
LOSS_RTOL = {"fp16": 5e-3, "bf16": 4e-2}
NORM_RTOL = {"fp16": 2e-2, "bf16": 5e-2}


# ---- what runs inside the ranks ------------------------------------------------------------


def _allow_fp16():
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True  # the scaler's logic is device-independent


def _head(model):
    from megatron_neox.model.gpt_neox import LMHead

    return next((m for m in model.modules() if isinstance(m, LMHead)), None)  # None on a first stage


def _run(pp, precision, overrides=None, poison_step=None, steps=STEPS):
    """Train `steps` steps; record losses, reported norms and scales, dL/dlogits of the first
    micro-batch at step 0, the norm of the gradients Adam receives, and which steps changed weights."""
    import torch.distributed as dist

    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step

    _allow_fp16()
    cfg = tiny_config(pp, 1, {"precision": precision, "zero.stage": 1, **(overrides or {})})
    cfg, topo = setup(cfg)
    engine, model, clipper = build_engine(cfg, topo)
    out = {"loss": [], "norm": [], "scale": [], "skipped": [], "changed": [], "adam_norm": [], "dlogits": None}

    head = _head(model)
    if head is not None:
        def keep_grad(module, inputs, logits):
            if out["dlogits"] is None:
                logits.register_hook(lambda g: out.__setitem__("dlogits", g.detach().float().clone()))
        head.register_forward_hook(keep_grad)

    inner = engine.optimizer.optimizer  # the torch AdamW that ZeRO's fp32 master partition feeds
    adam_step = inner.step

    seen = {"sq": 0.0, "calls": 0}

    def recording_step(*args, **kwargs):
        # ZeRO calls it once per parameter group, showing Adam that group only.
        for group in inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen["sq"] += float(p.grad.double().pow(2).sum())
        seen["calls"] += 1
        return adam_step(*args, **kwargs)

    inner.step = recording_step
    poison = {"on": False}
    if poison_step is not None and topo.pp_rank == 0:
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)
    for step in range(steps):
        poison["on"] = step == poison_step
        before = [p.detach().clone() for p in model.parameters()]
        seen.update(sq=0.0, calls=0)
        r = train_step(engine, micro_batches(step, cfg, topo.dp, topo.dp_rank), topo, clipper)
        adam = torch.tensor([seen["sq"], seen["calls"]], dtype=torch.float64)
        dist.all_reduce(adam)  # dp = tp = 1: the world is the pipeline
        out["adam_norm"].append(math.sqrt(adam[0]) if adam[1] else None)
        changed = torch.tensor([any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))])
        dist.all_reduce(changed.int(), op=dist.ReduceOp.MAX)
        for key, value in (("loss", r.loss), ("norm", r.grad_norm), ("scale", r.loss_scale),
                           ("skipped", r.skipped), ("changed", bool(changed))):
            out[key].append(value)
    out["initial_scale"] = 2.0 ** cfg.loss_scale.initial_scale_power
    return out


def _world(rank, world_size, pp):
    return {
        "fp32": _run(pp, "fp32"),
        "fp16": _run(pp, "fp16"),
        "bf16": _run(pp, "bf16"),
        "overflow": _run(pp, "fp16", {"loss_scale.initial_scale_power": 8, "loss_scale.window": 2,
                                      "loss_scale.hysteresis": 1}, poison_step=1, steps=5),
    }


@pytest.fixture(scope="module", params=[1, 2], ids=["pp1", "pp2"])
def runs(request):
    pp = request.param
    per_rank = run_distributed(_world, pp, pp, timeout=600)
    last = per_rank[-1]  # the last stage holds the head (dlogits)
    return last


# ---- config-time refusals ------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("pp", [1, 2])
def test_half_precision_without_zero_is_refused(precision, pp):
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"precision={precision} with zero.stage=0 is refused.*zero.stage=1"):
        tiny_config(pp, 1, {"precision": precision, "zero.stage": 0})


def test_sequence_parallel_with_partitioned_activations_is_refused():
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match="partition_activations=true with parallel.sequence_parallel=true"):
        tiny_config(1, 2, {"parallel.sequence_parallel": True, "activation_checkpointing.interval": 1,
                           "activation_checkpointing.partition_activations": True})
    # Either one alone is fine.
    tiny_config(1, 2, {"parallel.sequence_parallel": True, "activation_checkpointing.interval": 1})
    tiny_config(1, 2, {"activation_checkpointing.interval": 1, "activation_checkpointing.partition_activations": True})


@pytest.mark.parametrize("precision,pp,world,stage,overlap", [
    ("fp32", 1, 1, 0, False),   # one data-parallel rank: nothing to shard, ZeRO-1 would only copy
    ("fp32", 2, 2, 0, False),
    ("fp32", 1, 2, 1, True),    # dp = 2 without a pipeline: overlap the reduction
    ("fp32", 2, 4, 1, False),   # DeepSpeed's pipeline engine cannot overlap
    ("fp16", 1, 1, 1, False),   # half precision needs the ZeRO optimizer's fp32 master weights
    ("bf16", 2, 2, 1, False),
])
def test_auto_zero_stage_per_layout_and_precision(precision, pp, world, stage, overlap):
    from megatron_neox.resolve import resolve

    resolved = resolve(tiny_config(pp, 1, {"precision": precision, "zero.stage": "auto"}), world)
    ds = deepspeed_config(resolved)["zero_optimization"]
    assert (ds["stage"], ds["overlap_comm"]) == (stage, overlap)
    assert (resolved.zero.stage, resolved.zero.overlap_comm) == (stage, overlap)
    assert resolved.resolved.why("zero.stage").startswith("auto: ")


# ---- training ------------------------------------------------------------------------------


def test_fp16_loss_is_scaled_in_backward(runs):
    # dL/dlogits of the same micro-batch at the same (rounded) weights: fp16's is the fp32 one times
    # the loss scale, so small gradients survive fp16's range.
    g16, g32 = runs["fp16"]["dlogits"], runs["fp32"]["dlogits"]
    ratio = float(g16.norm() / g32.norm())
    assert ratio == pytest.approx(runs["fp16"]["initial_scale"], rel=1e-2)
    assert float(runs["bf16"]["dlogits"].norm() / g32.norm()) == pytest.approx(1.0, rel=1e-2)  # bf16: no scaling


def test_reported_grad_norm_and_loss_scale_are_true(runs):
    fp32, fp16, bf16 = runs["fp32"], runs["fp16"], runs["bf16"]
    assert fp16["norm"][0] == pytest.approx(fp32["norm"][0], rel=NORM_RTOL["fp16"])  # unscaled
    assert bf16["norm"][0] == pytest.approx(fp32["norm"][0], rel=NORM_RTOL["bf16"])
    assert fp16["scale"] == [fp16["initial_scale"]] * STEPS  # no overflow: window 1000 not reached
    assert bf16["scale"] == [None] * STEPS and fp32["scale"] == [None] * STEPS


def test_clipping_fires_on_the_unscaled_gradient(runs):
    # clip_grad = 1.0 and the step-0 gradient norm is ~1.6: Adam must receive gradients of norm 1.0.
    for name in ("fp16", "bf16"):
        r = runs[name]
        assert r["norm"][0] > 1.2, r["norm"]
        assert r["adam_norm"][0] == pytest.approx(1.0, rel=1e-3), (name, r["adam_norm"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_three_steps_match_fp32(runs, precision):
    got, want = runs[precision]["loss"], runs["fp32"]["loss"]
    for s in range(STEPS):
        assert got[s] == pytest.approx(want[s], rel=LOSS_RTOL[precision]), (precision, s, got, want)
    assert all(runs[precision]["changed"])


def test_fp16_overflow_skips_step_and_rescales(runs):
    r = runs["overflow"]
    assert r["skipped"] == [False, True, False, False, False]
    assert r["changed"] == [True, False, True, True, True], "a skipped step must leave the weights unchanged"
    # 2**8 to start; halved by the overflow at step 1; doubled on the first update after window=2
    # clean steps (steps 2 and 3), i.e. at step 4.
    assert r["scale"] == [256.0, 128.0, 128.0, 128.0, 256.0]
    assert r["adam_norm"][1] is None, "Adam must not run on the overflowed step"
    assert all(math.isfinite(x) for i, x in enumerate(r["loss"]) if i != 1)


def test_reshard_of_a_zero0_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    # zero.stage='auto' saves fp32 single-data-parallel runs without ZeRO optimizer files, which
    # DeepSpeed's ds_to_universal needs: a clear error, not its FileNotFoundError.
    from megatron_neox.convert import universal
    from megatron_neox.errors import CheckpointError

    tag = tmp_path / "global_step6"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    monkeypatch.setattr(universal, "read_meta", lambda src: {"iteration": 6})
    with pytest.raises(CheckpointError, match=r"saved without ZeRO.*\*_optim_states.pt.*zero.stage=1"):
        universal.to_universal(tmp_path, tmp_path / "out", tag="global_step6")
