"""GPT-J, Llama (grouped-query attention, Llama-3 rotary scaling), Mistral (sliding window) and Qwen2
(q/k/v biases, tied embeddings) against
Hugging Face's own classes, both ways, on one process: tiny random models built from configs written
here (nothing is downloaded). The multi-rank checks (GQA under TP, continued pretraining at pp=2 tp=2)
are in tests/test_model_families_parallel.py.
"""
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _train import load_tool

from megatron_neox.config import ModelConfig
from megatron_neox.convert.hf import from_hf_state_dict, load_hf, model_config_from_hf, save_hf
from megatron_neox.parallel.sharding import merge_state_dicts, shard_state_dict
from megatron_neox.errors import CheckpointError
from megatron_neox.model.gpt_neox import GPTNeoX

transformers = pytest.importorskip("transformers")
convert_from_hf = load_tool("convert_from_hf")

VOCAB = 101
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def hf_config(family: str, **extra):
    """A tiny config of each family; windows and rope scaling short enough to matter at T=24."""
    if family == "gptj":
        return transformers.GPTJConfig(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, rotary_dim=6, n_inner=80,
                                       n_positions=64, **extra)
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-6, **extra)
    if family == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **common)
    if family == "llama_gqa":
        return transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, **common)
    if family == "qwen2":  # Qwen2.5-0.5B's form: GQA, biases on q/k/v only, tied embeddings
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
    return transformers.LlamaConfig(num_key_value_heads=4, **common)  # llama_mha: Llama-2-7B's shape


FAMILIES = ["gptj", "llama_mha", "llama_gqa", "mistral", "qwen2"]
HF_CLASS = {"gptj": "GPTJForCausalLM", "llama_mha": "LlamaForCausalLM", "llama_gqa": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def random_hf(family: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASS[family])(hf_config(family, **extra)).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and norms at one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _tokens(seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_gives_hf_logits(family):
    hf = random_hf(family)
    cfg = ModelConfig(**model_config_from_hf(hf.config))
    padded = cfg.padded_vocab(1)
    ours = GPTNeoX(cfg, padded).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, padded), strict=True)
    tokens = _tokens(1)
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    torch.testing.assert_close(got[..., :VOCAB], expected, rtol=0, atol=1e-5)
    assert (got[..., VOCAB:] == 0).all(), "padded vocab rows must give zero logits"


@pytest.mark.parametrize("family", ["gptj", "llama_gqa", "mistral", "qwen2"])
def test_kv_cache_decoding_equals_hf_generate(family):
    """Decoding with our KV cache (fewer KV heads; Mistral's window passed by the 16 new tokens) picks
    HF generate's greedy tokens."""
    from megatron_neox.generate import generate_ids

    hf = random_hf(family)
    cfg = ModelConfig(**model_config_from_hf(hf.config))
    ours = GPTNeoX(cfg, cfg.padded_vocab(1)).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, cfg.padded_vocab(1)))
    prompt = _tokens(4, batch=1, length=3)
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    assert generate_ids(ours, prompt[0].tolist(), max_new_tokens=16, vocab_size=VOCAB) == theirs[0, 3:].tolist()


