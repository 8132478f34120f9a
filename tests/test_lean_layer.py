"""The lean transformer layer (issue 17): the same numbers as the layer it replaced, with fewer
memory-moving ops.

The reference is the former layer, kept verbatim in `_reference_layer.py`; both load one state dict
(the parameter layout did not change) and are compared in fp64 on CPU, outputs and every gradient,
for the configuration variants the shipped presets use, at tp=1 and (two gloo ranks) at tp=2 with
and without sequence parallelism. The op budget per layer is counted with a TorchDispatchMode as a
2-layer model's forward + backward minus a 1-layer model's.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _reference_layer as ref
from _dist import run_distributed
from megatron_neox.config import ModelConfig
from megatron_neox.model.attention import AttentionPlan
from megatron_neox.model.gpt_neox import GPTNeoX
from megatron_neox.model.transformer import TransformerLayer
from megatron_neox.parallel.random import model_parallel_seed

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, vocab_size=64,
            make_vocab_size_divisible_by=8, rotary_pct=0.25)
VARIANTS = {
    "pythia": {},  # partial rotary 0.25, parallel residual, GELU, biases
    "full_rotary_sequential": dict(rotary_pct=1.0, parallel_residual=False),
    "gptj": dict(rotary_dims=4, shared_norm=True, attention_bias=False),
    "gpt3_learned_local": dict(position_embedding="learned", parallel_residual=False,
                               attention_pattern="alternating_local", local_window=3),
    "alibi_swiglu_nobias": dict(position_embedding="alibi", activation="swiglu", attention_bias=False, mlp_bias=False,
                                norm="rmsnorm"),
    "hidden_dropout": dict(hidden_dropout=0.3),
    "sequential_dropout": dict(hidden_dropout=0.3, parallel_residual=False, activation="gelu_tanh"),
}
B, T = 2, 12


def _compare(cfg, layer_number, tp_group=None, sequence_parallel=False, tp_rank=0, tp=1):
    """Max abs difference of outputs and gradients (input and every parameter) between the lean
    layer and the reference, fp64, train mode; both draw the same dropout masks from one seed."""
    torch.manual_seed(layer_number)
    new = TransformerLayer(cfg, layer_number, tp_group, sequence_parallel).double().train()
    old = ref.TransformerLayer(cfg, layer_number, tp_group, sequence_parallel).double().train()
    old.load_state_dict(new.state_dict())
    with torch.no_grad():  # non-zero biases and gains, so every bias path is exercised
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    old.load_state_dict(new.state_dict())
    g = torch.Generator().manual_seed(5)
    t_local = T // tp if sequence_parallel else T
    x = torch.randn(B, T, cfg.hidden_size, generator=g, dtype=torch.float64)
    x = x[:, tp_rank * t_local:(tp_rank + 1) * t_local] if sequence_parallel else x
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    ctx = AttentionPlan(cfg, tp_rank, tp).context(pos, dtype=torch.float64)
    results = []
    for layer, call in ((new, lambda xi: new(xi, ctx)[0]), (old, lambda xi: old(xi, ctx, pos))):
        xi = x.clone().requires_grad_()
        torch.manual_seed(99)
        out = call(xi)
        (out * w).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for _, p in sorted(layer.named_parameters())])
    return max(float((a - b).abs().max()) for a, b in zip(*results))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lean_layer_equals_former_layer_fp64(variant):
    cfg = ModelConfig(**{**BASE, **VARIANTS[variant]})
    for layer_number in (0, 1):  # 1: a banded layer under alternating_local
        assert _compare(cfg, layer_number) < 1e-12, variant


def _tp2_differences(rank, world_size):
    from megatron_neox.topology import Topology

    topo = Topology(pp=1, tp=2)
    model_parallel_seed(1234, topo)
    out = {}
    for name in ("pythia", "gptj", "alibi_swiglu_nobias", "full_rotary_sequential"):
        cfg = ModelConfig(**{**BASE, **VARIANTS[name]})
        for sp in (False, True):
            out[(name, sp)] = _compare(cfg, 0, topo.tp_group, sp, topo.tp_rank, 2)
    return out


def test_lean_layer_equals_former_layer_at_tp2_with_and_without_sequence_parallel():
    for rank_result in run_distributed(_tp2_differences, 2):
        bad = {k: v for k, v in rank_result.items() if not v < 1e-12}
        assert not bad, bad


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_layer(**overrides):
    def count(num_layers):
        torch.manual_seed(0)
        cfg = ModelConfig(**{**BASE, **overrides, "num_layers": num_layers})
        model = GPTNeoX(cfg, cfg.padded_vocab(1)).train()
        tokens = torch.randint(0, 64, (B, T))
        with OpCounter() as c:
            model(tokens, labels=tokens).backward()
        return c.counts

    one, two = count(1), count(2)
    return {op: two[op] - one[op] for op in set(one) | set(two)}


@pytest.mark.parametrize("variant", ["pythia", "full_rotary_sequential"])
def test_layer_forward_backward_moves_little_memory(variant):
    """Per layer, forward + backward without recompute (issue 17's budget; the former layer had 7 cat,
    4 slice_backward and 2 clone): at most 5 concatenations (cat, and stack: the QKV gradient), no
    zero-filled slice gradient, at most one clone / copy_."""
    ops = _ops_per_layer(**VARIANTS[variant])
    assert ops.get("cat", 0) + ops.get("stack", 0) <= 5, ops
    assert ops.get("slice_backward", 0) == 0, ops
    assert ops.get("clone", 0) + ops.get("copy_", 0) <= 1, ops


# ---- model.compile ----------------------------------------------------------------------------


def _loss_and_grads(setting, checkpointed=False):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "num_layers": 3, "compile": setting})
    model = GPTNeoX(cfg, cfg.padded_vocab(1), checkpoint_interval=1 if checkpointed else 0,
                    checkpoint_fn=(lambda f, x: checkpoint(f, x, use_reentrant=True)) if checkpointed else None)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two micro-batches: gradients accumulate in .grad, as at ZeRO 0/1
        tokens = torch.randint(0, 64, (B, T), generator=g)
        loss = model.train()(tokens, labels=tokens)
        loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_compiled_layers_equal_eager_and_compile_once(monkeypatch):
    """Inductor on CPU: loss and every gradient accumulated over two micro-batches equal eager (fp32
    rounding; with the parallel residual's two output biases summed inside the graph, both biases had
    one .grad and the second micro-batch counted twice); the three identical layers share one compiled
    graph, and the re-entrant recompute (first forward without grad) adds one."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no worker pool: 2 cores
    torch._dynamo.reset()
    counters.clear()
    _, loss, grads = _loss_and_grads(False)
    model, c_loss, c_grads = _loss_and_grads(True)
    assert all(model.layer(i)._compiled for i in range(3))
    assert counters["stats"]["unique_graphs"] == 1
    _, k_loss, k_grads = _loss_and_grads(True, checkpointed=True)
    assert counters["stats"]["unique_graphs"] == 2
    for got, got_grads in ((c_loss, c_grads), (k_loss, k_grads)):
        torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_auto_decision_and_refusals():
    from megatron_neox.model.compile import use_compile
    from _layouts import tiny_config

    assert use_compile("auto", "cuda", dropout=False, zero3=False)
    assert not use_compile("auto", "cpu", dropout=False, zero3=False)
    assert not use_compile("auto", "cuda", dropout=True, zero3=False)
    assert not use_compile("auto", "cuda", dropout=False, zero3=True)
    assert use_compile(True, "cpu", dropout=False, zero3=False)
    assert not _loss_and_grads("auto")[0].layer(0)._compiled  # CPU: eager
    from megatron_neox.resolve import resolve

    assert resolve(tiny_config(1, 1, {}), 1).model.compile is False  # set-up decides 'auto' on CPU
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile=true with zero.stage=3 is refused"):
        tiny_config(1, 1, {"model.compile": True, "zero.stage": 3})
    with pytest.raises(ConfigError, match="model.compile=true with model.hidden_dropout"):
        tiny_config(1, 1, {"model.compile": True, "model.hidden_dropout": 0.1})
    tiny_config(1, 1, {"model.compile": "auto", "zero.stage": 3})  # auto: eager there, no refusal


