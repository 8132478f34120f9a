"""train.objective sft and dpo through the real trainer: pp=2, tp=2, dp=2 give the 1-rank losses, the
DPO statistics reach metrics.jsonl, and the DPO run starts at log 2 (its reference is the start model).

One 1-rank world and one 8-rank world run both objectives (process start-up is the cost)."""
import json
import math
import os

import pytest

from _dist import run_distributed
from tests._chat import chat_tokenizer, write_jsonl
from tests._train import set_keys

STEPS = 2

SFT = [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                     {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]} for i in range(12)]
SFT += [{"prompt": f"Two plus {i} is", "completion": f" {2 + i}"} for i in range(12)]
DPO = [{"prompt": [{"role": "user", "content": f"Name colour {i}."}],
        "chosen": [{"role": "assistant", "content": ["red", "green", "blue"][i % 3]}],
        "rejected": [{"role": "assistant", "content": "no"}]} for i in range(16)]


def _config(tmp, objective, pp, tp, tag):
    run = os.path.join(tmp, f"{objective}-{tag}")
    return set_keys({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64, "vocab_size": 300,
                  "rotary_pct": 0.5, "make_vocab_size_divisible_by": 8},
        "parallel": {"pp": pp, "tp": tp},
        "train": {"iters": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "seed": 1234, "objective": objective},
        "optimizer": {"lr": 1e-2}, "lr_schedule": {"warmup_iters": 1}, "zero": {"stage": 1},
        "data": {"prefixes": [os.path.join(tmp, objective)], "split": "3,1,0"},
        "tokenizer": {"path": os.path.join(tmp, "tok", "tokenizer.json")},
        "checkpoint": {"dir": os.path.join(run, "ckpt")},
        "log": {"dir": run, "interval": 1}, "eval": {"interval": STEPS, "iters": 1},
    }, {})


def _train_both(rank, world_size, tmp, pp, tp):
    from megatron_neox.config import config_from_dict
    from megatron_neox.training.trainer import train

    out = {}
    for objective in ("sft", "dpo"):
        cfg = _config(tmp, objective, pp, tp, world_size)
        if world_size > 1:
            cfg["checkpoint"] = {}  # saving is not what this world checks (and 8 ranks' fsyncs cost seconds)
        r = train(config_from_dict(cfg))
        out[objective] = r.losses
        out[objective + "_eval"] = r.eval_losses
    if world_size == 1:  # a resumed DPO run reads its start model's reference back (its weights have moved)
        cfg = _config(tmp, "dpo", pp, tp, world_size)
        cfg["train"]["iters"] = STEPS + 1
        out["dpo_resumed"] = train(config_from_dict(cfg)).losses
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from megatron_neox.data.chat_preprocess import preprocess_chat

    tmp = str(tmp_path_factory.mktemp("ft"))
    tok = chat_tokenizer(os.path.join(tmp, "tok"))
    for kind, lines in (("sft", SFT), ("dpo", DPO)):
        preprocess_chat([str(write_jsonl(os.path.join(tmp, f"{kind}.jsonl"), lines))], str(tok),
                        os.path.join(tmp, kind), kind, max_length=65)
    one = run_distributed(_train_both, 1, tmp, 1, 1, timeout=300)[0]
    eight = run_distributed(_train_both, 8, tmp, 2, 2, timeout=600)[0]
    return tmp, one, eight


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_pp2_tp2_dp2_equals_one_rank(worlds, objective):
    _, one, eight = worlds
    assert len(one[objective]) == STEPS
    for a, b in zip(one[objective], eight[objective]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one[objective], eight[objective])
    for a, b in zip(one[objective + "_eval"], eight[objective + "_eval"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_dpo_starts_at_log2_and_logs_rewards(worlds):
    tmp, one, eight = worlds
    for losses in (one["dpo"], eight["dpo"]):
        assert abs(losses[0] - math.log(2)) < 1e-5, "step 1's policy is the reference: the loss is log 2"
    records = [json.loads(line) for line in open(os.path.join(tmp, "dpo-8", "metrics.jsonl"))]
    train = [r for r in records if "rewards_accuracy" in r]
    evals = [r for r in records if "eval_rewards_accuracy" in r]
    assert len(train) == STEPS and len(evals) == 1
    assert all(0.0 <= r["rewards_accuracy"] <= 1.0 and r["logps_chosen"] < 0 for r in train)
    assert train[0]["rewards_margin"] == pytest.approx(0.0, abs=1e-6)
    assert os.path.exists(os.path.join(tmp, "dpo-1", "ckpt", "dpo_reference.npz"))
    assert len(one["dpo_resumed"]) == 1 and math.isfinite(one["dpo_resumed"][0])