def test_imported_configs_say_what_each_family_is():
    gptj, gqa, mistral = (ModelConfig(**model_config_from_hf(random_hf(f).config)) for f in ("gptj", "llama_gqa",
                                                                                             "mistral"))
    assert (gptj.rotary_interleaved, gptj.rotary_ndims, gptj.activation, gptj.shared_norm, gptj.lm_head_bias,
            gptj.attention_bias) == (True, 6, "gelu_tanh", True, True, False)
    assert (gqa.kv_heads, gqa.rotary_base, gqa.rope_scaling.factor, gqa.norm, gqa.activation, gqa.parallel_residual,
            gqa.sliding_window) == (2, 500000.0, 8.0, "rmsnorm", "swiglu", False, None)
    assert (mistral.kv_heads, mistral.sliding_window, mistral.rope_scaling) == (2, 5, None)
    qwen2 = ModelConfig(**model_config_from_hf(random_hf("qwen2").config))
    assert (qwen2.attention_bias, qwen2.qkv_bias, qwen2.attention_out_bias, qwen2.mlp_bias, qwen2.tie_embeddings,
            qwen2.kv_heads, qwen2.rotary_base, qwen2.sliding_window) == ("qkv", True, False, False, True, 2, 1e6, None)
    assert (gqa.qkv_bias, gqa.attention_out_bias) == (False, False)
    from megatron_neox.convert.hf_families import GPT_NEOX, export_problems

    neox_qkv = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                           attention_bias="qkv")
    assert any("model.attention_bias='qkv'" in p for p in export_problems(neox_qkv, GPT_NEOX))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_hf_with_our_logits(tmp_path, family):
    cfg = ModelConfig(**model_config_from_hf(random_hf(family).config))
    padded = cfg.padded_vocab(1)
    ours = GPTNeoX(cfg, padded, seed=5).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their init
    out = save_hf(tmp_path / "hf", ours.state_dict(), cfg, padded)
    assert json.loads((out / "config.json").read_text())["architectures"] == [HF_CLASS[family]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == HF_CLASS[family]
    tokens = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    model_dict, hf_sd = load_hf(out)  # and back: the same tensors
    back = from_hf_state_dict(hf_sd, ModelConfig(**model_dict), padded)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("style", ["llama2", "llama3", "gpt2"])
def test_export_names_the_tokenizers_own_bos_and_eos(tmp_path, style):
    """A Llama export's BOS is the token the tokenizer puts before a text (what our preprocessing puts
    before each document), not the end-of-document token; GPT-2-style tokenizers use EOD for both.
    HF's tokenizer loaded from the export encodes a text as ours does with that BOS in front."""
    from _tokenizers import gpt2_style_tokenizer, hard_texts, llama2_style_tokenizer, llama3_style_tokenizer
    from megatron_neox.convert.hf import SpecialTokens
    from megatron_neox.tokenizer import load_tokenizer

    make = {"llama2": llama2_style_tokenizer, "llama3": llama3_style_tokenizer, "gpt2": gpt2_style_tokenizer}
    path = make[style](hard_texts() * 4, 400, tmp_path / "tokenizer.json")
    tok = load_tokenizer(path, verify=False)
    special = SpecialTokens.of(tok)
    expected = {"llama2": ("<s>", "</s>"), "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),
                "gpt2": ("<|endoftext|>", "<|endoftext|>")}[style]
    assert (special.bos, special.eos) == expected
    cfg = ModelConfig(**model_config_from_hf(random_hf("llama_gqa").config))
    padded = cfg.padded_vocab(1)
    out = save_hf(tmp_path / "hf", GPTNeoX(cfg, padded, seed=1).state_dict(), cfg, padded,
                  tokenizer_path=path, special=special)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.token_to_id(expected[0]), tok.eod_id)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token) == expected
    text = "Hello world, again."
    assert hf_tok(text).input_ids == tok.bos_ids + tok.encode(text)


