"""Tensor-parallel layers, mappings, cross entropy and RNG against their dense counterparts.

The multi-rank checks run in one spawn of 4 gloo ranks (process start-up is the cost), twice:
tp=4, and tp=2 x dp=2 where each data-parallel replica feeds different data, so a collective that
leaked outside its TP group, or a global rank used where a group rank belongs, changes the values.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist import run_distributed
from megatron_neox.errors import ConfigError
from megatron_neox.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    gather_from_sequence_parallel_region,
    get_rng_tracker,
    model_parallel_seed,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    split_tensor_along_last_dim,
    tensor_parallel_rng,
    vocab_parallel_cross_entropy,
    vocab_range_from_global_vocab_size,
)
from megatron_neox.parallel.utils import shard_rows
from megatron_neox.topology import Topology

B, T, IN, OUT, VOCAB = 2, 4, 8, 16, 32
TOL = dict(rtol=1e-6, atol=1e-6)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rows(n, rank, tp, stride=1):
    """Indices this rank owns of a dim of size n split across tp, block by block."""
    return shard_rows(torch.arange(n), rank, tp, stride)


# ---------------------------------------------------------------- multi-rank checks (in children)

def _check_column(group, rank, tp, data_seed):
    for stride in (1, 2):
        for gather_output in (False, True):
            torch.manual_seed(7)
            col = ColumnParallelLinear(IN, OUT, group=group, gather_output=gather_output,
                                       stride=stride)
            after_sharded = torch.rand(4)
            torch.manual_seed(7)
            full_w = nn.init.normal_(torch.empty(OUT, IN), std=0.02)
            after_dense = torch.rand(4)
            rows = _rows(OUT, rank, tp, stride)
            what = f"column stride={stride} gather={gather_output}"
            assert torch.equal(col.weight, full_w[rows]), f"{what}: sharded init != slice"
            assert torch.equal(after_sharded, after_dense), f"{what}: RNG advanced differently"
            assert col.weight.model_parallel and col.weight.partition_dim == 0
            assert col.weight.partition_stride == stride and col.bias.model_parallel

            dense = nn.Linear(IN, OUT)
            full_b = _randn(OUT, seed=3)
            with torch.no_grad():
                dense.weight.copy_(full_w)
                dense.bias.copy_(full_b)
                col.bias.copy_(full_b[rows])
            x = _randn(B, T, IN, seed=data_seed).requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            g = _randn(B, T, OUT, seed=data_seed + 1)
            y, y_ref = col(x), dense(x_ref)
            if gather_output:
                _close(y, y_ref, f"{what} forward")
                (y * g).sum().backward()
            else:
                _close(y, y_ref[..., rows], f"{what} forward")
                (y * g[..., rows]).sum().backward()
            (y_ref * g).sum().backward()
            _close(x.grad, x_ref.grad, f"{what} input grad")
            _close(col.weight.grad, dense.weight.grad[rows], f"{what} weight grad")
            _close(col.bias.grad, dense.bias.grad[rows], f"{what} bias grad")


def _check_row(group, rank, tp, data_seed):
    cols = _rows(IN, rank, tp)
    for input_is_parallel in (True, False):
        torch.manual_seed(11)
        row = RowParallelLinear(IN, OUT, group=group, input_is_parallel=input_is_parallel)
        torch.manual_seed(11)
        full_w = nn.init.normal_(torch.empty(OUT, IN), std=0.02)
        what = f"row input_is_parallel={input_is_parallel}"
        assert torch.equal(row.weight, full_w[:, cols]), f"{what}: sharded init != slice"
        assert row.weight.model_parallel and row.weight.partition_dim == 1
        assert not getattr(row.bias, "model_parallel", False), "row bias is replicated"

        dense = nn.Linear(IN, OUT)
        with torch.no_grad():
            dense.weight.copy_(full_w)
            dense.bias.copy_(_randn(OUT, seed=5))
            row.bias.copy_(dense.bias)
        x_full = _randn(B, T, IN, seed=data_seed)
        x = (x_full[..., cols] if input_is_parallel else x_full).clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        g = _randn(B, T, OUT, seed=data_seed + 1)
        y, y_ref = row(x), dense(x_ref)
        _close(y, y_ref, f"{what} forward (bias added once)")
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        _close(x.grad, x_ref.grad[..., cols] if input_is_parallel else x_ref.grad,
               f"{what} input grad")
        _close(row.weight.grad, dense.weight.grad[:, cols], f"{what} weight grad")
        _close(row.bias.grad, dense.bias.grad, f"{what} bias grad")

    # reduce_output=False: the caller sums partials and reduces once (parallel residual).
    torch.manual_seed(11)
    row = RowParallelLinear(IN, OUT, group=group, reduce_output=False, skip_bias_add=True)
    with torch.no_grad():
        row.bias.copy_(dense.bias)
    dense.zero_grad(set_to_none=True)
    x = x_full[..., cols].clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    partial, bias = row(x)
    assert bias is row.bias
    assert not torch.allclose(partial, F.linear(x_full, full_w)), "partial was already reduced"
    y = reduce_from_tensor_parallel_region(partial, group) + bias
    y_ref = dense(x_ref)
    _close(y, y_ref, "row reduce_output=False + manual reduce forward")
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    _close(x.grad, x_ref.grad[..., cols], "row reduce_output=False input grad")
    _close(row.weight.grad, dense.weight.grad[:, cols], "row reduce_output=False weight grad")


def _check_embedding(group, rank, tp, data_seed):
    torch.manual_seed(13)
    emb = VocabParallelEmbedding(VOCAB, IN, group=group)
    torch.manual_seed(13)
    full_w = nn.init.normal_(torch.empty(VOCAB, IN), std=0.02)
    rows = _rows(VOCAB, rank, tp)
    assert torch.equal(emb.weight, full_w[rows]), "embedding sharded init != slice"
    assert (emb.vocab_start_index, emb.vocab_end_index) == (rows[0].item(), rows[-1].item() + 1)
    dense = nn.Embedding(VOCAB, IN)
    with torch.no_grad():
        dense.weight.copy_(full_w)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(data_seed))
    ids[0, :4] = torch.tensor([0, VOCAB - 1, VOCAB // tp, VOCAB // tp - 1])  # partition edges
    g = _randn(B, T, IN, seed=data_seed + 1)
    y, y_ref = emb(ids), dense(ids)
    _close(y, y_ref, "embedding forward")
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    _close(emb.weight.grad, dense.weight.grad[rows], "embedding weight grad")


def _check_cross_entropy(group, rank, tp, data_seed):
    import megatron_neox.parallel.cross_entropy as ce

    vocab = _rows(VOCAB, rank, tp)
    whole = ce._CHUNK_ELEMENTS
    # One chunk (these shapes), and chunks of 3 rows (B*T = 8 rows: 3 + 3 + 2), the path of real
    # shapes, whose logits exceed one chunk.
    # A large shift (1e4) must not overflow exp().
    for chunk, offset in ((whole, 0.0), (whole, 1e4), (3 * (VOCAB // tp), 0.0)):
        ce._CHUNK_ELEMENTS = chunk
        full = (3 * _randn(B, T, VOCAB, seed=data_seed) + offset).requires_grad_()
        target = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(data_seed))
        target[0, :4] = torch.tensor([0, VOCAB - 1, VOCAB // tp, VOCAB // tp - 1])
        w = _randn(B, T, seed=data_seed + 2)
        shard = full.detach()[..., vocab].clone().requires_grad_()
        before = shard.detach().clone()
        loss = vocab_parallel_cross_entropy(shard, target, group)
        ref = F.cross_entropy(full.reshape(-1, VOCAB), target.reshape(-1),
                              reduction="none").reshape(B, T)
        assert loss.shape == target.shape
        assert torch.equal(shard.detach(), before), "input logits modified"
        _close(loss, ref, f"cross entropy forward (offset {offset})")
        (loss * w).sum().backward()
        (ref * w).sum().backward()
        _close(shard.grad, full.grad[..., vocab], f"cross entropy grad (offset {offset})")
    ce._CHUNK_ELEMENTS = whole


def _check_sequence_parallel(group, rank, tp, data_seed):
    chunk = slice(rank * T // tp, (rank + 1) * T // tp)
    x = _randn(B, T, IN, seed=data_seed).requires_grad_()
    g = _randn(B, T, IN, seed=data_seed + 1)

    # scatter: keep my slice of the sequence; backward gathers every rank's slice of the grad.
    s = scatter_to_sequence_parallel_region(x, group)
    _close(s, x.detach()[:, chunk], "sequence scatter")
    back = gather_from_sequence_parallel_region(s, group, tensor_parallel_output_grad=False)
    _close(back, x.detach(), "sequence scatter -> gather round trip")
    (back * g).sum().backward()
    _close(x.grad, g, "sequence round trip grad")

    # gather whose output feeds a TP op: backward reduce-scatters the ranks' different grads.
    s = x.detach()[:, chunk].clone().requires_grad_()
    g_mine = g * (rank + 1)
    (gather_from_sequence_parallel_region(s, group) * g_mine).sum().backward()
    _close(s.grad, g[:, chunk] * sum(range(1, tp + 1)), "sequence gather grad (reduce-scatter)")

    # reduce-scatter: sum of the ranks' tensors, my slice; backward gathers.
    p = (x.detach() * (rank + 1)).requires_grad_()
    rs = reduce_scatter_to_sequence_parallel_region(p, group)
    _close(rs, x.detach()[:, chunk] * sum(range(1, tp + 1)), "sequence reduce-scatter")
    (rs * g[:, chunk]).sum().backward()
    _close(p.grad, g, "sequence reduce-scatter grad")

    # A sequence-parallel MLP (column -> gelu -> row) equals the dense one on my slice.
    torch.manual_seed(17)
    fc1 = ColumnParallelLinear(IN, OUT, group=group, sequence_parallel=True)
    fc2 = RowParallelLinear(OUT, IN, group=group, sequence_parallel=True)
    torch.manual_seed(17)
    w1 = nn.init.normal_(torch.empty(OUT, IN), std=0.02)
    w2 = nn.init.normal_(torch.empty(IN, OUT), std=0.02)
    d1, d2 = nn.Linear(IN, OUT), nn.Linear(OUT, IN)
    with torch.no_grad():
        d1.weight.copy_(w1)
        d2.weight.copy_(w2)
        d1.bias.copy_(_randn(OUT, seed=21))
        d2.bias.copy_(_randn(IN, seed=22))
        fc1.bias.copy_(d1.bias[_rows(OUT, rank, tp)])
        fc2.bias.copy_(d2.bias)
    xs = x.detach()[:, chunk].clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = fc2(F.gelu(fc1(xs)))
    y_ref = d2(F.gelu(d1(x_ref)))
    _close(y, y_ref[:, chunk], "sequence-parallel MLP forward")
    (y * g[:, chunk]).sum().backward()
    (y_ref * g).sum().backward()
    _close(xs.grad, x_ref.grad[:, chunk], "sequence-parallel MLP input grad")
    _close(fc1.weight.grad, d1.weight.grad[_rows(OUT, rank, tp)], "SP MLP fc1 weight grad")
    _close(fc2.weight.grad, d2.weight.grad[:, _rows(OUT, rank, tp)], "SP MLP fc2 weight grad")
    assert fc2.bias.sequence_parallel
    _close(fc2.bias.grad, d2.bias.grad, "SP MLP fc2 bias grad (summed over the TP group by its hook)")


def _check_rng(topo):
    def masks():
        a = F.dropout(torch.ones(64), p=0.5)
        with tensor_parallel_rng():
            b = F.dropout(torch.ones(64), p=0.5)
        c = F.dropout(torch.ones(64), p=0.5)
        return torch.stack([a, b, c])

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(topo.tp)]
        dist.all_gather(parts, t, group=topo.tp_group)
        return parts

    model_parallel_seed(1234, topo)
    first = masks()
    parts = gather(first)
    for other in parts[1:]:
        assert torch.equal(other[0], parts[0][0]), "replicated dropout differs within a TP group"
        assert torch.equal(other[2], parts[0][2]), "replicated dropout differs after the fork"
        assert not torch.equal(other[1], parts[0][1]), "TP-region dropout equal across TP ranks"
    model_parallel_seed(1234, topo)
    assert torch.equal(masks(), first), "reseeding did not reproduce the masks"


CHECKS = {"column": _check_column, "row": _check_row, "embedding": _check_embedding,
          "cross_entropy": _check_cross_entropy, "sequence_parallel": _check_sequence_parallel}


def _tensor_parallel_suite(rank, world_size):
    """Every check at tp=4 and at tp=2 (x dp=2): {(check, tp): None, or the failure's message}."""
    results = {}
    for tp in (4, 2):
        topo = Topology(pp=1, tp=tp)
        results[("groups", tp)] = None if (
            dist.get_world_size(topo.tp_group) == tp
            and topo.tp_ranks == list(range(rank - rank % tp, rank - rank % tp + tp))) else f"tp groups {topo}"
        # Each data-parallel replica gets its own data: leakage across TP groups shows up.
        data_seed = 100 + 10 * topo.dp_rank
        runs = {name: (lambda c=check: c(topo.tp_group, topo.tp_rank, tp, data_seed)) for name, check in CHECKS.items()}
        runs["rng"] = lambda: _check_rng(topo)
        for name, run in runs.items():
            try:
                run()
                results[(name, tp)] = None
            except AssertionError as e:  # keep going: every check gets its own verdict
                results[(name, tp)] = f"rank {rank}: {e}"
    return results


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tensor_parallel_suite, 4)


