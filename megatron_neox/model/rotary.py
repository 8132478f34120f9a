"""Rotary position embeddings (Su et al. 2021, RoFormer), GPT-NeoX flavour.

Only the first `rotary_ndims` dims of each head rotate (GPT-NeoX-20B/Pythia: 25% of the head);
pairs are (i, i + rotary_ndims/2) -- the "rotate half" layout, as in HF GPTNeoX -- not GPT-J's
interleaved (2i, 2i+1) pairs.
"""
import torch


class RotaryEmbedding:
    """cos/sin of each position's rotation angles, computed from the position ids themselves.

    There is no cache sized by the largest position: looking one up needed `int(position_ids.max())`,
    a host sync in every layer of every micro-batch and decode step. `position * inv_freq` in fp32
    gives the same angles (the cached table held the same product), and its cost is one
    [B, T, rotary_ndims] elementwise op per forward (the model computes it once for all layers).
    A plain object, not a module: it holds no state a checkpoint needs; its frequencies are copied
    to a device once, on first use there.
    """

    def __init__(self, rotary_ndims: int, base: float = 10000.0):
        self.rotary_ndims = rotary_ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float64) / rotary_ndims))
        self._inv_freq = {torch.device("cpu"): inv_freq.float()}

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin of shape [B, T, 1, rotary_ndims / 2], one angle per rotated pair, for broadcasting
        over the heads of [B, T, heads, head_dim] (the fused QKV's own layout, see `apply_rotary`)."""
        freqs = position_ids[..., None].to(torch.float32) * self._inv_freq_on(position_ids.device)
        freqs = freqs.unsqueeze(2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


class _RotateHalf(torch.autograd.Function):
    """Rotate pairs (i, i + n/2) of the first n = 2 * cos.size(-1) dims of x; pass the rest through.

    Written out with its backward (the transpose of a rotation is the rotation by -angle) so that
    autograd records no slice of x: sliced inputs get full-size zero-filled gradients
    (`slice_backward`) which are then summed, 4 per layer before. One cat forward, one backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim] (any strides, e.g. a view into the fused QKV) rotated on its first
    2 * cos.size(-1) dims; returns a new contiguous tensor of the same shape. cos/sin [B, T, 1, n/2]
    from `RotaryEmbedding.cos_sin`. The elementwise work touches only the rotated dims."""
    return _RotateHalf.apply(x, cos, sin)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper takes the slopes of the closest
    smaller power of two and fills up with every other slope of the next power of two.
    """
    import math

    def pow2(n: int):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(s, dtype=torch.float32)