def test_compile_before_torch_2_5_is_eager_under_auto_and_refused_with_true(monkeypatch):
    """torch < 2.5 (setup.py allows 2.3) makes each layer object its own graph: `auto` stays eager on
    CUDA and says why, `true` is refused naming the version; 2.4's opt-in flag counts."""
    import torch._dynamo

    from megatron_neox.errors import ConfigError
    from megatron_neox.hardware import regional_compile_ok
    from megatron_neox.resolve import auto_compile
    from _layouts import tiny_config

    assert regional_compile_ok() and auto_compile("cuda", dropout=False, zero3=False)[0]
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    monkeypatch.setattr(torch._dynamo.config, "inline_inbuilt_nn_modules", False, raising=False)
    assert auto_compile("cuda", dropout=False, zero3=False) == (
        False, "auto: eager (torch 2.4.1+cu121 < 2.5 would compile every layer separately)")
    with pytest.raises(ConfigError, match=r"model.compile=true needs torch >= 2.5 \(this is 2.4.1\+cu121\)"):
        tiny_config(1, 1, {"model.compile": True})
    monkeypatch.setattr(torch._dynamo.config, "inline_inbuilt_nn_modules", True, raising=False)
    assert regional_compile_ok()


def test_partition_activations_is_off_at_tp1():
    """DeepSpeed clones every checkpointed input when partitioning, even over one rank."""
    from _layouts import tiny_config

    from megatron_neox.resolve import resolve
    from megatron_neox.training.engine import deepspeed_config

    keys = {"activation_checkpointing.interval": 1, "activation_checkpointing.partition_activations": True}
    for tp, want in ((1, False), (2, True)):
        ds = deepspeed_config(resolve(tiny_config(1, tp, keys), tp))
        assert ds["activation_checkpointing"]["partition_activations"] is want, tp
