"""tools/plan.py and megatron_neox.plan: exact parameter counts, pipeline partition, memory model.

The published counts are the `Total params` of the Pythia suite (EleutherAI/pythia README and the
HF model cards) and GPT-NeoX-20B's HF checkpoint. The activation model is checked against the
tensors autograd actually saves in small CPU models, so the itemised formula cannot drift from
the code it describes. Two launches of the real tool (about 5 s each: torch + DeepSpeed import).
"""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megatron_neox.config import ModelConfig, config_from_dict, load_config
from megatron_neox.errors import ConfigError
from megatron_neox.model.gpt_neox import GPTNeoX, attention_plan, count_parameters
from megatron_neox.model.transformer import TransformerLayer
from megatron_neox.plan import (
    candidate_layouts,
    estimate_memory,
    head_activation_bytes,
    layer_activation_bytes,
    layer_params_per_rank,
    make_plan,
    partition,
)

REPO = Path(__file__).resolve().parent.parent

PUBLISHED = {
    "pythia-70M": 70_426_624,
    "pythia-160M": 162_322_944,
    "pythia-410M": 405_334_016,
    "pythia-1B": 1_011_781_632,
    "pythia-1.4B": 1_414_647_808,
    "pythia-2.8B": 2_775_208_960,
    "pythia-6.9B": 6_857_302_016,
    "pythia-12B": 11_846_072_320,
    "20B": 20_554_567_680,
}
GPT3 = {"125M": 125e6, "350M": 350e6, "760M": 760e6, "1.3B": 1.3e9, "2.7B": 2.7e9, "6.7B": 6.7e9, "13B": 13e9,
        "175B": 175e9}


def _plan_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_are_exact(name):
    cfg = load_config(name)
    assert make_plan(cfg).parameters["total"] == PUBLISHED[name]


# The published HF config.json values of each family (EleutherAI/gpt-j-6B, meta-llama/Llama-2-7b-hf,
# Llama-2-70b-hf, Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B); the classes count on the
# meta device.
HF_FAMILIES = {
    "gptj-6B": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                                                      n_positions=2048, vocab_size=50400)),
    "llama2-7B": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=11008,
                                                          num_hidden_layers=32, num_attention_heads=32,
                                                          num_key_value_heads=32, vocab_size=32000)),
    "llama2-70B": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=8192, intermediate_size=28672,
                                                           num_hidden_layers=80, num_attention_heads=64,
                                                           num_key_value_heads=8, vocab_size=32000)),
    "llama3-8B": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=14336,
                                                          num_hidden_layers=32, num_attention_heads=32,
                                                          num_key_value_heads=8, vocab_size=128256)),
    "mistral-7B": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=4096, intermediate_size=14336,
                                                               num_hidden_layers=32, num_attention_heads=32,
                                                               num_key_value_heads=8, vocab_size=32000)),
    "qwen2.5-7B": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=3584, intermediate_size=18944,
                                                           num_hidden_layers=28, num_attention_heads=28,
                                                           num_key_value_heads=4, vocab_size=152064)),
}
FAMILY_COUNTS = {"gptj-6B": 6_050_882_784, "llama2-7B": 6_738_415_616, "llama2-70B": 68_976_648_192,
                 "llama3-8B": 8_030_261_248, "mistral-7B": 7_241_732_096, "qwen2.5-7B": 7_615_616_512}


@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_family_configs_count_what_transformers_builds(name):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, kw = HF_FAMILIES[name]
    with torch.device("meta"):
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert hf_count == FAMILY_COUNTS[name]
    assert make_plan(load_config(name)).parameters["total"] == hf_count


@pytest.mark.parametrize("name", sorted(GPT3))
def test_gpt3_sizes_within_two_percent_of_their_names(name):
    cfg = load_config(name)
    total = count_parameters(cfg.model, cfg.parallel.tp)["total"]
    assert abs(total / GPT3[name] - 1) < 0.02, total