@pytest.mark.parametrize("tp", [4, 2])
@pytest.mark.parametrize("check", ["groups", *CHECKS, "rng"])
def test_tensor_parallel_layer_matches_dense(tp_results, check, tp):
    """At tp=4, and at tp=2 with two data-parallel replicas, on every rank."""
    failures = [r[(check, tp)] for r in tp_results if r[(check, tp)] is not None]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- single process (tp = 1)

def test_tp1_layers_are_plain_linear_and_embedding():
    torch.manual_seed(0)
    col = ColumnParallelLinear(IN, OUT, stride=2)
    row = RowParallelLinear(OUT, IN, skip_bias_add=True)
    emb = VocabParallelEmbedding(VOCAB, IN)
    torch.manual_seed(0)
    w1 = nn.init.normal_(torch.empty(OUT, IN), std=0.02)
    w2 = nn.init.normal_(torch.empty(IN, OUT), std=0.02)
    we = nn.init.normal_(torch.empty(VOCAB, IN), std=0.02)
    assert torch.equal(col.weight, w1) and torch.equal(row.weight, w2) and torch.equal(emb.weight, we)
    x = _randn(B, T, IN, seed=1)
    _close(col(x), F.linear(x, w1), "tp1 column")
    y, bias = row(col(x))
    assert bias is row.bias and torch.count_nonzero(bias) == 0
    ids = torch.tensor([[0, 5, VOCAB - 1]])
    assert torch.equal(emb(ids), we[ids])


