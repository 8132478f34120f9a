"""Grouped-query attention and GPT-J under real ranks, and continued pretraining of a Llama end to end.

One 4-rank world (module fixture, one launch) runs:
- a Llama-style model with 4 query heads over 2 KV heads (Llama-3 rotary scaling, a sliding window
  shorter than the sequence) at dp=4 (the reference: dp layouts equal one rank, tests/test_layouts.py),
  pp=2 x tp=2 (one KV head per rank), tp=4 (KV heads replicated), and tp=4 with sequence parallelism;
  and GPT-J's layer (interleaved rotary, output bias) at dp=4 and pp=2 x tp=2; and Qwen2's (Llama's
  with biases on q/k/v only, tied embeddings) at pp=2 x tp=2 and at tp=4 with sequence parallelism;
- continued pretraining: a random HF LlamaForCausalLM -> tools/convert_from_hf.py (pp=2, tp=2) -> four
  training steps (saved at 2 and 4) -> tools/convert_to_hf.py, whose export must give our logits, and
  whose first loss must be the HF model's on that batch;
- resharding that Llama (tools/reshard.py, DeepSpeed universal checkpoints): its step 2 (KV heads split
  at pp=2 tp=2) resumed at tp=4 (KV replicated) for one step and saved, that step 3 resumed at tp=2 x dp=2
  (KV split again): each resumed engine holds exactly the saved weights, and its losses and final
  weights are those of the run never stopped (steps 1-4 at pp=2 tp=2).
"""
import json
import math
import shutil

import pytest
import torch

from _dist import run_distributed
from _layouts import tiny_config, train_steps
from _train import load_tool, make_dataset

transformers = pytest.importorskip("transformers")
convert_from_hf, convert_to_hf = load_tool("convert_from_hf"), load_tool("convert_to_hf")

STEPS = 2
LLAMA = {"model.num_kv_heads": 2, "model.norm": "rmsnorm", "model.activation": "swiglu",
         "model.parallel_residual": False, "model.attention_bias": False, "model.mlp_bias": False,
         "model.rotary_pct": 1.0, "model.rotary_base": 500000.0, "model.sliding_window": 6,
         "model.rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}}
GPTJ = {"model.rotary_dims": 4, "model.rotary_interleaved": True, "model.shared_norm": True,
        "model.activation": "gelu_tanh", "model.attention_bias": False, "model.lm_head_bias": True}
QWEN2 = {"model.num_kv_heads": 2, "model.norm": "rmsnorm", "model.activation": "swiglu",
         "model.parallel_residual": False, "model.attention_bias": "qkv", "model.mlp_bias": False,
         "model.rotary_pct": 1.0, "model.rotary_base": 1e6, "model.tie_embeddings": True}
SCENARIOS = {
    "llama_ref": (1, 1, LLAMA),
    "llama_tp4": (1, 4, LLAMA),
    "llama_tp4_sp": (1, 4, {**LLAMA, "parallel.sequence_parallel": True}),
    "llama_pp2_tp2": (2, 2, LLAMA),
    "gptj_ref": (1, 1, GPTJ),
    "gptj_pp2_tp2": (2, 2, GPTJ),
    "qwen2_ref": (1, 1, QWEN2),
    "qwen2_pp2_tp2": (2, 2, QWEN2),
    "qwen2_tp4_sp": (1, 4, {**QWEN2, "parallel.sequence_parallel": True}),
}
# Resumes of the continued-pretraining run through tools/reshard.py: name -> (checkpoint dir, tag, layout).
RESHARDS = {
    "kv_split_to_replicated": ("run", "global_step2", ["parallel.pp=1", "parallel.tp=4"]),
    "kv_replicated_to_split": ("kv_split_to_replicated", "global_step3", ["parallel.pp=1", "parallel.tp=2"]),
}


def _run(pp, tp, overrides):
    """(losses, norms) of STEPS steps; for a tp=4 run also whether every parameter's TP marks are the
    sharding table's and whether the replicated KV weights are still identical on every rank."""
    import torch.distributed as dist

    from megatron_neox.parallel.sharding import partition_of
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup

    cfg, topo = setup(tiny_config(pp, tp, overrides))
    engine, model, clipper = build_engine(cfg, topo)
    losses, norms = train_steps(engine, cfg, topo, clipper, STEPS)
    if tp != 4:
        return losses, norms
    marks = {n: (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
             for n, p in model.named_parameters()}
    wrong = [n for n, m in marks.items() if partition_of(n.split(".", 1)[1], cfg.model, tp) != m]
    same = []
    for name, p in model.named_parameters():
        if name.startswith("1.attention.key_value."):  # the weight, and Qwen2's bias
            mine = p.detach().clone()
            everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, mine)
            same.append(all(torch.equal(mine, x) for x in everyone))
    kv = model.get_parameter("1.attention.key_value.weight")
    layer_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("1."))
    return losses, norms, {"wrong_marks": wrong, "kv_rows": kv.shape[0], "layer_numel": layer_numel,
                           "kv_tensors": len(same), "kv_same": all(same)}


