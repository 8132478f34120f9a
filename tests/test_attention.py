"""Attention: kernels, masks built once per forward, no host syncs, document-aware packing.

Single process, fp32 on CPU. The multi-rank checks (every layout == one rank with the reset flags
on) are in test_layouts.py.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_neox.config import ModelConfig
from megatron_neox.data.loader import BatchLoader, document_ids, document_positions, loader_options
from megatron_neox.errors import ConfigError
from megatron_neox.model import attention
from megatron_neox.model.attention import AttentionPlan, LayerMask, attend, document_cu_seqlens, select_kernel
from megatron_neox.model.gpt_neox import GPTNeoX

EOD = 0
VOCAB = 64

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=24, vocab_size=VOCAB,
            make_vocab_size_divisible_by=8, rotary_pct=0.5)
ARCHS = {
    "rotary": {},
    "learned": dict(position_embedding="learned"),
    "alibi": dict(position_embedding="alibi"),
    # GPT-3: sequential residual, alternating dense / banded layers (band shorter than a document)
    "gpt3_local": dict(position_embedding="learned", parallel_residual=False, attention_pattern="alternating_local",
                       local_window=3),
    "alibi_local": dict(position_embedding="alibi", attention_pattern="alternating_local", local_window=3),
}


def _model(arch, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **ARCHS[arch], **extra})
    return GPTNeoX(cfg, cfg.padded_vocab(1)).eval()


# Two rows of packed documents (each ends with EOD except a row's last, which the sample cuts):
# row 0: lengths 5, 1 (a lone EOD), 7, 11 (cut); row 1: 9, 15 (cut).
DOC_LENGTHS = [[5, 1, 7, 11], [9, 15]]


def _packed():
    g = torch.Generator().manual_seed(3)
    rows, docs = [], []
    for lengths in DOC_LENGTHS:
        row_docs = []
        for j, n in enumerate(lengths):
            doc = torch.randint(1, VOCAB, (n,), generator=g)
            if j < len(lengths) - 1:
                doc[-1] = EOD
            row_docs.append(doc)
        docs.append(row_docs)
        rows.append(torch.cat(row_docs))
    return torch.stack(rows), docs


# ---- document ids and positions -------------------------------------------------------------


def _megatron_reference(tokens):
    """Megatron-LM's get_ltor_masks_and_position_ids (reset_position_ids, reset_attention_mask), as
    its loop over EOD positions: positions restart after each EOD; later tokens cannot see it."""
    B, T = tokens.shape
    pos = torch.arange(T).repeat(B, 1)
    allowed = torch.tril(torch.ones(B, T, T, dtype=torch.bool))
    for b in range(B):
        prev = 0
        for i in (tokens[b] == EOD).nonzero().flatten().tolist():
            allowed[b, i + 1:, :i + 1] = False
            pos[b, i + 1:] -= i + 1 - prev
            prev = i + 1
    return pos, allowed


def test_document_ids_and_positions_follow_megatron():
    tokens, _ = _packed()
    tokens = torch.cat([tokens, torch.tensor([[EOD, EOD] + [5] * 20 + [EOD, EOD]])])  # EOD first, twice, last
    doc = document_ids(tokens, EOD)
    pos = document_positions(doc)
    want_pos, want_allowed = _megatron_reference(tokens)
    assert torch.equal(pos, want_pos)
    T = tokens.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    assert torch.equal((doc[:, :, None] == doc[:, None, :]) & causal, want_allowed)
    assert doc[0].tolist() == [0] * 5 + [1] + [2] * 7 + [3] * 11
    assert pos[0].tolist() == list(range(5)) + [0] + list(range(7)) + list(range(11))


class _Samples:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_loader_adds_doc_ids_and_reset_positions_with_eod_mask_loss():
    tokens, _ = _packed()
    samples = _Samples([np.append(r.numpy(), 7) for r in tokens])  # seq_length + 1 tokens
    from megatron_neox.config import DataConfig

    data = DataConfig(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    (mb,) = BatchLoader(samples, micro_batch_size=2, dp_rank=0, dp_size=1,
                        **loader_options(data, EOD)).next_global_batch(2)
    assert torch.equal(mb["doc_ids"], document_ids(tokens, EOD))
    assert torch.equal(mb["position_ids"], document_positions(mb["doc_ids"]))
    assert torch.equal(mb["loss_mask"], (tokens != EOD).float())
    # Positions only: no doc_ids travel; attention only: positions keep counting.
    (pos_only,) = BatchLoader(samples, micro_batch_size=2, dp_rank=0, dp_size=1,
                              **loader_options(DataConfig(reset_position_ids=True), EOD)).next_global_batch(2)
    assert "doc_ids" not in pos_only and torch.equal(pos_only["position_ids"], mb["position_ids"])
    (mask_only,) = BatchLoader(samples, micro_batch_size=2, dp_rank=0, dp_size=1,
                               **loader_options(DataConfig(reset_attention_mask=True), EOD)).next_global_batch(2)
    assert torch.equal(mask_only["position_ids"], torch.arange(24).expand(2, 24))
    assert torch.equal(mask_only["doc_ids"], mb["doc_ids"])


def test_reset_flags_without_tokenizer_are_refused():
    from megatron_neox.config import DataConfig

    with pytest.raises(ConfigError, match="data.reset_attention_mask=true needs the tokenizer"):
        loader_options(DataConfig(reset_attention_mask=True), None)
    assert loader_options(DataConfig(), None)["reset_position_ids"] is False


# ---- packed == each document alone ------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_sample_logits_equal_each_document_alone(arch):
    model = _model(arch)
    tokens, docs = _packed()
    doc = document_ids(tokens, EOD)
    with torch.no_grad():
        packed = model(tokens, document_positions(doc), doc_ids=doc)
        unmasked = model(tokens)
        for b, row_docs in enumerate(docs):
            start = 0
            for d in row_docs:
                alone = model(d[None])[0]
                got = packed[b, start:start + len(d)]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
                start += len(d)
    # The masks are doing something: without them the later documents see the earlier ones.
    assert (packed[0, 6:] - unmasked[0, 6:]).abs().max() > 1e-2


def test_masked_loss_differs_from_unmasked_on_the_same_tokens():
    model = _model("rotary")
    tokens, _ = _packed()
    doc = document_ids(tokens, EOD)
    with torch.no_grad():
        masked = model(tokens, document_positions(doc), labels=tokens, doc_ids=doc)
        plain = model(tokens, labels=tokens)
    assert abs(float(masked) - float(plain)) > 1e-3


# ---- kernels ---------------------------------------------------------------------------------


def test_kernel_choice_per_device_and_flavour():
    pick = dict(device_type="cuda", dtype=torch.bfloat16, dropout=False, decoding=False, flash=True, flex=True)
    assert select_kernel("auto", **{**pick, "device_type": "cpu"}, masked=True) == "sdpa"
    assert select_kernel("auto", **pick, masked=False) == "sdpa"  # plain causal: SDPA is_causal (flash kernel)
    assert select_kernel("auto", **pick, masked=True) == "flash"
    assert select_kernel("auto", **{**pick, "flash": False}, masked=True) == "flex"
    assert select_kernel("auto", **{**pick, "dtype": torch.float32}, masked=True) == "flex"  # flash-attn: half only
    assert select_kernel("auto", **{**pick, "flash": False, "dropout": True}, masked=True) == "sdpa"
    assert select_kernel("auto", **{**pick, "decoding": True}, masked=True) == "sdpa"
    assert select_kernel("flex", **{**pick, "device_type": "cpu"}, masked=False) == "flex"


def test_model_records_its_kernel_once_per_flavour():
    model = _model("gpt3_local")
    tokens, _ = _packed()
    with torch.no_grad():
        model(tokens)
        model(tokens)
        model(tokens[:, :5], use_cache=True)
    cpu = torch.float32
    assert model.attention_plan.chosen == {
        ("cpu", cpu, False, False, False): "sdpa", ("cpu", cpu, True, False, False): "sdpa",
        ("cpu", cpu, False, False, True): "sdpa", ("cpu", cpu, True, False, True): "sdpa",
    }


@pytest.mark.parametrize("arch", ["rotary", "alibi", "gpt3_local", "alibi_local"])
@pytest.mark.parametrize("documents", [False, True])
def test_flex_attention_gives_the_sdpa_logits(arch, documents):
    # FlexAttention runs on CPU uncompiled and forward-only (torch 2.13: no CPU backward).
    sdpa, flex = _model(arch), _model(arch, attention_kernel="flex")
    tokens, _ = _packed()
    doc = document_ids(tokens, EOD) if documents else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        want, got = sdpa(tokens, doc_ids=doc), flex(tokens, doc_ids=doc)
    assert set(flex.attention_plan.chosen.values()) == {"flex"}
    assert set(sdpa.attention_plan.chosen.values()) == {"sdpa"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _flash_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False, window_size=(-1, -1),
                     alibi_slopes=None):
    """flash_attn_varlen_func's documented semantics, one sequence at a time ([total, H, D] layout):
    causal, keys within window_size=(left, right) of the query, bias -slope * |i - j|."""
    out = torch.zeros_like(q)
    bounds = cu_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        n = e - s
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        ok = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
        if window_size[0] >= 0:
            ok = ok & (j >= i - window_size[0])
        bias = torch.zeros(q.shape[1], n, n)
        if alibi_slopes is not None:
            bias = -alibi_slopes[:, None, None] * (i - j).abs()
        mask = torch.where(ok, bias, float("-inf"))
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return out


@pytest.mark.parametrize("window,alibi", [(None, False), (3, False), (None, True), (3, True)])
def test_flash_varlen_path_gives_the_sdpa_output(monkeypatch, window, alibi):
    """The flash-attn call (flattening, cu_seqlens with empty padding sequences, window and ALiBi
    conventions) against SDPA with the document mask; flash-attn itself needs a GPU, so its
    documented semantics stand in for it."""
    monkeypatch.setattr(attention, "flash_attn_varlen", lambda: _flash_reference)
    tokens, _ = _packed()
    doc = document_ids(tokens, EOD)
    B, T = tokens.shape
    cu = document_cu_seqlens(doc)
    assert cu.shape == (B * T + 1,) and cu[:7].tolist() == [0, 5, 6, 13, 24, 33, 48] and set(cu[7:].tolist()) == {48}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 4, T, 8, generator=g) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    flash = attend(q, k, v, LayerMask("flash", cu_seqlens=cu, window=window, slopes=slopes))
    ref = attention._sdpa_mask(T, 0, window=window, doc_ids=doc, slopes=slopes, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(flash, attend(q, k, v, ref), rtol=1e-5, atol=1e-6)


def test_unavailable_or_impossible_kernels_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="attention_kernel='flex' cannot apply model.attention_dropout"):
        ModelConfig(**BASE, attention_kernel="flex", attention_dropout=0.1)
    monkeypatch.setattr(attention, "flash_attn_varlen", lambda: None)
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        _model("rotary", attention_kernel="flash")
    monkeypatch.setattr(attention, "flash_attn_varlen", lambda: _flash_reference)
    with pytest.raises(ConfigError, match="flash-attn runs fp16/bf16 only"):
        _model("rotary", attention_kernel="flash")(torch.zeros(1, 4, dtype=torch.long))


# ---- masks once per forward, and never a host sync ------------------------------------------


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value: `.item()`, `int(t)`, `bool(t)`,
    `float(t)` (all `aten._local_scalar_dense`), `torch.equal`, `is_nonzero`, and ops whose output
    shape depends on the data (nonzero, masked_select, unique)."""

    SYNCING = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2",
               "unique_dim", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCING:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_sync_counter_sees_item_int_and_bool():
    t = torch.tensor([3])
    with HostSyncCounter() as c:
        t.item(), int(t), bool(t), (t > 0).nonzero()
    assert len(c.calls) == 4


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("documents", [False, True])
def test_training_step_has_no_host_sync(arch, documents):
    model = _model(arch).train()
    tokens, _ = _packed()
    doc = document_ids(tokens, EOD) if documents else None
    pos = document_positions(document_ids(tokens, EOD))  # positions reset either way
    with HostSyncCounter() as c:
        loss = model(tokens, pos, labels=tokens, loss_mask=(tokens != EOD).float(), doc_ids=doc)
        loss.backward()
    assert c.calls == []


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_steps_have_no_host_sync_and_match_full_recompute(arch):
    model = _model(arch)
    tokens, _ = _packed()
    prompt = tokens[:1, :6]
    with torch.no_grad():
        full = model(tokens[:1, :10])
        with HostSyncCounter() as c:
            logits, cache = model(prompt, use_cache=True)
            steps = [logits[:, -1]]
            for t in range(6, 10):
                logits, cache = model(tokens[:1, t:t + 1], kv_cache=cache, use_cache=True)
                steps.append(logits[:, -1])
    assert c.calls == []
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:10], rtol=1e-5, atol=1e-5)


