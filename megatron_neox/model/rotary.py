"""Rotary position embeddings (Su et al. 2021, RoFormer), GPT-NeoX flavour.

Only the first `rotary_ndims` dims of each head rotate (GPT-NeoX-20B/Pythia: 25% of the head);
pairs are (i, i + rotary_ndims/2) -- the "rotate half" layout, as in HF GPTNeoX -- not GPT-J's
interleaved (2i, 2i+1) pairs.
"""
import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_ndims: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        self.rotary_ndims = rotary_ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float64) / rotary_ndims))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache_len = 0
        self._build_cache(max_positions)

    def _build_cache(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(torch.float32))
        emb = torch.cat([freqs, freqs], dim=-1)
        # Non-persistent: derived from the config, never stored in checkpoints.
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)
        self._cache_len = n

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin of shape [B, 1, T, rotary_ndims] for broadcasting over heads."""
        need = int(position_ids.max()) + 1
        if need > self._cache_len:
            self._build_cache(max(need, 2 * self._cache_len))
            self.cos_cached = self.cos_cached.to(self.inv_freq.device)
            self.sin_cached = self.sin_cached.to(self.inv_freq.device)
        cos = self.cos_cached[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin_cached[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ndims: int):
    """Rotate the first `ndims` dims of q and k ([B, heads, T, head_dim]); pass the rest through."""
    q_rot, q_pass = q[..., :ndims], q[..., ndims:]
    k_rot, k_pass = k[..., :ndims], k[..., ndims:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
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
