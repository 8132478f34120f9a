"""How the layers attend: the kernel, chosen once per model, and the masks, built once per forward.

The layers of a model differ in attention only by flavour -- dense, or GPT-3's locally banded
layers -- so everything besides q, k and v (rotary cos/sin, the causal / banded / document mask,
ALiBi biases) is built once per forward pass (per micro-batch, per decode step) by
`AttentionPlan.context` and handed to every layer as an `AttentionContext`. Nothing here reads a
tensor's value on the host: no `.item()`, `int(tensor)` or data-dependent shape, so a training or
decode step never waits for the device.

Kernels (`model.attention_kernel`; 'auto' decides per device, dtype and flavour, once, and records
the decision in `AttentionPlan.chosen`):

  sdpa   torch's scaled_dot_product_attention. A plain causal layer gets `is_causal=True`, which on
         GPUs runs the flash / memory-efficient kernel. Anything more (ALiBi, the band, documents, a
         KV-cache offset) becomes one additive mask [B|1, H|1, T, K], which sends SDPA to its math
         or memory-efficient path and costs O(T^2) memory per micro-batch. The kernel on CPU and for
         every step that uses a KV cache (generation).
  flex   FlexAttention (torch.nn.attention.flex_attention, PyTorch >= 2.5): the band and the
         documents as a block-sparse mask (fully masked blocks are skipped: a banded layer costs
         O(T * window), packed documents O(sum of len^2)), ALiBi as a score_mod; compiled on CUDA.
         No dropout on attention probabilities; on CPU it runs forward-only (torch has no CPU
         backward), so 'auto' never picks it there.
  flash  flash-attn's `flash_attn_varlen_func` (FlashAttention-2, Dao 2023), when installed, for
         fp16/bf16 on CUDA: documents as `cu_seqlens`, the band as `window_size`, ALiBi as
         `alibi_slopes`. Preferred over flex for masked layers when both are there.

Documents (data.reset_attention_mask) arrive as `doc_ids` [B, T] (data/loader.py): a token attends
to earlier tokens with the same id only.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_neox.config import ModelConfig
from megatron_neox.errors import ConfigError
from megatron_neox.model.rotary import RotaryEmbedding, alibi_slopes

KERNELS = ("sdpa", "flex", "flash")
_HALF = (torch.float16, torch.bfloat16)


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_varlen() -> Optional[Callable]:
    """flash-attn's `flash_attn_varlen_func`, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def select_kernel(requested: str, *, device_type: str, dtype: torch.dtype, masked: bool, dropout: bool,
                  decoding: bool, flash: bool, flex: bool) -> str:
    """The kernel for one layer flavour. `masked`: the layer needs more than a causal mask (ALiBi, a
    band or documents); `decoding`: the step reads or fills a KV cache."""
    if decoding:
        return "sdpa"  # a prompt or one new token against a KV cache: small, and SDPA takes the offset
    if requested != "auto":
        return requested
    if device_type != "cuda" or not masked:
        return "sdpa"
    if flash and dtype in _HALF:
        return "flash"
    if flex and not dropout:
        return "flex"
    return "sdpa"


@dataclass
class LayerMask:
    """What one layer flavour needs besides q, k, v in this forward, for its kernel."""

    kernel: str
    is_causal: bool = False  # sdpa: SDPA applies the causal mask itself
    attn_mask: Optional[torch.Tensor] = None  # sdpa: additive float [B|1, H|1, T, K]
    block_mask: Any = None  # flex: BlockMask
    score_mod: Optional[Callable] = None  # flex: ALiBi
    cu_seqlens: Optional[torch.Tensor] = None  # flash: document starts in the flattened batch
    window: Optional[int] = None  # flash: band width
    slopes: Optional[torch.Tensor] = None  # flash: ALiBi slopes of this rank's heads


@dataclass
class AttentionContext:
    """Built once per forward, shared by every layer: rotary cos/sin and one LayerMask per flavour."""

    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    dense: LayerMask
    local: Optional[LayerMask] = None

    def mask(self, local: bool) -> LayerMask:
        return self.local if local else self.dense