def test_masks_are_built_once_per_forward_not_per_layer(monkeypatch):
    calls = []
    build = attention._sdpa_mask
    monkeypatch.setattr(attention, "_sdpa_mask", lambda *a, **k: calls.append(1) or build(*a, **k))
    model = _model("alibi_local")
    tokens, _ = _packed()
    with torch.no_grad():
        model(tokens, doc_ids=document_ids(tokens, EOD))
    assert len(calls) == 2  # one dense and one banded mask for the 4 layers


def test_pipeline_stage_reuses_the_context_of_its_micro_batch():
    plan = AttentionPlan(ModelConfig(**BASE, position_embedding="alibi"))
    tokens, _ = _packed()
    pos, doc = torch.arange(24).expand(2, 24), document_ids(tokens, EOD)
    first = plan.cached_context(pos, doc, torch.float32)
    assert plan.cached_context(pos, doc, torch.float32) is first  # the next layer of the stage
    again = plan.cached_context(pos.clone(), doc.clone(), torch.float32)  # the next micro-batch
    assert again is not first and torch.equal(again.dense.attn_mask, first.dense.attn_mask)


def test_rotary_angles_match_the_former_cached_table():
    from megatron_neox.model.rotary import RotaryEmbedding

    rot = RotaryEmbedding(8, 10000.0)
    pos = torch.tensor([[0, 1, 2, 5000], [7, 0, 3, 1]])
    cos, sin = rot.cos_sin(pos, torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    table = torch.outer(torch.arange(5001, dtype=torch.float32), inv.float())
    assert cos.shape == (2, 4, 1, 4)  # [B, T, 1 (heads), one angle per rotated pair]
    torch.testing.assert_close(cos[:, :, 0], table.cos()[pos], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, :, 0], table.sin()[pos], rtol=0, atol=1e-6)