def _merged_weights(engine, topo, model_cfg):
    """The model a pp=1 engine holds, as one state dict (the tensor-parallel shards gathered and
    merged), and the TP-replicated tensors that differ between the ranks (the merge reads rank 0's)."""
    import torch.distributed as dist

    from megatron_neox.parallel.sharding import merge_state_dicts, partition_of, split_key

    local = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    shards = [None] * topo.tp
    dist.all_gather_object(shards, local, group=topo.tp_group)
    differ = [k for k in local if partition_of(split_key(k)[1], model_cfg, topo.tp) is None
              and not all(torch.equal(s[k], shards[0][k]) for s in shards)]
    return merge_state_dicts(shards, model_cfg), differ


def _reshard(tmp, ckpt, tag, out):
    """tools/reshard.py on rank 0, the others waiting for it."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        assert load_tool("reshard").main(["--checkpoint", str(tmp / ckpt), "--tag", tag, "--out", str(tmp / out),
                                          "--workers", "1"]) == 0
    dist.barrier()


def _world(rank, world_size, tmp, overrides):
    from megatron_neox.config import load_config
    from megatron_neox.training import trainer

    out = {name: _run(*spec) for name, spec in SCENARIOS.items()}
    seen, weights = [], []
    step = trainer.train_step

    def capture_step(engine, micro, topo, *rest, **options):
        seen.append(micro)
        if topo.pp == 1 and not weights:  # what a resumed run loaded, before its first step
            weights.append(_merged_weights(engine, topo, cfg.model))
        return step(engine, micro, topo, *rest, **options)

    def train(*more):
        nonlocal cfg
        seen.clear()
        weights.clear()
        cfg = load_config(str(tmp / "from_hf.json"), overrides + list(more))
        return trainer.train(cfg).losses

    cfg = None
    trainer.train_step = capture_step
    try:
        # Continued pretraining at pp=2 tp=2 (KV heads split), saved at steps 2 and 4: the uninterrupted run.
        out["continued"] = train()
        out["first_batch"] = seen[0]
        # GQA resharding: step 2 (KV split over tp=2) -> universal -> tp=4 (KV replicated), one step, saved;
        # step 3 -> universal -> tp=2 x dp=2 (KV split again), one step.
        for name, (src, tag, layout) in RESHARDS.items():
            _reshard(tmp, src, tag, f"universal_{name}")
            losses = train(f"checkpoint.load={tmp / f'universal_{name}'}", f"checkpoint.dir={tmp / name}",
                           f"log.dir={tmp / name}_log", "train.exit_interval=1", *layout)
            out[name] = {"losses": losses, "loaded": weights[0] if rank == 0 else None}
    finally:
        trainer.train_step = step
    return out


def _random_llama(path):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    make_dataset(str(tmp / "data" / "rand"))
    hf = _random_llama(tmp / "hf_in")
    assert convert_from_hf.main(["--hf-dir", str(tmp / "hf_in"), "--out", str(tmp / "from_hf"), "--pp", "2",
                                 "--tp", "2", "--config-out", str(tmp / "from_hf.json")]) == 0
    overrides = [
        f"data.prefixes={json.dumps([str(tmp / 'data' / 'rand')])}", "data.split=90,10,0", "train.iters=4",
        "train.micro_batch_size=2", "train.global_batch_size=8", "optimizer.lr=0.001", "lr_schedule.warmup_iters=1",
        f"checkpoint.dir={tmp / 'run'}", f"log.dir={tmp / 'run_log'}", "eval.iters=1",
        "checkpoint.save_interval=2", "zero.stage=1",  # reshard reads the ZeRO optimizer files
    ]
    r = run_distributed(_world, 4, tmp, overrides, timeout=600)[0]
    yield {"tmp": tmp, "hf": hf, "r": r}
    shutil.rmtree(tmp, ignore_errors=True)


def _assert_same(got, want, what):
    (gl, gn), (wl, wn) = got[:2], want[:2]
    for s in range(STEPS):
        assert math.isclose(gl[s], wl[s], rel_tol=1e-5), f"{what}: step {s} loss {gl[s]} != reference {wl[s]}"
        assert math.isclose(gn[s], wn[s], rel_tol=1e-5), f"{what}: step {s} grad norm {gn[s]} != reference {wn[s]}"


@pytest.mark.parametrize("name", ["llama_pp2_tp2", "llama_tp4", "llama_tp4_sp"])
def test_gqa_layouts_train_like_one_rank(world, name):
    _assert_same(world["r"][name], world["r"]["llama_ref"], name)
    assert len(set(world["r"]["llama_ref"][0])) == STEPS, "the reference's weights must change every step"


def test_gptj_layer_under_pp2_tp2_trains_like_one_rank(world):
    _assert_same(world["r"]["gptj_pp2_tp2"], world["r"]["gptj_ref"], "gptj pp2 tp2")


@pytest.mark.parametrize("name", ["qwen2_pp2_tp2", "qwen2_tp4_sp"])
def test_qwen2_layer_trains_like_one_rank(world, name):
    """q/k/v biases split with their heads (pp=2 x tp=2) or replicated with the KV heads (tp=4): the
    replicated KV bias gets the TP group's summed gradient and stays identical on every rank."""
    _assert_same(world["r"][name], world["r"]["qwen2_ref"], name)
    if name == "qwen2_tp4_sp":
        rep = world["r"][name][2]
        assert rep["wrong_marks"] == [] and rep["kv_tensors"] == 2 and rep["kv_same"], rep
        from megatron_neox.plan import layer_params_per_rank

        assert layer_params_per_rank(tiny_config(1, 4, QWEN2).model, 4)[1] == rep["layer_numel"], "the planner's count"


