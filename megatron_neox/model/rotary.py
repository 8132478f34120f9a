"""Rotary position embeddings (Su et al. 2021, RoFormer), GPT-NeoX flavour.

Only the first `rotary_ndims` dims of each head rotate (GPT-NeoX-20B/Pythia: 25% of the head);
pairs are (i, i + rotary_ndims/2) -- the "rotate half" layout, as in HF GPTNeoX and HF Llama -- or,
with `model.rotary_interleaved`, GPT-J's (and Meta's Llama code's) interleaved (2i, 2i+1) pairs.
Pair j turns by position * inv_freq[j] either way.
"""
import math

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

    def __init__(self, rotary_ndims: int, base: float = 10000.0, scaling=None, interleaved: bool = False):
        self.rotary_ndims = rotary_ndims
        self.interleaved = interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float64) / rotary_ndims))
        if scaling is not None:  # config.RopeScaling (model.rope_scaling)
            inv_freq = llama3_scaled(inv_freq, scaling)
        self._inv_freq = {torch.device("cpu"): inv_freq.float()}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The angle per position of each rotated pair (fp32), on `device`."""
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin of shape [B, 1, T, rotary_ndims] for broadcasting over heads."""
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq(position_ids.device)
        # Each pair's angle at both of its dims: [f0..fn/2, f0..fn/2] rotating halves, [f0, f0, f1, f1, ...]
        # rotating interleaved pairs.
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([freqs, freqs], dim=-1)
        emb = emb.unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J's rotate_every_two."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ndims: int,
                 interleaved: bool = False):
    """Rotate the first `ndims` dims of q and k ([B, heads, T, head_dim]); pass the rest through.
    cos/sin from a `RotaryEmbedding` of the same `interleaved`."""
    rotate = _rotate_interleaved if interleaved else _rotate_half
    q_rot, q_pass = q[..., :ndims], q[..., ndims:]
    k_rot, k_pass = k[..., :ndims], k[..., ndims:]
    q_rot = q_rot * cos + rotate(q_rot) * sin
    k_rot = k_rot * cos + rotate(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


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


def llama3_scaled(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling (Meta's llama/model.py `apply_scaling`; HF rope_type 'llama3'):
    wavelengths 2*pi/f above original / low_freq_factor are divided by `factor`, those below
    original / high_freq_factor kept, and the band between interpolates smoothly in 1/wavelength."""
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 0 at the long-wavelength end, 1 at the short one
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
