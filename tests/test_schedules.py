"""training/schedules.py against what the shipped configs claim to reproduce.

GPT-3 (Brown et al. 2020, appendix B): "a linear LR warmup over the first 375 million tokens",
"cosine decay for learning rate down to 10% of its value, over 260 billion tokens (after 260
billion tokens, training continues at 10% of the original learning rate)", and "we also gradually
increase the batch size linearly from a small value (32k tokens) to the full value over the first
4-12 billion tokens of training, depending on the model size". Pythia (Biderman et al. 2023):
143,000 steps of 1024 x 2048 tokens, warm-up over 1% of them, cosine decay to 10% of the peak.
Pure arithmetic, no engine: each config is resolved at its smallest world (dp = 1).
"""
import math

import pytest

from megatron_neox.config import load_config
from megatron_neox.resolve import resolve
from megatron_neox.training.schedules import Schedule

GPT3 = ["125M", "350M", "760M", "1.3B", "2.7B", "6.7B", "13B", "175B"]
PYTHIA = ["pythia-70M", "pythia-160M", "pythia-410M", "pythia-1B", "pythia-1.4B", "pythia-2.8B", "pythia-6.9B",
          "pythia-12B"]
B = 1_000_000_000


def _schedule(name: str):
    cfg = load_config(name)
    cfg = resolve(cfg, cfg.parallel.pp * cfg.parallel.tp)
    return cfg, Schedule.from_config(cfg)


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_lr_warms_up_over_375M_tokens_then_cosine_to_10_percent_at_260B_tokens(name):
    cfg, s = _schedule(name)
    peak = cfg.optimizer.lr
    lr = lambda tokens: s.plan(0, tokens).lr  # noqa: E731 (by tokens alone: the iteration plays no part)
    assert lr(0) == pytest.approx(peak / 375e6) and lr(375_000_000 // 2) == pytest.approx(peak / 2)
    assert lr(375_000_000) == pytest.approx(peak)
    middle = 375_000_000 + (260 * B - 375_000_000) // 2
    assert lr(middle) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5)  # half-way down the cosine
    assert lr(260 * B - 10 * B) > 0.1 * peak
    assert lr(260 * B) == pytest.approx(0.1 * peak) and lr(300 * B) == pytest.approx(0.1 * peak)
    decreasing = [lr(t * B) for t in range(1, 300, 7)]
    assert all(a >= b for a, b in zip(decreasing, decreasing[1:]))


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_batch_ramps_from_32k_tokens_to_full_over_the_configured_tokens(name):
    cfg, s = _schedule(name)
    seq, full = cfg.model.seq_length, cfg.train.global_batch_size
    ramp = cfg.train.batch_rampup.ramp_tokens
    assert 4 * B <= ramp <= 12 * B  # the paper's range, longer for larger models
    unit = cfg.train.micro_batch_size  # micro x dp at dp = 1
    batch = lambda tokens: s.plan(0, tokens).global_batch_size  # noqa: E731
    # 32k tokens = 16 sequences of 2048, rounded down to whole micro-batches (at least one).
    assert batch(0) == max(unit, 32768 // seq // unit * unit)
    assert batch(ramp - 1) < full and batch(ramp) == full and batch(300 * B) == full
    sizes = [batch(ramp * k // 64) for k in range(65)]
    assert all(b % unit == 0 for b in sizes) and sizes == sorted(sizes)
    # Linear in tokens: at half the ramp, half-way from the start to the full batch (within one increment).
    increment = cfg.train.batch_rampup.increment_tokens // seq // unit * unit or unit
    assert abs(batch(ramp // 2) - (batch(0) + full) / 2) <= increment


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_run_length_consumes_300B_tokens(name):
    cfg, s = _schedule(name)
    seq, full = cfg.model.seq_length, cfg.train.global_batch_size
    # Walk the ramp step by step (what the trainer does), then whole batches to the budget.
    tokens, steps = 0, 0
    while tokens < cfg.train.batch_rampup.ramp_tokens:
        tokens += s.plan(steps, tokens).global_batch_size * seq
        steps += 1
    rest = s.iters - steps  # full batches after the ramp
    assert tokens + (rest - 1) * full * seq < 300 * B <= tokens + rest * full * seq  # the last step crosses 300B
    assert rest == math.ceil((300 * B - tokens) / (full * seq))


@pytest.mark.parametrize("name", PYTHIA)
def test_pythia_warms_up_over_1_percent_of_143000_steps_then_cosine_to_min_lr(name):
    cfg, s = _schedule(name)
    peak, floor = cfg.optimizer.lr, cfg.lr_schedule.min_lr
    assert floor == pytest.approx(0.1 * peak)  # Pythia decays to 10% of the peak
    assert s.iters == 143_000 and s.lr.warmup_iters == 1430
    lr = lambda step: s.plan(step, step * 1024 * 2048).lr  # noqa: E731
    assert lr(0) == pytest.approx(peak / 1430) and lr(714) == pytest.approx(peak * 715 / 1430)
    assert lr(1429) == pytest.approx(peak) and lr(1430) == pytest.approx(peak)
    assert lr(1430 + (143_000 - 1430) // 2) == pytest.approx(floor + (peak - floor) / 2)
    assert lr(143_000) == pytest.approx(floor)
    assert {s.plan(step, 0).global_batch_size for step in (0, 1000, 142_999)} == {1024}


def test_20B_warmup_is_1_percent_of_its_150000_decay_steps():
    cfg, s = _schedule("20B")
    assert s.iters == 150_000 and s.lr.warmup_iters == 1500
    assert s.plan(149_999, 0).lr > cfg.lr_schedule.min_lr and s.plan(150_000, 0).lr == pytest.approx(9.7e-6)