def test_replicated_kv_heads_are_marked_by_the_table_counted_and_stay_identical(world):
    rep = world["r"]["llama_tp4"][2]
    assert rep["wrong_marks"] == []
    assert rep["kv_rows"] == 2 * 2 * 8  # both KV heads, k and v, head_dim 8: the whole projection
    assert rep["kv_same"], "replicated KV weights drifted apart across the tensor-parallel ranks"
    from megatron_neox.plan import layer_params_per_rank

    assert layer_params_per_rank(tiny_config(1, 4, LLAMA).model, 4)[1] == rep["layer_numel"], "the planner's count"


def _loss(logits, mb) -> float:
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
    mask = mb["loss_mask"].flatten()
    return float((ce * mask).sum() / mask.sum())


def test_continued_pretraining_starts_from_hf_and_exports_back(world):
    from megatron_neox.generate import load_model

    r, tmp = world["r"], world["tmp"]
    with torch.no_grad():
        hf_first = sum(_loss(world["hf"](mb["tokens"]).logits, mb) for mb in r["first_batch"]) / len(r["first_batch"])
    assert r["continued"][0] == pytest.approx(hf_first, abs=1e-5), "step 1 at pp=2 tp=2 must see the HF weights"
    assert r["continued"][1] != r["continued"][0]
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the pp=2 tp=2 files convert_from_hf wrote hold exactly the HF model
        torch.testing.assert_close(load_model(tmp / "from_hf").model(tokens), world["hf"](tokens).logits,
                                   rtol=0, atol=1e-5)
    out = tmp / "hf_out"
    assert convert_to_hf.main(["--checkpoint", str(tmp / "run"), "--out", str(out)]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ours = load_model(tmp / "run").model
    with torch.no_grad():
        theirs, mine = exported(tokens).logits, ours(tokens)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)
        assert not torch.allclose(theirs, world["hf"](tokens).logits, atol=1e-4), "training must have moved it"


@pytest.mark.parametrize("name", list(RESHARDS))
def test_gqa_reshard_loads_the_saved_weights_and_continues_the_uninterrupted_losses(world, name):
    """A Llama-style model (4 query heads, 2 KV heads) resumed through tools/reshard.py with its KV
    projection split (tp=2) on one side and replicated (tp=4) on the other: the resumed engine holds
    exactly the saved weights, and its step is the uninterrupted pp=2 tp=2 run's."""
    from megatron_neox.convert.checkpoint_io import load_full_state_dict

    r, tmp = world["r"], world["tmp"]
    src, tag, _ = RESHARDS[name]
    loaded, differ = r[name]["loaded"]
    saved = load_full_state_dict(tmp / src / tag).state_dict
    assert differ == [], f"TP-replicated tensors loaded differently on the ranks: {differ}"
    assert loaded.keys() == saved.keys()
    wrong = [k for k in saved if not torch.equal(loaded[k], saved[k])]
    assert wrong == [], f"{name}: resumed weights differ from {src}/{tag}'s: {wrong}"
    step = int(tag.removeprefix("global_step"))
    got, want = r[name]["losses"], r["continued"][step:step + 1]
    assert got == pytest.approx(want, rel=1e-5), f"{name}: step {step + 1} loss {got} != uninterrupted {want}"


def test_gqa_run_resharded_twice_ends_with_the_uninterrupted_weights(world):
    """Adam's moments travel too: step 4 after split -> replicated -> split equals step 4 of the run never stopped."""
    from megatron_neox.convert.checkpoint_io import load_full_state_dict

    tmp = world["tmp"]
    ours = load_full_state_dict(tmp / "kv_replicated_to_split" / "global_step4").state_dict
    straight = load_full_state_dict(tmp / "run" / "global_step4").state_dict
    assert ours.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(ours[k], straight[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