def test_cross_entropy_tp1_matches_loss_and_gradient():
    logits = _randn(3, 5, 7, seed=0).double().requires_grad_()
    target = torch.tensor([[0, 6, 3, 2, 1]] * 3)
    ref = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), reduction="none").reshape(3, 5)
    ours = vocab_parallel_cross_entropy(logits, target)
    torch.testing.assert_close(ours, ref)
    weights = _randn(3, 5, seed=1).double()  # a non-uniform upstream gradient
    (want,) = torch.autograd.grad((ref * weights).sum(), logits)
    (got,) = torch.autograd.grad((ours * weights).sum(), logits, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_cross_entropy_in_chunks_keeps_no_fp32_copy_of_half_logits(monkeypatch):
    """bf16 logits: between forward and backward nothing of the logits' size is kept in fp32 (the
    former version kept an fp32 softmax); loss and gradient equal the fp32 reference, also when the
    rows are processed in several chunks (3 rows per chunk here)."""
    from megatron_neox.parallel import cross_entropy

    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", 3 * 7)
    full = (3 * _randn(2, 5, 7, seed=0)).bfloat16()
    target = torch.tensor([[1, 2, 3, 0, 6]] * 2)
    weights = _randn(2, 5, seed=1)
    ref_logits = full.float().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, 7), target.reshape(-1), reduction="none").reshape(2, 5)
    (ref * weights).sum().backward()

    saved = []
    logits = full.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = vocab_parallel_cross_entropy(logits, target)
    (ours * weights).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, ref_logits.grad.bfloat16(), rtol=0, atol=1e-3)  # one bf16 step
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= full.numel()]
    assert not big_fp32, big_fp32


