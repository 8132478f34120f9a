"""Grouped-query attention and GPT-J under real ranks, and continued pretraining of a Llama end to end.

One 4-rank world (module fixture, one launch) runs:
- a Llama-style model with 4 query heads over 2 KV heads (Llama-3 rotary scaling, a sliding window
  shorter than the sequence) at dp=4 (the reference: dp layouts equal one rank, tests/test_layouts.py),
  pp=2 x tp=2 (one KV head per rank), tp=4 (KV heads replicated), and tp=4 with sequence parallelism;
  and GPT-J's layer (interleaved rotary, output bias) at dp=4 and pp=2 x tp=2;
- continued pretraining: a random HF LlamaForCausalLM -> tools/convert_from_hf.py (pp=2, tp=2) -> two
  training steps -> tools/convert_to_hf.py, whose export must give our logits, and whose first loss must
  be the HF model's on that batch.
"""
import json
import math
import shutil

import pytest
import torch

from _dist import run_distributed
from _layouts import tiny_config
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
SCENARIOS = {
    "llama_ref": (1, 1, LLAMA),
    "llama_tp4": (1, 4, LLAMA),
    "llama_tp4_sp": (1, 4, {**LLAMA, "parallel.sequence_parallel": True}),
    "llama_pp2_tp2": (2, 2, LLAMA),
    "gptj_ref": (1, 1, GPTJ),
    "gptj_pp2_tp2": (2, 2, GPTJ),
}


def _run(pp, tp, overrides):
    """(losses, norms) of STEPS steps; for a tp=4 run also whether every parameter's TP marks are the
    sharding table's and whether the replicated KV weights are still identical on every rank."""
    import torch.distributed as dist

    from megatron_neox.parallel.sharding import partition_of
    from megatron_neox.training.engine import build_engine
    from megatron_neox.training.launch import setup
    from megatron_neox.training.step import train_step
    from _layouts import micro_batches

    cfg, topo = setup(tiny_config(pp, tp, overrides))
    engine, model, clipper = build_engine(cfg, topo)
    losses, norms = [], []
    for s in range(STEPS):
        r = train_step(engine, micro_batches(s, cfg, topo.dp, topo.dp_rank), topo, clipper)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    if tp != 4:
        return losses, norms
    marks = {n: (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
             for n, p in model.named_parameters()}
    wrong = [n for n, m in marks.items() if partition_of(n.split(".", 1)[1], cfg.model, tp) != m]
    kv = model.get_parameter("1.attention.key_value.weight").detach().clone()
    everyone = [torch.empty_like(kv) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, kv)
    layer_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("1."))
    return losses, norms, {"wrong_marks": wrong, "kv_rows": kv.shape[0], "layer_numel": layer_numel,
                           "kv_same": all(torch.equal(kv, x) for x in everyone)}


def _world(rank, world_size, hf_config_file, overrides):
    from megatron_neox.config import load_config
    from megatron_neox.training import trainer

    out = {name: _run(*spec) for name, spec in SCENARIOS.items()}
    seen = []
    step = trainer.train_step

    def capture_step(engine, micro, *rest, **options):
        seen.append(micro)
        return step(engine, micro, *rest, **options)

    trainer.train_step = capture_step
    try:
        out["continued"] = trainer.train(load_config(hf_config_file, overrides)).losses
    finally:
        trainer.train_step = step
    out["first_batch"] = seen[0]
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
        f"data.prefixes={json.dumps([str(tmp / 'data' / 'rand')])}", "data.split=90,10,0", "train.iters=2",
        "train.micro_batch_size=2", "train.global_batch_size=8", "optimizer.lr=0.001", "lr_schedule.warmup_iters=1",
        f"checkpoint.dir={tmp / 'run'}", f"log.dir={tmp / 'run_log'}", "eval.iters=1",
    ]
    r = run_distributed(_world, 4, str(tmp / "from_hf.json"), overrides, timeout=600)[0]
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
