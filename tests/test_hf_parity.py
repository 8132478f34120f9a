"""Our GPT-NeoX gives Hugging Face GPTNeoXForCausalLM's logits for the same weights, both ways."""
import pytest
import torch

from megatron_neox.config import ModelConfig
from megatron_neox.convert.hf import (
    check_hf_compatible,
    from_hf_state_dict,
    load_hf,
    model_config_from_hf,
    save_hf,
    to_hf_state_dict,
)
from megatron_neox.errors import ConfigError
from megatron_neox.model.gpt_neox import GPTNeoX

transformers = pytest.importorskip("transformers")

CASES = [
    # (parallel residual, rotary_pct, hidden, heads, layers, vocab, tied)
    pytest.param(True, 0.25, 64, 4, 2, 97, False, id="parallel-rot0.25"),
    pytest.param(False, 1.0, 48, 6, 3, 131, False, id="sequential-rot1.0"),
    pytest.param(True, 0.5, 40, 5, 1, 50, True, id="odd-sizes-tied"),
]


def _random_hf(parallel, pct, hidden, heads, layers, vocab, tied, seed=0):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=3 * hidden + 4, rotary_pct=pct, use_parallel_residual=parallel,
        max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and norms at one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("parallel,pct,hidden,heads,layers,vocab,tied", CASES)
def test_import_matches_hf_logits(parallel, pct, hidden, heads, layers, vocab, tied):
    hf = _random_hf(parallel, pct, hidden, heads, layers, vocab, tied)
    cfg = ModelConfig(**model_config_from_hf(hf.config))
    padded = cfg.padded_vocab(1)
    ours = GPTNeoX(cfg, padded).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, padded), strict=True)
    tokens = torch.randint(0, vocab, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (3, 29, padded)
    assert (got[..., vocab:] == 0).all(), "padded vocab rows must give zero logits"
    torch.testing.assert_close(got[..., :vocab], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("parallel,pct,hidden,heads,layers,vocab,tied", CASES[:2])
def test_export_loads_in_hf_with_same_logits(tmp_path, parallel, pct, hidden, heads, layers, vocab, tied):
    cfg = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=64, vocab_size=vocab,
        rotary_pct=pct, parallel_residual=parallel, intermediate_size=2 * hidden,
    )
    padded = cfg.padded_vocab(1)
    ours = GPTNeoX(cfg, padded, seed=7).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their init
    out = save_hf(tmp_path / "hf", ours.state_dict(), cfg, padded)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    # And back again: the loaded directory round-trips to the same tensors.
    model_dict, hf_sd = load_hf(out)
    back = from_hf_state_dict(hf_sd, ModelConfig(**model_dict), padded)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    assert not list(tmp_path.glob(".hf.*")), "no temporary export directory may be left behind"


def test_state_dict_roundtrip_is_lossless():
    hf = _random_hf(True, 0.25, 32, 4, 2, 64, False)
    cfg = ModelConfig(**model_config_from_hf(hf.config))
    ours = from_hf_state_dict(hf.state_dict(), cfg, cfg.padded_vocab(1))
    back = to_hf_state_dict(ours, cfg)
    for name, t in hf.state_dict().items():
        key = "embed_out.weight" if name == "lm_head.weight" else name
        assert torch.equal(back[key][: t.shape[0]], t), name


def test_unsupported_architecture_is_a_clear_error():
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                      norm="layernorm", activation="swiglu")  # a gated MLP with LayerNorm: no HF class has it
    with pytest.raises(ConfigError, match="LlamaForCausalLM: model.norm='layernorm'.*model.parallel_residual=true"):
        check_hf_compatible(cfg)