class AttentionPlan:
    """One per model (or pipeline stage): picks the kernels and builds each forward's context.

    A plain object shared by the layers, not a module: it holds no parameters or checkpointed state.
    """

    def __init__(self, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1):
        self.requested = cfg.attention_kernel
        if self.requested == "flex" and not flex_available():
            raise ConfigError("model.attention_kernel='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                              f"this torch is {torch.__version__}: use 'auto' or 'sdpa'")
        if self.requested == "flash" and flash_attn_varlen() is None:
            raise ConfigError("model.attention_kernel='flash' needs the flash-attn package (pip install flash-attn); "
                              "use 'auto' to fall back to FlexAttention or SDPA")
        if cfg.grouped_query and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
            raise ConfigError(f"model.num_kv_heads={cfg.num_kv_heads} (grouped-query attention) needs torch >= 2.5 "
                              f"(scaled_dot_product_attention's enable_gqa); this torch is {torch.__version__}")
        self.dropout = cfg.attention_dropout > 0
        self.rotary = (RotaryEmbedding(cfg.rotary_ndims, cfg.rotary_base, scaling=cfg.rope_scaling)
                       if cfg.position_embedding == "rotary" else None)
        self.alibi = cfg.position_embedding == "alibi"
        self._slopes: Dict[torch.device, torch.Tensor] = {}
        self._score_mods: Dict[torch.device, Callable] = {}
        if self.alibi:
            heads = cfg.num_attention_heads // tp_size
            self._slopes[torch.device("cpu")] = alibi_slopes(cfg.num_attention_heads)[tp_rank * heads:(tp_rank + 1) * heads]
        self.window = cfg.local_window if cfg.attention_pattern == "alternating_local" else None
        # Mistral: a causal window on every layer, so the "dense" flavour is banded too.
        self.dense_window = cfg.sliding_window
        self.chosen: Dict[Tuple, str] = {}  # (device type, dtype, local, documents, decoding) -> kernel
        self._memo: Optional[Tuple] = None

    def slopes(self, device: torch.device) -> torch.Tensor:
        if device not in self._slopes:
            self._slopes[device] = self._slopes[torch.device("cpu")].to(device)
        return self._slopes[device]

    def _alibi_score_mod(self, device: torch.device) -> Callable:
        """FlexAttention's ALiBi: one function per device for the model's life, so the compiled
        kernel is traced once (it captures the slopes, not a per-step tensor)."""
        if device not in self._score_mods:
            slopes = self.slopes(device)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)

            self._score_mods[device] = score_mod
        return self._score_mods[device]

    def kernel(self, device: torch.device, dtype: torch.dtype, *, local: bool, documents: bool,
               decoding: bool = False) -> str:
        """The kernel for a flavour of layer and kind of input, decided on first use and then fixed."""
        key = (device.type, dtype, local, documents, decoding)
        if key not in self.chosen:
            masked = local or documents or self.alibi or self.dense_window is not None
            kernel = select_kernel(
                self.requested, device_type=device.type, dtype=dtype, masked=masked,
                dropout=self.dropout, decoding=decoding, flash=flash_attn_varlen() is not None, flex=flex_available())
            if kernel == "flash" and dtype not in _HALF:
                raise ConfigError(f"model.attention_kernel='flash': flash-attn runs fp16/bf16 only, the model is {dtype}; "
                                  "use precision bf16/fp16 or attention_kernel 'auto'")
            self.chosen[key] = kernel
        return self.chosen[key]

    def context(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *, dtype: torch.dtype,
                past_len: int = 0, decoding: bool = False) -> AttentionContext:
        """Everything the layers need for queries at `position_ids` [B, T] (after `past_len` cached
        keys), optionally restricted to documents `doc_ids` [B, T]."""
        if doc_ids is not None and past_len:
            raise ValueError("doc_ids with a KV cache: generation treats the prompt as one document")
        if doc_ids is not None and doc_ids.shape != position_ids.shape:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, position_ids {tuple(position_ids.shape)}")
        cos, sin = self.rotary.cos_sin(position_ids, dtype) if self.rotary is not None else (None, None)
        flavours = [False] + ([True] if self.window is not None else [])
        masks = {}
        for local in flavours:
            kernel = self.kernel(position_ids.device, dtype, local=local, documents=doc_ids is not None,
                                 decoding=decoding)
            masks[local] = self._layer_mask(kernel, position_ids, doc_ids, local=local, past_len=past_len, dtype=dtype)
        return AttentionContext(cos, sin, masks[False], masks.get(True))

    def cached_context(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor],
                       dtype: torch.dtype) -> AttentionContext:
        """The context of a pipeline stage's current micro-batch: the stage's first layer builds it, the
        others (which receive the very same position_ids / doc_ids tensors) reuse it. DeepSpeed hands
        every micro-batch over in fresh tensors, and the memo holds them, so identity is a safe key."""
        memo = self._memo
        if memo is not None and memo[0] is position_ids and memo[1] is doc_ids and memo[2] == dtype:
            return memo[3]
        ctx = self.context(position_ids, doc_ids, dtype=dtype)
        self._memo = (position_ids, doc_ids, dtype, ctx)
        return ctx

    def _layer_mask(self, kernel: str, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], *,
                    local: bool, past_len: int, dtype: torch.dtype) -> LayerMask:
        device = position_ids.device
        window = self.window if local else self.dense_window
        slopes = self.slopes(device) if self.alibi else None
        B, T = position_ids.shape
        if kernel == "flex":
            return LayerMask("flex", block_mask=_flex_block_mask(B, T, window=window, doc_ids=doc_ids, device=device),
                             score_mod=self._alibi_score_mod(device) if self.alibi else None)
        if kernel == "flash":
            cu = document_cu_seqlens(doc_ids) if doc_ids is not None else torch.arange(
                0, B * T + 1, T, dtype=torch.int32, device=device)
            return LayerMask("flash", cu_seqlens=cu, window=window, slopes=slopes)
        return _sdpa_mask(T, past_len, window=window, doc_ids=doc_ids, slopes=slopes, device=device, dtype=dtype)


