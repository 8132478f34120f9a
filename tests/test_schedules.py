"""The learning-rate schedule at chosen points, against values worked out by hand from its
definition (GPT-3 section B: linear warm-up, then cosine decay to 10% of the peak; flat after):
a resumed run and a fresh one share any schedule bug, so only fixed values can show one."""
import pytest

from megatron_neox.config import config_from_dict
from megatron_neox.training.schedules import LRSchedule

PEAK = 1e-3


def _schedule(**lr_schedule) -> LRSchedule:
    cfg = config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 1000},
        "train": {"iters": 20, "micro_batch_size": 2, "global_batch_size": 8},
        "optimizer": {"lr": PEAK}, "lr_schedule": lr_schedule})
    return LRSchedule.from_config(cfg, cfg.train.iters)


@pytest.mark.parametrize("style,halfway", [("cosine", 0.55e-3), ("linear", 0.55e-3), ("constant", PEAK)])
def test_lr_by_iteration_warms_up_then_decays_to_a_tenth_of_the_peak(style, halfway):
    s = _schedule(warmup_iters=4, decay_style=style)
    # Warm-up: step i (0-based) runs at peak * (i + 1) / 4, so the first step already trains.
    assert [s.lr(i, 0) for i in range(4)] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert s.lr(4, 0) == pytest.approx(PEAK)  # decay starts at the peak
    assert s.lr(12, 0) == pytest.approx(halfway)  # half-way through the 16 decay steps: (peak + min) / 2
    end = PEAK if style == "constant" else 1e-4  # min_lr_ratio 0.1
    assert s.lr(20, 0) == pytest.approx(end) and s.lr(1000, 0) == pytest.approx(end)
    if style == "cosine":  # a quarter of the way: min + (peak - min) * (1 + cos(pi/4)) / 2
        assert s.lr(8, 0) == pytest.approx(1e-4 + 0.9e-3 * 0.8535533905932737)


def test_lr_by_tokens_with_an_explicit_min_lr():
    s = _schedule(warmup_tokens=1000, decay_tokens=11_000, min_lr=2e-4)
    assert s.lr(0, 0) == pytest.approx(PEAK / 1000)  # never 0: max(tokens, 1)
    assert s.lr(3, 500) == pytest.approx(0.5e-3)
    assert s.lr(9, 1000) == pytest.approx(PEAK)
    assert s.lr(50, 6000) == pytest.approx(0.6e-3)  # half-way through the decay tokens: (peak + min) / 2
    assert s.lr(99, 11_000) == pytest.approx(2e-4) and s.lr(500, 10**9) == pytest.approx(2e-4)