def test_plan_tool_20B_on_96_gpus_fits_as_trained():
    r = _plan_tool("--config", "20B.json", "--gpus", "96", "--gpu-memory-gb", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parameters: 20554567680\n" in r.stdout
    assert "pp=4 tp=2 dp=12 (96 ranks), micro_batch=4 grad_accum=32 global_batch=1536" in r.stdout
    assert "padded_vocab=50432" in r.stdout
    for stage, (lo, hi) in enumerate([(0, 11), (12, 22), (23, 33), (34, 46)]):
        assert f"stage {stage}: layers {lo}-{hi}:" in r.stdout
    assert ": fits" in r.stdout and "layouts of 96 GPUs that fit in 40 GiB" in r.stdout


def test_plan_tool_20B_on_100_gpus_does_not_fit():
    r = _plan_tool("--config", "20B", "--gpus", "100")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DOES NOT FIT: world size 100 is not divisible by pp * tp = 4 * 2 = 8" in r.stdout
    assert "parameters: 20554567680" in r.stdout
    assert "Traceback" not in r.stderr


def test_20B_layouts_that_do_not_fit():
    cfg = load_config("20B")
    assert "global_batch_size=1536 is not divisible by micro_batch_size*dp = 4*9" in make_plan(cfg, 72).problem
    assert "more than --gpu-memory-gb 16" in make_plan(cfg, 96, gpu_memory_gb=16).problem
    fits = {(p.layout.pp, p.layout.tp) for p in candidate_layouts(cfg, 96, 40)}
    assert (4, 2) in fits and (1, 1) not in fits  # 20B unsharded weights alone exceed 40 GiB
    assert all(96 % (pp * tp) == 0 and tp <= 8 for pp, tp in fits)


def _with_partition(cfg, method):
    data = cfg.to_dict()
    data["parallel"]["partition_method"] = method
    return config_from_dict(data)


def test_partition_methods_use_deepspeed_semantics():
    cfg = load_config("20B")
    assert partition(cfg) == [0, 12, 23, 34, 47]  # 11 transformer layers per stage
    assert partition(_with_partition(cfg, "uniform")) == [0, 12, 24, 36, 47]
    parts = partition(_with_partition(cfg, "parameters"))
    assert parts[0] == 0 and parts[-1] == 47 and len(parts) == 5
    with pytest.raises(ConfigError, match=r"found no valid layers.*TransformerLayerPipe"):
        partition(_with_partition(cfg, "type:mamba"))
    with pytest.raises(ConfigError, match=r"invalid regular expression"):
        partition(_with_partition(cfg, "type:["))


def test_tied_head_is_a_second_embedding_copy_only_with_a_pipeline():
    plan = make_plan(load_config("175B"))
    first, last = plan.stages[0], plan.stages[-1]
    assert last.params_per_rank - first.params_per_rank == plan.cfg.model.hidden_size * 2  # + final LayerNorm
    single = make_plan(load_config("125M"))
    assert single.stages[0].params_per_rank == single.parameters["total"]


# ---- memory -------------------------------------------------------------------------------------


def _memory(name, world, *overrides, **kw):
    cfg = load_config(name, list(overrides))
    return estimate_memory(cfg, cfg.layout(world), **kw)


def test_zero_stages_shard_what_the_zero_paper_says():
    one = _memory("pythia-1B", 1)
    eight = _memory("pythia-1B", 8)
    assert one["optimizer"] == pytest.approx(8 * eight["optimizer"])  # ZeRO-1: K = 12 bytes over dp
    assert one["optimizer"] == pytest.approx(12 * one["params"])
    assert (one["weights"], one["gradients"]) == (eight["weights"], eight["gradients"]) == (
        2 * one["params"], 2 * one["params"])
    z2 = _memory("pythia-1B", 8, "zero.stage=2")
    assert z2["gradients"] == pytest.approx(eight["gradients"] / 8) and z2["weights"] == eight["weights"]
    z3 = _memory("pythia-1B", 8, "zero.stage=3")
    assert z3["weights"] == pytest.approx(eight["weights"] / 8)
    z0 = _memory("pythia-1B", 8, "zero.stage=0", "precision=fp32")  # fp16 needs ZeRO >= 1
    assert z0["optimizer"] == pytest.approx(8 * z0["params"])  # Adam m and v, not sharded without ZeRO
    fp32 = _memory("pythia-1B", 8, "precision=fp32")
    assert fp32["weights"] == 4 * fp32["params"] and fp32["optimizer"] == pytest.approx(12 / 8 * fp32["params"])


def test_checkpointing_shrinks_activations():
    ckpt = _memory("pythia-1B", 8)
    none = _memory("pythia-1B", 8, "activation_checkpointing.interval=0")
    assert ckpt["activations_per_microbatch"] == none["activations_per_microbatch"]
    assert ckpt["activations"] < none["activations"] / 2  # the logits (not recomputed) are most of the rest
    assert none["activations"] == none["activations_per_microbatch"]
    assert ckpt["total"] < none["total"]


def test_pipeline_stage_zero_holds_pp_microbatches_in_flight():
    cfg = load_config("20B")
    lay = cfg.layout(96)
    flights = [estimate_memory(cfg, lay, stage=s)["in_flight_microbatches"] for s in range(4)]
    assert flights == [4, 3, 2, 1]


def _saved_bytes(module, *inputs, **kwargs):
    """Bytes of distinct non-parameter storages autograd saves during module(*inputs)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs, **kwargs)
    return sum(seen.values())


ARCHS = {
    "neox": dict(rotary_pct=0.25),
    "gpt3": dict(position_embedding="learned", parallel_residual=False, attention_pattern="alternating_local",
                 local_window=16, tie_embeddings=True),
    "llama_like": dict(activation="swiglu", norm="rmsnorm", attention_bias=False, mlp_bias=False),
    "gptj": dict(shared_norm=True, attention_bias=False, rotary_dims=8),
    "alibi_dropout": dict(position_embedding="alibi", hidden_dropout=0.1),
}


@pytest.mark.parametrize("dtype,precision,tol", [(torch.float32, "fp32", 1e-6), (torch.bfloat16, "bf16", 5e-3)])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_activation_formula_matches_autograd(arch, dtype, precision, tol):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=500,
                      **ARCHS[arch])
    layer = TransformerLayer(cfg, 1).to(dtype)  # layer 1: a banded one under alternating_local
    x = torch.randn(2, 128, 64, dtype=dtype, requires_grad=True)
    ctx = attention_plan(cfg).context(torch.arange(128).expand(2, -1), dtype=dtype)  # built once per model
    measured = _saved_bytes(layer, x, ctx)
    assert layer_activation_bytes(cfg, 2, 1, precision, layer_index=1) == pytest.approx(measured, rel=tol)


@pytest.mark.parametrize("interval", [0, 1, 2])
def test_model_activation_formula_matches_autograd(interval):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=500,
                      rotary_pct=0.25)
    ckpt = functools.partial(checkpoint, use_reentrant=True)
    model = GPTNeoX(cfg, cfg.padded_vocab(1), checkpoint_interval=interval, checkpoint_fn=ckpt)
    tokens = torch.randint(0, 500, (2, 128))
    measured = _saved_bytes(model, tokens, labels=tokens)
    head = head_activation_bytes(cfg, 2, 1, "fp32", cfg.padded_vocab(1), peak=False)
    if interval:
        expected = (4 // interval) * 2 * 128 * 64 * 4 + head  # one [b, s, h] input per checkpointed block
    else:
        expected = sum(layer_activation_bytes(cfg, 2, 1, "fp32", layer_index=i) for i in range(4)) + head
    assert expected == pytest.approx(measured, rel=0.01)


# ---- parameter counts against built models -------------------------------------------------------

BUILT = {
    "neox_parallel_untied": dict(rotary_pct=0.25),
    "gpt3_sequential_tied_learned": dict(position_embedding="learned", parallel_residual=False, tie_embeddings=True),
    "swiglu_rmsnorm_no_bias": dict(activation="swiglu", norm="rmsnorm", attention_bias=False, mlp_bias=False),
    "gptj_shared_norm": dict(shared_norm=True, attention_bias=False, rotary_dims=8, padded_vocab_size=520),
    "alibi_intermediate": dict(position_embedding="alibi", intermediate_size=100),
}


@pytest.mark.parametrize("arch", sorted(BUILT))
def test_count_parameters_equals_built_model(arch):
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=500,
                      **BUILT[arch])
    model = GPTNeoX(cfg, cfg.padded_vocab(1))
    counts = count_parameters(cfg, 1)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["layer"] == sum(p.numel() for p in model.layer(0).parameters())
    per_rank = layer_params_per_rank(cfg, 1)
    built = [sum(p.numel() for p in model._modules[str(i)].parameters()) for i in range(cfg.num_layers + 2)]
    assert per_rank[:-1] == built
    if not cfg.tie_embeddings:
        assert per_rank[-1] == sum(p.numel() for p in model._modules[str(cfg.num_layers + 2)].parameters())


def test_per_rank_counts_shard_matrices_and_replicate_norms_and_row_biases():
    cfg = load_config("20B").model
    tp1, tp2 = layer_params_per_rank(cfg, 1)[1], layer_params_per_rank(cfg, 2)[1]
    d = cfg.hidden_size
    replicated = 2 * 2 * d + d + d  # two LayerNorms, attention.dense and dense_4h_to_h biases
    assert 2 * tp2 - tp1 == replicated


# ---- DeepSpeed 0.19.8 allocations measured by benchmarks/memory_estimate.py ---------------------


def test_zero1_allocates_whole_reduce_buckets_plus_one_under_a_pipeline():
    # setup_buckets allocates reduce_bucket_size elements per buffer (two with overlap_comm),
    # however few parameters the rank has; reduce_gradients(pipeline_parallel=True) adds one.
    fp32 = ("precision=fp32", "zero.reduce_bucket_size=1000000")
    small = _memory("pythia-70M", 8, *fp32, "zero.overlap_comm=false")
    assert small["buffers"] == 1_000_000 * 4  # not min(bucket, P): P is 70M here
    assert _memory("pythia-70M", 8, *fp32, "zero.overlap_comm=true")["buffers"] == 2 * 1_000_000 * 4
    big = _memory("pythia-70M", 8, "precision=fp32", "zero.overlap_comm=false")
    assert big["buffers"] == 500_000_000 * 4 > 4 * big["params"]  # the whole default bucket, 1907 MiB
    assert _memory("pythia-70M", 8, "zero.overlap_comm=false")["buffers"] == 500_000_000 * 2  # fp16 gradients
    cfg = load_config("pythia-70M", [*fp32, "zero.overlap_comm=false", "parallel.pp=2"])
    first = estimate_memory(cfg, cfg.layout(8), stage=0)
    assert first["buffers"] == 2 * 1_000_000 * 4
    assert first["total"] == pytest.approx(sum(first[k] for k in
                                               ("weights", "gradients", "optimizer", "buffers", "activations")))


def test_zero0_allreduce_temporary_only_with_data_parallelism():
    one = _memory("pythia-70M", 1, "precision=fp32", "zero.stage=0")
    assert one["buffers"] == 0  # build_engine turns the backward all-reduce off at dp=1
    eight = _memory("pythia-70M", 8, "precision=fp32", "zero.stage=0")
    assert eight["buffers"] == eight["params"] * 4  # every gradient flattened (P < 500M elements)
    # Allocated after backward: the total counts the larger of it and the activations, not both.
    static = eight["weights"] + eight["gradients"] + eight["optimizer"]
    assert eight["total"] == pytest.approx(static + max(eight["activations"], eight["buffers"]))
    tiny = _memory("pythia-70M", 8, "precision=fp32", "zero.stage=0", "model.seq_length=128", "train.micro_batch_size=1",
                   "activation_checkpointing.interval=1")
    assert tiny["activations"] < tiny["buffers"]
    assert tiny["total"] == pytest.approx(tiny["weights"] + tiny["gradients"] + tiny["optimizer"] + tiny["buffers"])


@pytest.mark.parametrize("global_batch,kept", [(32, 1), (64, 2), (256, 2)])
def test_last_pipeline_stage_keeps_its_logits_between_steps(global_batch, kept):
    # pipe_buffers['outputs'] of the last stage is never cleared: one logits tensor per pipe buffer
    # used, min(grad_accum, num_pipe_buffers = 2).
    cfg = load_config("pythia-70M", ["precision=fp32", "zero.stage=0", "parallel.pp=2", "train.micro_batch_size=4",
                                     f"train.global_batch_size={global_batch}"])
    lay = cfg.layout(16)
    assert lay.grad_accum == global_batch // 32
    first, last = (estimate_memory(cfg, lay, stage=s) for s in range(2))
    logits = cfg.model.seq_length * 4 * lay.padded_vocab * 4
    assert first["buffers"] == 4 * first["params"]  # the dp=2 all-reduce temporary only
    assert last["buffers"] == 4 * last["params"] + kept * logits


def test_checkpointing_with_the_head_takes_the_larger_of_loss_and_recomputed_block():
    cfg = load_config("pythia-70M", ["precision=fp32", "activation_checkpointing.interval=1"])
    lay = cfg.layout(8)
    m, b = cfg.model, lay.micro_batch_size
    est = estimate_memory(cfg, lay)
    layer = layer_activation_bytes(m, b, 1, "fp32", layer_index=0)
    head = head_activation_bytes(m, b, 1, "fp32", lay.padded_vocab)
    N = m.seq_length * b * m.hidden_size * 4
    kept = m.num_layers * N
    assert head > layer + N  # 50k-vocab logits dominate
    assert est["activations"] == pytest.approx(kept + head)  # not kept + head + layer
    vocab_small = load_config("pythia-70M", ["precision=fp32", "activation_checkpointing.interval=1",
                                             "model.vocab_size=512"])
    lay2 = vocab_small.layout(8)
    small = estimate_memory(vocab_small, lay2)
    head2 = head_activation_bytes(vocab_small.model, b, 1, "fp32", lay2.padded_vocab)
    assert head2 < layer + N
    assert small["activations"] == pytest.approx(kept + layer + N)  # the recomputed block and its output grad


def test_loss_saves_one_fp32_softmax_for_half_precision_logits():
    # lm_loss passes bf16 logits to the cross entropy, which works in fp32 chunk by chunk: autograd
    # keeps the bf16 logits themselves and 17 bytes a token of statistics, no fp32 softmax or copy.
    from megatron_neox.model.gpt_neox import lm_loss

    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=500)
    V = cfg.padded_vocab(1)
    logits = torch.randn(2, 128, V, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 500, (2, 128))
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(logits, (targets, torch.ones(2, 128)))
    loss_part = (head_activation_bytes(cfg, 2, 1, "bf16", V, peak=False)
                 - head_activation_bytes(cfg, 2, 1, "bf16", 0, peak=False) + 17 * 2 * 128)  # minus the final norm
    assert loss_part == 2 * 128 * V * 2 + 17 * 2 * 128
    # (+ 4 bytes a token of the fp32 mask lm_loss multiplies by, which the formula leaves out: 0.4% here)
    assert sum(seen.values()) == pytest.approx(loss_part, rel=0.005)


# ---- activation_checkpointing.interval 'auto' --------------------------------------------------------

GIB = 1 << 30


def _auto(name, *sets):
    from megatron_neox.plan import choose_checkpoint_interval

    cfg = load_config(name, ["activation_checkpointing.interval=auto", *sets])
    lay = cfg.layout(cfg.parallel.pp * cfg.parallel.tp)
    return cfg, lay, lambda gib: choose_checkpoint_interval(cfg, lay, gib * GIB)


def test_auto_recompute_is_off_when_the_estimate_fits_with_a_margin_and_else_takes_the_smallest_peak():
    from megatron_neox.plan import RECOMPUTE_MARGIN

    cfg, lay, choose = _auto("pythia-1B", "train.micro_batch_size=32")
    none = estimate_memory(cfg, lay, checkpoint_interval=0)["total"] / GIB  # 120.4 GiB
    assert choose(none / (1 - RECOMPUTE_MARGIN) + 0.01).interval == 0
    tight = choose(none / (1 - RECOMPUTE_MARGIN) - 0.01)
    assert tight.interval >= 1 and "exceeds" in tight.why
    peaks = {k: estimate_memory(cfg, lay, checkpoint_interval=k)["total"] for k in range(1, 17)}
    assert peaks[tight.interval] == min(peaks.values())
    # Pythia-1B at micro 32: the loss's logits and their gradient outweigh a block of up to 3
    # recomputed layers, so fewer kept block inputs are free (every interval recomputes each layer once).
    assert tight.interval == 3 and peaks[3] < peaks[1]
    assert "still more" in choose(10).why


def test_explicit_interval_is_kept_and_plan_tool_prints_the_auto_choice_per_card():
    _, _, choose = _auto("pythia-1B", "activation_checkpointing.interval=2")
    assert choose(1).interval == 2 and choose(1).why == "set"
    r = _plan_tool("--config", "pythia-1B.json", "--set", "train.micro_batch_size=32")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("activation_checkpointing.interval 'auto' would recompute: 80 GB card (79 GiB): every 3 layer(s); "
            "141 GB card (139 GiB): none") in r.stdout


def _train_with_auto_recompute(rank, world_size, tmp):
    """Two short runs with interval 'auto': on a device of 1 byte and of 1 TiB; their start-up lines
    and losses."""
    import megatron_neox.hardware as hardware
    import megatron_neox.training.trainer as trainer
    from _train import config_dict, train_losses

    lines, out = [], {}
    trainer.log_info = lines.append
    for name, device_bytes in (("small", 1.0), ("large", float(1 << 40))):
        hardware.device_memory_bytes = lambda: device_bytes
        cfg = config_dict(tmp, checkpoint__dir=f"{tmp}/{name}", train__iters=2,
                          activation_checkpointing__interval="auto")
        losses, _ = train_losses(cfg)
        out[name] = (losses, next(line for line in lines if line.startswith("megatron_neox: ")))
        lines.clear()
    return out


def test_trainer_start_line_says_what_auto_recompute_chose_and_why(tmp_path):
    from _train import run_on_random_data

    r = run_on_random_data(_train_with_auto_recompute, 1, str(tmp_path), timeout=300)
    (small, small_line), (large, large_line) = r["small"], r["large"]
    assert "| recompute every " in small_line and "estimated without recompute exceeds 90% of 0.0 GiB" in small_line
    assert "| no recompute (auto: " in large_line and "fits 90% of 1024.0 GiB" in large_line
    assert small == large  # recomputation repeats the same forward: the same losses


def test_shipped_config_comments_say_what_auto_recompute_chooses():
    """Each recipe keeps its published checkpointing; its comment quotes the planner's 'auto' choice
    (regenerate the sentence with plan.format_auto_recompute when the estimate changes)."""
    from megatron_neox.plan import format_auto_recompute

    for path in sorted((REPO / "deepspeed_configs").glob("*.json")):
        if path.name.startswith("demo"):  # the demos are CPU runs, not published recipes
            continue
        comment = json.loads(path.read_text())["comment"]
        assert comment.endswith(f" tools/plan.py (pp*tp GPUs, dp=1): {format_auto_recompute(load_config(path))}."), path