def test_divide_and_split_helpers():
    assert divide(12, 4) == 3
    with pytest.raises(ConfigError, match=r"hidden size \(10\) is not divisible by 4"):
        divide(10, 4, "hidden size")
    parts = split_tensor_along_last_dim(torch.arange(12.0).reshape(2, 6), 3)
    assert [p.tolist() for p in parts][1] == [[2.0, 3.0], [8.0, 9.0]]
    assert vocab_range_from_global_vocab_size(50432, 1, 2) == (25216, 50432)


def test_tensor_parallel_rng_requires_seed():
    get_rng_tracker().reset()
    with pytest.raises(RuntimeError, match="model_parallel_seed"):
        with tensor_parallel_rng():
            pass


@pytest.mark.parametrize("checkpoint_fn", ["checkpoint", "non_reentrant_checkpoint"])
def test_deepspeed_checkpoint_recompute_replays_dropout_masks(checkpoint_fn):
    """DeepSpeed's activation checkpointing restores both RNG streams before the recompute."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    checkpoint = getattr(checkpointing, checkpoint_fn)
    w = _randn(16, 16, seed=0)

    def block(x):
        h = F.dropout(x @ w, p=0.5)
        with tensor_parallel_rng():
            h = F.dropout(torch.tanh(h), p=0.5)
        return F.dropout(h, p=0.5)

    grads = []
    for checkpointed in (False, True):
        model_parallel_seed(42, Topology.single())
        x = _randn(4, 16, seed=1).requires_grad_()
        out = checkpoint(block, x) if checkpointed else block(x)
        # Draws between forward and backward must not leak into the recompute.
        torch.rand(100)
        with tensor_parallel_rng():
            torch.rand(100)
        out.sum().backward()
        grads.append((out.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1]), "recompute drew different dropout masks"
    assert (grads[0][0] == 0).any(), "dropout dropped nothing: the test would prove nothing"