def test_export_carries_the_runs_chat_template(tmp_path):
    """The tokenizer_config.json beside the run's tokenizer (its chat template and end-of-turn EOS)
    goes into the export: HF's apply_chat_template renders what our chat preprocessing rendered."""
    from _chat import chat_tokenizer
    from megatron_neox.convert.hf import SpecialTokens
    from megatron_neox.data.chat import ChatTemplate
    from megatron_neox.tokenizer import load_tokenizer

    path = chat_tokenizer(tmp_path / "tok", chatml=True)
    tok = load_tokenizer(path, verify=False)
    cfg = ModelConfig(**model_config_from_hf(random_hf("llama_mha").config))
    padded = cfg.padded_vocab(1)
    out = save_hf(tmp_path / "hf", GPTNeoX(cfg, padded, seed=1).state_dict(), cfg, padded,
                  tokenizer_path=path, special=SpecialTokens.of(tok))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    ours = ChatTemplate.for_tokenizer(str(path), tok.eod_token).render(messages)
    assert hf_tok.apply_chat_template(messages, tokenize=False) == ours and "<|im_start|>" in ours
    assert hf_tok.eos_token == "<|im_end|>"
    # Chats rendered with the built-in template (no tokenizer_config.json): a chat model's export
    # carries it, a pretrained model's does not.
    plain = chat_tokenizer(tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer_config.json").unlink()
    tok = load_tokenizer(plain, verify=False)
    for chat in (True, False):
        out = save_hf(tmp_path / f"hf_{chat}", GPTNeoX(cfg, padded, seed=1).state_dict(), cfg, padded,
                      tokenizer_path=plain, special=SpecialTokens.of(tok), chat=chat)
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert ("chat_template" in config) == chat
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_True")
    ours = ChatTemplate.for_tokenizer(str(plain), tok.eod_token).render(messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours


@pytest.mark.parametrize("tp", [2, 4])
def test_gqa_shards_split_or_replicate_the_kv_heads(tp):
    """2 KV heads: split one per rank at tp=2, every rank holds both at tp=4; merge inverts either.
    Qwen2's q/k/v biases follow their rows; its output bias does not exist."""
    cfg = ModelConfig(**model_config_from_hf(random_hf("qwen2").config))
    full = GPTNeoX(cfg, cfg.padded_vocab(1), seed=3).state_dict()
    assert "1.attention.dense.bias" not in full
    shards = [shard_state_dict(full, cfg, tp, r) for r in range(tp)]
    for kind in ("weight", "bias"):
        kv = full[f"1.attention.key_value.{kind}"]  # rows [kv head][k|v][head_dim]
        if tp == 2:
            assert torch.equal(shards[1][f"1.attention.key_value.{kind}"], kv[kv.shape[0] // 2:])
        else:
            assert all(torch.equal(s[f"1.attention.key_value.{kind}"], kv) for s in shards)
        q = full[f"1.attention.query.{kind}"]
        assert torch.equal(shards[tp - 1][f"1.attention.query.{kind}"], q.chunk(tp)[-1])
    back = merge_state_dicts(shards, cfg)
    assert all(torch.equal(back[k], v) for k, v in full.items())


def test_llama3_scaling_changes_only_long_wavelengths():
    from megatron_neox.model.rotary import RotaryEmbedding

    cfg = ModelConfig(**model_config_from_hf(random_hf("llama_gqa").config))
    plain = RotaryEmbedding(cfg.rotary_ndims, cfg.rotary_base)
    scaled = RotaryEmbedding(cfg.rotary_ndims, cfg.rotary_base, scaling=cfg.rope_scaling)
    inv, inv_s = plain.inv_freq(torch.device("cpu")), scaled.inv_freq(torch.device("cpu"))
    wavelen = 2 * torch.pi / inv
    # Llama 3.1: wavelengths under original/high_freq_factor = 2 kept, over original/low_freq_factor = 8 / 8.
    torch.testing.assert_close(inv_s[wavelen < 2], inv[wavelen < 2], rtol=0, atol=0)
    torch.testing.assert_close(inv_s[wavelen > 8], inv[wavelen > 8] / 8, rtol=1e-6, atol=0)


# ---- bad input: refused at the door, exit 2, nothing written --------------------------------------


def _save(model, path, **config_edits):
    model.save_pretrained(path)
    cfg_file = path / "config.json"
    data = json.loads(cfg_file.read_text())
    data.update(config_edits)
    cfg_file.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("family,edits,field", [
    ("llama_gqa", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rope_type='yarn'"),
    ("mistral", {"attention_bias": True}, "attention_bias=true"),
    ("gptj", {"mlp_bias": True}, "mlp_bias=true"),
    ("llama_mha", {"head_dim": 24}, "head_dim=24"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window=true"),
])
def test_unsupported_hf_config_is_refused_naming_the_field(tmp_path, capsys, family, edits, field):
    src = _save(random_hf(family), tmp_path / "hf", **edits)
    out = tmp_path / "out"
    assert convert_from_hf.main(["--hf-dir", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and field in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing may be written"


def test_import_sets_the_runs_context_or_notes_a_long_one(tmp_path, capsys, monkeypatch):
    """A Qwen2 directory to a training config: --seq-length sets model.seq_length; without it the HF
    max_position_embeddings is kept, with a note when it is long."""
    src = _save(random_hf("qwen2"), tmp_path / "hf")
    assert convert_from_hf.main(["--hf-dir", str(src), "--out", str(tmp_path / "a"), "--seq-length", "16"]) == 0
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["model"]["seq_length"] == 16
    assert "note: model.seq_length" not in capsys.readouterr().err
    monkeypatch.setattr(convert_from_hf, "LONG_CONTEXT", 32)
    assert convert_from_hf.main(["--hf-dir", str(src), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["model"]["seq_length"] == 64
    assert "note: model.seq_length = 64 (the HF max_position_embeddings)" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])
def test_export_config_names_the_rope_as_transformers_4_reads_it(family, monkeypatch):
    """setup.py allows transformers >= 4.40: 4.x reads rope_theta / rope_scaling and would keep a
    rope_parameters argument as an unknown attribute, rotating with theta 10000 (checked with 4.46.3:
    Llama-3, Mistral and Qwen2 exports were off by 1-3 in the logits). 5.x folds the old names in."""
    from megatron_neox.convert.hf_families import to_hf_config

    cfg = ModelConfig(**model_config_from_hf(random_hf(family).config))
    cls = HF_CLASS[family].replace("ForCausalLM", "Config")
    seen = {}
    module = importlib.import_module("transformers")  # building a model may swap the lazy module in sys.modules
    real = getattr(module, cls)
    monkeypatch.setattr(module, cls, lambda **kw: seen.update(kw) or real(**kw))
    to_hf_config(cfg, cfg.padded_vocab(1))
    assert "rope_parameters" not in seen and seen["rope_theta"] == cfg.rotary_base, seen
    assert ("rope_scaling" in seen) == (cfg.rope_scaling is not None), seen
    if cfg.rope_scaling is not None:
        assert seen["rope_scaling"]["rope_type"] == "llama3" and seen["rope_scaling"]["factor"] == 8.0


def test_weights_with_biases_the_class_has_not_are_refused():
    hf = random_hf("llama_gqa")
    cfg = ModelConfig(**model_config_from_hf(hf.config))
    sd = dict(hf.state_dict(), **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(48)})
    with pytest.raises(CheckpointError, match=r"does not have: model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_hf_state_dict(sd, cfg, cfg.padded_vocab(1))


@pytest.mark.parametrize("tp,ok", [(1, True), (2, True), (4, True), (8, True), (3, False), (6, False)])
def test_tp_splits_or_replicates_kv_heads_or_is_refused(tp, ok):
    """4 KV heads: tp 1, 2, 4 split them, tp 8 replicates them; tp 3 and 6 would give a rank query heads
    of two KV groups."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.errors import ConfigError

    cfg = {"model": {"num_layers": 2, "hidden_size": 96, "num_attention_heads": 24, "num_kv_heads": 4,
                     "seq_length": 16, "vocab_size": 96, "intermediate_size": 48, "make_vocab_size_divisible_by": 8},
           "parallel": {"tp": tp}, "train": {"iters": 1}}
    if ok:
        assert config_from_dict(cfg).model.kv_heads == 4
    else:
        with pytest.raises(ConfigError, match=rf"model.num_kv_heads=4 and parallel.tp={tp}"):
            config_from_dict(cfg)


def test_llama_export_evaluates_like_lm_evals_hf_backend(tmp_path, monkeypatch):
    """A Llama-family model with a Llama-2-style tokenizer (BOS `<s>` from its template): our lm-eval
    backend and lm-eval's own HF backend on the export give the same log-likelihoods, rolling
    perplexities and generations on the local tasks, so evaluation counts the BOS as HF does."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from _tokenizers import hard_texts, llama2_style_tokenizer
    from _train import REPO
    from megatron_neox.convert.hf import SpecialTokens
    from megatron_neox.evaluation.backends import MergedModel
    from megatron_neox.evaluation.harness import run_tasks
    from megatron_neox.evaluation.lm import NeoXLM
    from megatron_neox.tokenizer import load_tokenizer

    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository
    tasks, include = ["mnx_choice", "mnx_rolling", "mnx_generate"], str(Path(REPO) / "tests" / "eval_tasks")
    path = llama2_style_tokenizer(hard_texts() * 4, 400, tmp_path / "tokenizer.json")
    tok = load_tokenizer(path, verify=False)
    assert tok.bos_ids == [1]
    torch.manual_seed(0)
    hf_cfg = hf_config("llama_mha")
    hf_cfg.vocab_size = tok.vocab_size
    cfg = ModelConfig(**model_config_from_hf(hf_cfg))
    padded = cfg.padded_vocab(1)
    ours = GPTNeoX(cfg, padded, seed=3).eval()
    out = save_hf(tmp_path / "hf", ours.state_dict(), cfg, padded, tokenizer_path=path, special=SpecialTokens.of(tok))
    lm = NeoXLM(MergedModel(ours, tok.vocab_size), tok, max_length=64, batch_size=4, show_progress=False)
    mine = run_tasks(lm, tasks, include_path=include, bootstrap_iters=0, log_samples=True, limit=4)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", device="cpu",
                                     batch_size=4, tasks=tasks, task_manager=TaskManager(include_path=include),
                                     bootstrap_iters=0, log_samples=True, limit=4)
    for task in tasks:
        a = sorted(mine["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert [r[0] for r in x["arguments"]] == [r[0] for r in y["arguments"]]
            if task == "mnx_generate":
                assert x["resps"] == y["resps"]
                continue
            for rx, ry in zip(x["resps"], y["resps"]):
                vx, vy = rx[0] if isinstance(rx, list) else rx, ry[0] if isinstance(ry, list) else ry
                vx, vy = (vx[0], vy[0]) if isinstance(vx, (list, tuple)) else (vx, vy)
                assert vx == pytest.approx(vy, rel=1e-4), (task, x["doc_id"])


def test_generate_text_starts_a_llama_prompt_with_bos(tmp_path, monkeypatch):
    """tools/generate.py's prompt starts as our documents and HF's `tokenizer(prompt)` do: with the
    tokenizer's BOS (Llama-2 style `<s>`); a GPT-2-style tokenizer has none."""
    import megatron_neox.generate as gen
    from _tokenizers import gpt2_style_tokenizer, hard_texts, llama2_style_tokenizer
    from megatron_neox.tokenizer import load_tokenizer

    seen = []
    monkeypatch.setattr(gen, "generate_ids", lambda model, ids, **kw: seen.append(list(ids)) or [])
    for make, bos in ((llama2_style_tokenizer, [1]), (gpt2_style_tokenizer, [])):
        tok = load_tokenizer(make(hard_texts() * 4, 400, tmp_path / f"{make.__name__}.json"), verify=False)
        gen.generate_text(SimpleNamespace(model=None), tok, "Hello world")
        assert seen.pop() == bos + tok.encode("Hello world")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / f"{make.__name__}.json"))
        assert hf("Hello world").input_ids == bos + tok.encode("Hello world")