def _sdpa_mask(q_len: int, past_len: int, *, window: Optional[int], doc_ids: Optional[torch.Tensor],
               slopes: Optional[torch.Tensor], device, dtype) -> LayerMask:
    if window is None and doc_ids is None and slopes is None and (past_len == 0 or q_len == 1):
        return LayerMask("sdpa", is_causal=q_len > 1)  # one new token sees its whole past: no mask
    k_len = past_len + q_len
    dist = torch.arange(past_len, k_len, device=device)[:, None] - torch.arange(k_len, device=device)[None, :]
    allowed = dist >= 0
    if window is not None:
        allowed = allowed & (dist < window)
    allowed = allowed[None, None]  # [1, 1, T, K]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # [B, 1, T, K]
    if slopes is None:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    else:
        # ALiBi (Press et al. 2022): -slope * distance, per head; computed in fp32, then cast.
        bias = -slopes[None, :, None, None] * dist.to(torch.float32)[None, None]
        mask = torch.where(allowed, bias, float("-inf")).to(dtype)
    return LayerMask("sdpa", attn_mask=mask)


def _flex_block_mask(B: int, T: int, *, window: Optional[int], doc_ids: Optional[torch.Tensor], device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return ok

    # Per batch only with documents; the causal / banded mask is the same for every row.
    return create_block_mask(mask_mod, B if doc_ids is not None else None, None, T, T, device=device)


def document_cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """flash-attn `cu_seqlens` of the documents in the flattened [B*T] batch: the start of every
    document, then B*T repeated up to B*T + 1 entries. The padding entries are empty sequences, so
    the shape (B*T + 1) never depends on the data and nothing is read back to the host (the number
    of documents would be); empty sequences cost flash-attn one idle thread block each."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(B * T, dtype=torch.int32, device=doc_ids.device)
    firsts = torch.where(starts.flatten(), index, B * T).sort().values
    return torch.cat([firsts, torch.full((1,), B * T, dtype=torch.int32, device=doc_ids.device)])


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, FlexAttention materialises the scores (a reference, not a kernel); compiled, it is
    # one fused kernel with the block mask's sparsity.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LayerMask, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [B, H, T, D] and k, v [B, Hkv, K, D]; returns [B, H, T, D].
    Hkv < H is grouped-query attention (query head h uses KV head h // (H / Hkv)): every kernel takes
    the KV heads as they are, none repeats them in memory."""
    gqa = k.shape[1] != q.shape[1]
    if mask.kernel == "flex":
        return _flex_fn(q.device.type)(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask, enable_gqa=gqa)
    if mask.kernel == "flash":
        B, H, T, D = q.shape

        def flat(x):  # flash-attn takes fewer KV heads natively
            return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

        window = (mask.window - 1, 0) if mask.window is not None else (-1, -1)
        out = flash_attn_varlen()(flat(q), flat(k), flat(v), mask.cu_seqlens, mask.cu_seqlens, T, T,
                                  dropout_p=dropout_p, causal=True, window_size=window, alibi_slopes=mask.slopes)
        return out.view(B, T, H, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn_mask, dropout_p=dropout_p,
                                          is_causal=mask.is_causal, **({"enable_gqa": True} if gqa else {}))
