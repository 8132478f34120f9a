"""LayerNorm and RMSNorm; apex's fused kernels on GPU when apex is importable, PyTorch otherwise."""
import torch
from torch import nn

try:  # apex is optional and GPU-only (the PyPI package named `apex` is unrelated).
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "no apex"
    _ApexLayerNorm = None


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019); statistics in fp32 for half-precision inputs."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if _ApexLayerNorm is not None and torch.cuda.is_available():
        return _ApexLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)
