"""One typed configuration tree for a training run.

A run is described by one JSON or YAML file (see `deepspeed_configs/`). `load_config` reads it,
applies `--set a.b=value` overrides, validates every key (unknown keys are errors that name the
key path and the closest valid key) and returns a `Config`. Values that depend on the number of
ranks (data-parallel size, gradient accumulation, padded vocab) are derived by `Config.layout`;
the DeepSpeed JSON dict is emitted from the config by the engine (training/engine.py
`deepspeed_config`), so nobody maintains two files.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from megatron_neox.data.blended import DEFAULT_SPLIT, mixture_problems
from megatron_neox.data.loader import eod_flags
from megatron_neox.errors import ConfigError
from megatron_neox.hardware import regional_compile_ok
from megatron_neox.layout import Layout, config_split_problems
from megatron_neox.precision import precision_problems

# Where `--config NAME` looks when NAME is not a path.
CONFIG_DIR = Path(os.environ.get("MEGATRON_NEOX_CONFIGS", Path(__file__).resolve().parent.parent / "deepspeed_configs"))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and a section is immutable once
    validated (a changed value is a new config: `resolve.with_values`, `model_copy`), so the config
    that set-up resolved is the one every component reads."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def pad_vocab_size(vocab_size: int, tp: int = 1, multiple: int = 128) -> int:
    """Round the vocab up so each tensor-parallel shard has a multiple of `multiple` rows.

    Megatron/gpt-neox rule (`make_vocab_size_divisible_by` x tp): 50277 -> 50304 at tp=1,
    50432 at tp=2, 50688 at tp=4.
    """
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ConfigError(f"pad_vocab_size: vocab_size={vocab_size}, tp={tp}, multiple={multiple} must be >= 1")
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


class RopeScaling(Section):
    """Llama-3's rotary frequency scaling (Meta's llama3 `apply_scaling`; HF `rope_type: llama3`):
    wavelengths above original_max_position_embeddings / low_freq_factor are divided by `factor`,
    those below original / high_freq_factor kept, the band between interpolated smoothly."""

    type: Literal["llama3"]
    """The scaling rule; only 'llama3' (Llama 3.1/3.2/3.3) is implemented."""
    factor: float = Field(gt=0)
    """Divisor of the low frequencies (Llama 3.1: 8)."""
    low_freq_factor: float = Field(gt=0)
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled (Llama 3.1: 1)."""
    high_freq_factor: float = Field(gt=0)
    """Wavelengths below original_max_position_embeddings / high_freq_factor are kept (Llama 3.1: 4)."""
    original_max_position_embeddings: int = Field(gt=0)
    """Context length the unscaled model was trained at (Llama 3.1: 8192)."""

    @model_validator(mode="after")
    def _check_band(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling: high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor} (the interpolation band would be empty)")
        return self


class ModelConfig(Section):
    num_layers: int = Field(gt=0)
    """Number of transformer layers (L)."""
    hidden_size: int = Field(gt=0)
    """Model width d_model."""
    num_attention_heads: int = Field(gt=0)
    """Attention heads; hidden_size must be a multiple of it."""
    num_kv_heads: Optional[int] = Field(None, gt=0)
    """Key/value heads for grouped-query attention (Ainslie et al. 2023; Llama-2-70B, Llama-3, Mistral: 8);
    null = num_attention_heads (multi-head). Under TP the KV heads are split when num_kv_heads % tp == 0,
    replicated on every rank when tp % num_kv_heads == 0, refused otherwise."""
    seq_length: int = Field(gt=0)
    """Training context length in tokens (also the rotary/learned position range)."""
    vocab_size: int = Field(gt=0)
    """Tokenizer vocabulary size before padding (50277 for the GPT-NeoX-20B tokenizer)."""
    make_vocab_size_divisible_by: int = Field(128, gt=0)
    """The padded vocab is a multiple of this times tp (Megatron's rule)."""
    padded_vocab_size: Optional[int] = None
    """Fix the padded vocab instead of deriving it (e.g. GPT-J's 50400); must divide by tp."""
    intermediate_size: Optional[int] = None
    """MLP width; default 4*hidden (GELU) or the 8/3*hidden rounded to 256 (SwiGLU)."""
    position_embedding: Literal["rotary", "learned", "alibi"] = "rotary"
    """Position encoding: rotary (RoPE), learned absolute, or ALiBi biases."""
    rotary_pct: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of each head's dims that get rotary (GPT-NeoX-20B/Pythia: 0.25)."""
    rotary_dims: Optional[int] = None
    """Rotary dims per head, overrides rotary_pct (GPT-J: 64)."""
    rotary_base: float = Field(10000.0, gt=0)
    """RoPE base (theta); Llama 3: 500000."""
    rotary_interleaved: bool = False
    """Rotate interleaved pairs (2i, 2i+1) ("rotate every two": GPT-J, Meta's Llama code) instead of
    (i, i + rotary_dims/2) ("rotate half": GPT-NeoX, HF Llama)."""
    rope_scaling: Optional[RopeScaling] = None
    """Rotary frequency scaling (Llama 3.1+); null = none."""
    parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, GPT-J) instead of the sequential GPT-3 form."""
    shared_norm: bool = False
    """Parallel residual with one norm feeding both attention and MLP (GPT-J)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer type."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the norm layers."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """MLP activation: exact GELU, tanh-approximate GELU (GPT-2/3, GPT-J) or SwiGLU (gated)."""
    attention_bias: Union[bool, Literal["qkv"]] = True
    """Biases on the QKV and attention-output projections; 'qkv': on the q/k/v projections only
    (Qwen2)."""
    mlp_bias: bool = True
    """Biases on the two MLP projections."""
    lm_head_bias: bool = False
    """A bias on the untied output projection (GPT-J)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (GPT-NeoX default: untied)."""
    init_method: Literal["normal", "small_init"] = "small_init"
    """Init of most weights: normal(init_std) or small_init std=sqrt(2/(5d)) (Nguyen & Salazar 2019)."""
    output_layer_init_method: Literal["normal", "wang_init", "scaled_normal"] = "wang_init"
    """Init of attention-output and MLP-output projections: wang_init std=2/(L*sqrt(d)) (Wang, Mesh-Transformer-JAX), scaled_normal std=init_std/sqrt(2L) (GPT-2)."""
    init_std: float = Field(0.02, gt=0)
    """Std of the 'normal' init."""
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention probabilities."""
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the attention and MLP outputs before the residual add."""
    attention_pattern: Literal["dense", "alternating_local"] = "dense"
    """GPT-3's alternating dense and locally banded attention, or dense everywhere."""
    local_window: int = Field(256, gt=0)
    """Band width (tokens) of local layers when attention_pattern='alternating_local'."""
    sliding_window: Optional[int] = Field(None, gt=0)
    """Causal sliding window on every layer (Mistral: 4096): token i attends to j iff i - W < j <= i,
    W keys including itself (HF Mistral's rule); null = none."""
    attention_kernel: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    """Attention kernel (model/attention.py). 'auto': SDPA on CPU, for decoding and for plain causal layers;
    on CUDA, layers with ALiBi, the local band or documents use flash-attn (installed, fp16/bf16), else
    FlexAttention (compiled), else SDPA with a mask. 'flex' has no attention dropout and, on CPU, no backward."""
    compile: Union[Literal["auto"], bool] = "auto"
    """torch.compile each transformer layer (regional: identical layers share one compiled graph; model/compile.py).
    'auto': on for CUDA, off on CPU, off with dropout > 0 or ZeRO-3 (which `true` refuses). Decoding stays eager."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def grouped_query(self) -> bool:
        """Fewer KV heads than query heads: q and the KV heads are separate parameters."""
        return self.kv_heads != self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the q/k/v projections have biases."""
        return self.attention_bias in (True, "qkv")

    @property
    def attention_out_bias(self) -> bool:
        """Whether the attention-output projection has a bias."""
        return self.attention_bias is True

    @property
    def qkv_size(self) -> int:
        """Output rows of the q, k and v projections together."""
        return (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.activation == "swiglu":
            # LLaMA-style 2/3 * 4d rounded up to a multiple of 256 keeps the parameter count of a 4d MLP.
            return int(math.ceil(8 * self.hidden_size / 3 / 256) * 256)
        return 4 * self.hidden_size

    @property
    def rotary_ndims(self) -> int:
        if self.position_embedding != "rotary":
            return 0
        if self.rotary_dims is not None:
            return self.rotary_dims
        # Same rounding as HF GPTNeoX: int(head_dim * pct).
        return int(self.head_dim * self.rotary_pct)

    def padded_vocab(self, tp: int) -> int:
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        return pad_vocab_size(self.vocab_size, tp, self.make_vocab_size_divisible_by)

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.position_embedding == "rotary":
            r = self.rotary_ndims
            if r <= 0 or r % 2 or r > self.head_dim:
                raise ValueError(
                    f"rotary dims per head = {r} (from model.rotary_pct/rotary_dims) must be even and "
                    f"in 2..head_dim={self.head_dim}"
                )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"model.num_kv_heads={self.num_kv_heads}: each KV head serves a whole group of "
                             "query heads")
        if self.position_embedding != "rotary" and (self.rotary_interleaved or self.rope_scaling is not None):
            raise ValueError(f"model.rotary_interleaved / model.rope_scaling need model.position_embedding='rotary', "
                             f"found {self.position_embedding!r}")
        if self.sliding_window is not None and self.attention_pattern != "dense":
            raise ValueError("model.sliding_window (every layer) and model.attention_pattern='alternating_local' "
                             "both set a band: use one")
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError("model.lm_head_bias=true needs an untied output layer (model.tie_embeddings=false)")
        if self.attention_kernel == "flex" and self.attention_dropout > 0:
            raise ValueError(
                f"model.attention_kernel='flex' cannot apply model.attention_dropout={self.attention_dropout}: "
                "use attention_kernel 'auto' (SDPA or flash-attn when dropout is on) or attention_dropout=0"
            )
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("model.shared_norm=true needs model.parallel_residual=true (GPT-J layout)")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"model.padded_vocab_size={self.padded_vocab_size} is smaller than model.vocab_size={self.vocab_size}"
            )
        return self


class ParallelConfig(Section):
    pp: int = Field(1, gt=0)
    """Pipeline-parallel stages."""
    tp: int = Field(1, gt=0)
    """Tensor-parallel (Megatron) ranks; adjacent ranks, keep within a node."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: shard norms/dropout activations along the sequence under TP."""
    partition_method: str = "type:transformer"
    """How DeepSpeed assigns layers to stages: 'type:transformer', 'parameters' or 'uniform'."""

    @model_validator(mode="after")
    def _check_partition(self) -> "ParallelConfig":
        if self.partition_method not in ("parameters", "uniform") and not self.partition_method.startswith("type:"):
            raise ValueError(
                f"parallel.partition_method={self.partition_method!r}: expected 'type:transformer', "
                "'parameters' or 'uniform'"
            )
        return self


class BatchRampup(Section):
    start_tokens: int = Field(gt=0)
    """Global batch at step 0, in tokens (GPT-3: 32k), rounded down to whole micro x dp batches."""
    increment_tokens: int = Field(gt=0)
    """Batch grows in steps of this many tokens (rounded to whole micro x dp batches)."""
    ramp_tokens: int = Field(gt=0)
    """Tokens over which the batch grows linearly to the full global batch (GPT-3: 4-12B)."""


class TrainConfig(Section):
    iters: Optional[int] = Field(None, gt=0)
    """Optimizer steps to train for (or set train.train_tokens)."""
    train_tokens: Optional[int] = Field(None, gt=0)
    """Token budget: stop once this many tokens have been consumed."""
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per rank per forward pass."""
    global_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per optimizer step over all data-parallel ranks (= micro x grad_accum x dp)."""
    gradient_accumulation_steps: Optional[int] = Field(None, gt=0)
    """Alternative to global_batch_size: micro-batches per step on each rank."""
    seed: int = 1234
    """Seed of init, data order and dropout."""
    batch_rampup: Optional[BatchRampup] = None
    """GPT-3 batch-size warm-up in tokens; off when null."""
    max_skipped_steps: int = Field(20, gt=0)
    """Abort after this many consecutive skipped (overflow) or non-finite steps."""
    exit_interval: Optional[int] = Field(None, gt=0)
    """Save and exit after this many steps of this run (for time-limited jobs)."""
    on_spike: Literal["abort", "rollback"] = "abort"
    """What a non-finite loss or a loss spike does. 'abort': a non-finite loss counts as a skipped
    step (train.max_skipped_steps) and spikes are not looked for. 'rollback' (the PaLM recipe): reload
    the last complete checkpoint and skip train.spike_skip_batches global batches after its data
    position. Needs checkpoint.dir and checkpoint.save_interval."""
    spike_factor: float = Field(3.0, gt=1.0)
    """rollback: a loss above this x the median of the last train.spike_window losses is a spike."""
    spike_window: int = Field(50, gt=0)
    """rollback: losses the running median is taken over; no spike is called before the window is full."""
    spike_skip_batches: int = Field(200, gt=0)
    """rollback: global batches skipped after the checkpoint's data position (PaLM skipped ~200-500)."""
    max_rollbacks: int = Field(5, gt=0)
    """rollback: the run aborts at the spike after this many rollbacks."""
    inject_spike_at: List[int] = []
    """Fault injection (testing the policy): the losses of these steps are treated as spikes, once
    per trajectory; the weights and the logged loss are untouched."""
    objective: Literal["lm", "sft", "dpo"] = "lm"
    """What a step minimises. 'lm': next-token loss on every token (pretraining). 'sft': loss on the
    trained (answer) tokens only, the mean over those of the global batch; data.prefixes names the
    --output-prefix of `tools/preprocess_data.py --format sft`. 'dpo': the sigmoid DPO loss against
    the start model (data from --format dpo; micro_batch_size and global_batch_size count pairs).
    Start from weights with checkpoint.load + checkpoint.finetune (training/objectives.py)."""
    dpo_beta: float = Field(0.1, gt=0)
    """dpo: beta of the DPO loss, the strength of the pull towards the reference model (Rafailov et
    al. 2023 use 0.1 and 0.5; TRL's default is 0.1)."""

    @model_validator(mode="after")
    def _check_budget(self) -> "TrainConfig":
        if self.iters is None and self.train_tokens is None:
            raise ValueError("set train.iters or train.train_tokens (how long to train)")
        if any(s < 1 for s in self.inject_spike_at):
            raise ValueError(f"train.inject_spike_at={self.inject_spike_at}: expected step numbers >= 1")
        if self.inject_spike_at and self.on_spike != "rollback":
            raise ValueError(f"train.inject_spike_at={self.inject_spike_at} tests the rollback policy, but "
                             f"train.on_spike={self.on_spike!r} looks for no spikes; set train.on_spike=rollback")
        return self


class OptimizerConfig(Section):
    type: Literal["adamw", "adam"] = "adamw"
    """AdamW (decoupled decay) or Adam with L2 (DeepSpeed optimizer names)."""
    lr: float = Field(6e-4, gt=0)
    """Peak learning rate."""
    betas: List[float] = [0.9, 0.95]
    """Adam betas (GPT-3: 0.9, 0.95)."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay; biases and norm weights are never decayed."""
    clip_grad: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 disables)."""

    @model_validator(mode="after")
    def _check_betas(self) -> "OptimizerConfig":
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={self.betas}: expected two numbers in [0, 1)")
        return self


class LRScheduleConfig(Section):
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warm-up."""
    warmup_iters: Optional[int] = Field(None, ge=0)
    """Warm-up steps; default warmup_fraction x decay steps."""
    warmup_fraction: float = Field(0.01, ge=0, le=1)
    """Warm-up as a fraction of the decay steps when warmup_iters is unset."""
    warmup_tokens: Optional[int] = Field(None, gt=0)
    """Warm-up measured in tokens (GPT-3: 375M); wins over warmup_iters."""
    decay_iters: Optional[int] = Field(None, gt=0)
    """Steps over which lr decays to min_lr; default train.iters."""
    decay_tokens: Optional[int] = Field(None, gt=0)
    """Decay over tokens instead of steps (GPT-3: 260B tokens); wins over decay_iters."""
    min_lr: Optional[float] = Field(None, ge=0)
    """Final learning rate; default min_lr_ratio x optimizer.lr."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final lr as a fraction of the peak (GPT-3: 10%)."""


class LossScaleConfig(Section):
    initial_scale_power: int = Field(16, ge=0, le=64)
    """fp16: the dynamic scale starts at 2**this."""
    window: int = Field(1000, gt=0)
    """fp16: steps without overflow before the scale doubles."""
    hysteresis: int = Field(2, gt=0)
    """fp16: overflows tolerated before the scale is lowered."""
    min_scale: float = Field(1.0, gt=0)
    """fp16: floor of the dynamic scale."""
    static_scale: float = Field(0.0, ge=0)
    """fp16: a fixed scale instead of the dynamic one (0 = dynamic)."""


class ZeroConfig(Section):
    stage: Union[Literal["auto"], Annotated[int, Field(ge=0, le=3)]] = "auto"
    """ZeRO stage (0-1 with a pipeline, 0-3 without). 'auto': 0 for fp32 on one data-parallel rank, else 1 (megatron_neox/precision.py)."""
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    """Elements per gradient reduce bucket."""
    allgather_bucket_size: int = Field(500_000_000, gt=0)
    """Elements per parameter all-gather bucket."""
    overlap_comm: Optional[bool] = None
    """Overlap gradient reduction with backward; null = on where DeepSpeed allows it (ZeRO >= 1, pp = 1) and dp > 1."""
    contiguous_gradients: bool = True
    """Copy gradients into one buffer as they are produced."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO-Offload of optimizer states (stage >= 1)."""


class ActivationCheckpointConfig(Section):
    interval: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = 0
    """Recompute every block of this many transformer layers in backward (0 = off). 'auto': from the
    planner's memory estimate of this layout on this device (megatron_neox/plan.py
    `choose_checkpoint_interval`): off when the run fits with a margin, else the interval with the
    smallest estimated peak; the start-up line says which and why, `tools/plan.py` shows it ahead."""
    partition_activations: bool = False
    """Shard the saved checkpoint inputs across the TP group (DeepSpeed); a no-op at tp = 1."""


class DataConfig(Section):
    prefixes: List[str] = []
    """Dataset prefixes (without .bin/.idx) written by tools/preprocess_data.py."""
    weights: Optional[List[float]] = None
    """Blend weights, one per prefix; null = proportional to each dataset's tokens."""
    preset: Optional[Literal["pile"]] = None
    """'pile': weight components by tokens x the Pile paper's epochs (Table 1)."""
    split: str = DEFAULT_SPLIT
    """Train/valid/test split by document ranges: 1-3 weights ('969,30,1'; '100' = train only)."""
    cache_dir: Optional[str] = None
    """Where sample indices are cached; default beside the first prefix."""
    check_token_ids: bool = True
    """Check once per dataset that every token id is below model.vocab_size (a scan of each .bin on
    rank 0, cached in the index cache; ~0.2-2 GB/s, so a Pile-sized 600 GB .bin takes minutes to an
    hour at its first start). Turn off for large data you tokenized with this model's tokenizer."""
    eod_mask_loss: bool = False
    """Give no loss to predicting the token after an end-of-document token."""
    reset_position_ids: bool = False
    """Positions restart at 0 after each end-of-document token (Megatron-LM's flag), so a packed document
    sees the positions it would see alone. Needs tokenizer.path (the EOD id); free (computed with the batch)."""
    reset_attention_mask: bool = False
    """A token attends only to earlier tokens of its own document (an EOD ends its document), instead of
    across the GPT-3 packing boundary. Needs tokenizer.path. Cost: the document ids travel with the batch
    (and between pipeline stages); on GPUs a varlen/document kernel, on CPU an O(T^2) mask (README)."""
    skip_batches: List[List[int]] = []
    """Global batches of the data order never trained on, as [start, end) ranges of batch indices
    (batch b is the one step b+1 would read without skips), e.g. [[4000, 4200]]: the ranges a
    loss-spike rollback skips, given from the start."""

    @model_validator(mode="after")
    def _check_weights(self) -> "DataConfig":
        for r in self.skip_batches:
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise ValueError(f"data.skip_batches: {r} is not a [start, end) range with 0 <= start < end")
        problems = mixture_problems(self.prefixes, self.weights, self.preset, self.split)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("split", mode="before")
    @classmethod
    def _split_from_number(cls, v):
        # `--set data.split=100` parses as the JSON number 100.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class TokenizerConfig(Section):
    path: Optional[str] = None
    """HF tokenizers JSON file (tools/train_tokenizer.py, or the GPT-NeoX-20B tokenizer.json)."""


class CheckpointConfig(Section):
    dir: Optional[str] = None
    """Where checkpoints are saved (global_stepN/ and `latest`)."""
    save_interval: Optional[int] = Field(None, gt=0)
    """Save every this many steps (and at the end, and on SIGTERM/SIGUSR1)."""
    load: Optional[str] = None
    """Checkpoint dir to resume from; default checkpoint.dir (auto-resume from its `latest`)."""
    keep_last: Optional[int] = Field(None, gt=0)
    """Keep only the newest K checkpoints."""
    finetune: bool = False
    """Load weights only: start at step 0 with fresh optimizer and data position."""
    allow_data_change: bool = False
    """Resume although the data setup differs from the checkpoint's (model.seq_length, data.prefixes,
    data.weights, data.preset, data.split, train.seed): the saved data position then counts
    samples of another order. Refused unless set; when set, the log names what changed."""
    async_save: bool = False
    """Write checkpoints in a background thread: a save costs the training loop one host copy of
    this rank's state (extra host memory of that size) instead of the whole write. A checkpoint is
    declared complete (complete.json, then `latest`) only once every rank's files are fsynced."""


class LogConfig(Section):
    dir: Optional[str] = None
    """metrics.jsonl, TensorBoard events and wandb files go here."""
    interval: int = Field(10, gt=0)
    """Steps between log lines."""
    tensorboard: bool = False
    """Write TensorBoard events to log.dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_API_KEY is set)."""
    wandb_project: str = "megatron_neox"
    """wandb project name."""
    peak_tflops: Union[float, Literal["auto", "measure"]] = "auto"
    """Peak TFLOP/s per rank for MFU: a number, 'auto' (from the GPU name and precision) or 'measure'."""


class EvalConfig(Section):
    interval: Optional[int] = Field(None, gt=0)
    """Evaluate on the valid split every this many steps (null = only at the end)."""
    iters: int = Field(10, gt=0)
    """Global batches per evaluation."""
    tasks: List[str] = []
    """lm-evaluation-harness tasks (or the presets neox20b, gpt3) to run on the sharded training engine; logged as eval/<task>/<metric>. Needs tokenizer.path."""
    tasks_interval: Optional[int] = Field(None, gt=0)
    """Run eval.tasks every this many steps (null = only after the last step)."""
    num_fewshot: Optional[int] = Field(None, ge=0)
    """Few-shot examples per task for eval.tasks (null = each task's own default)."""
    include_path: Optional[str] = None
    """Directory of extra lm-eval task YAMLs that eval.tasks may name."""
    tasks_limit: Optional[float] = Field(None, gt=0)
    """At most this many examples per task (< 1: a fraction) for eval.tasks; null = all."""


Precision = Literal["fp32", "fp16", "bf16"]


def compile_problems(setting: Union[str, bool], *, dropout: bool, zero_stage: Any) -> List[str]:
    """Why `model.compile=true` cannot run with this configuration (empty: it can). model/compile.py
    says why each combination is refused; `auto` never chooses them."""
    if setting is not True:
        return []
    problems = []
    if dropout:
        problems.append("model.compile=true with model.hidden_dropout / attention_dropout > 0 is refused: compiled "
                        "dropout draws other masks than the eager reference and their replay under activation "
                        "recompute is unproven; set the dropouts to 0 or model.compile to 'auto'/false")
    if zero_stage == 3:
        problems.append("model.compile=true with zero.stage=3 is refused: ZeRO-3 gathers parameters in module hooks "
                        "inside the forward, which the compiled layer would have to trace; use zero.stage <= 2 or "
                        "model.compile 'auto'/false")
    if not regional_compile_ok():
        import torch

        problems.append(f"model.compile=true needs torch >= 2.5 (this is {torch.__version__}): before it, "
                        "torch.compile makes each layer a graph of its own and runs layers past its cache limit "
                        "(8) eagerly; use model.compile 'auto'/false, or torch >= 2.5")
    return problems


class Config(Section):
    comment: Optional[str] = None
    """Free text: where the numbers come from."""
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    precision: Precision = "fp32"
    """Training precision: fp32, fp16 (dynamic loss scaling) or bf16."""
    loss_scale: LossScaleConfig = LossScaleConfig()
    zero: ZeroConfig = ZeroConfig()
    activation_checkpointing: ActivationCheckpointConfig = ActivationCheckpointConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    deepspeed: Dict[str, Any] = {}
    """Extra DeepSpeed config keys, merged last into the emitted dict."""

    @model_validator(mode="after")
    def _check_cross(self) -> "Config":
        problems = config_split_problems(self) + precision_problems(self)
        problems += compile_problems(self.model.compile, zero_stage=self.zero.stage,
                                     dropout=self.model.hidden_dropout > 0 or self.model.attention_dropout > 0)
        if self.eval.tasks and not self.tokenizer.path:
            problems.append("eval.tasks needs tokenizer.path: the harness encodes the tasks' text with the model's "
                            "own tokenizer")
        finetune_eod = eod_flags(self.data) if self.train.objective != "lm" else []
        if finetune_eod:
            problems.append(f"data.{finetune_eod[0]} does not apply to train.objective={self.train.objective!r}: SFT "
                            "packs whole examples and restarts positions and attention at each itself, DPO rows hold "
                            "one sequence each; leave it false")
        if self.train.objective != "lm" and len(self.data.prefixes or []) != 1:
            problems.append(f"train.objective={self.train.objective!r} reads one dataset: set data.prefixes to the "
                            f"--output-prefix of tools/preprocess_data.py --format {self.train.objective}")
        if self.train.on_spike == "rollback" and not (self.checkpoint.dir and self.checkpoint.save_interval):
            problems.append("train.on_spike='rollback' needs checkpoint.dir and checkpoint.save_interval "
                            "(a rollback reloads the last complete checkpoint)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived values -------------------------------------------------------------------

    _resolution: Any = PrivateAttr(None)

    def layout(self, world_size: int) -> Layout:
        """This config on `world_size` ranks (see `megatron_neox.layout`); ConfigError if it does not fit."""
        return Layout.from_config(self, world_size)

    @property
    def resolved(self) -> Any:
        """What set-up decided for this run (`megatron_neox.resolve.Resolution`: the layout and every
        'auto' choice with its reason); only on the config `resolve` returned."""
        if self._resolution is None:
            raise ConfigError("this config is not resolved for a world yet: call megatron_neox.resolve.resolve(cfg, "
                              "world_size) (training/launch.py setup does) and pass the config it returns")
        return self._resolution

    @property
    def is_resolved(self) -> bool:
        return self._resolution is not None

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")


# ---- loading --------------------------------------------------------------------------------


def resolve_config_path(name: Union[str, os.PathLike]) -> Path:
    """A path if it exists, else `deepspeed_configs/NAME` (with .json/.yaml/.yml tried)."""
    p = Path(name)
    if p.is_file():
        return p
    candidates = [CONFIG_DIR / str(name)] + [CONFIG_DIR / f"{name}{ext}" for ext in (".json", ".yaml", ".yml")]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(q.name for q in CONFIG_DIR.glob("*")) if CONFIG_DIR.is_dir() else []
    close = difflib.get_close_matches(str(name), available, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(available)}"
    raise ConfigError(f"config {str(name)!r} not found (as a path or in {CONFIG_DIR}){hint}")


class _DuplicateKey(Exception):
    pass


def _json_object(pairs: List[tuple]) -> Dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise _DuplicateKey(dup)
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not last-one-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: only the last value would count: keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: Path) -> Dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                          "expected a JSON or YAML config saved as UTF-8") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except _DuplicateKey as e:
            key = e.args[0]
            lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
            raise ConfigError(f"{path}: duplicate key {key!r} (at lines {', '.join(map(str, lines))}); only the last "
                              "value would count: keep one") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple:
    """'a.b=value' -> (['a', 'b'], value); the value is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.iters=100")
    key, raw = text.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for i, k in enumerate(path[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _valid_keys(model_cls: type, loc: tuple) -> List[str]:
    """The keys valid at `loc` (the parent of the offending key) in the config tree."""
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        # Unwrap Optional[Section].
        args = getattr(ann, "__args__", ())
        cls = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _override_for(loc: tuple, message: str, overrides: Dict[tuple, str]) -> Optional[str]:
    """The `--set` an error at `loc` comes from: one setting that key or a key under it, or, for a
    check of a whole section, one whose key the message names."""
    for path, text in overrides.items():
        n = min(len(path), len(loc))
        if loc[:n] == path[:n] and (len(loc) >= len(path) or ".".join(path) in message):
            return text
    return None


def _is_leaf_field(loc: tuple) -> bool:
    """Whether `loc` names a value key (not a section) of the config tree."""
    return bool(loc) and loc[-1] in _valid_keys(Config, loc[:-1]) and not _valid_keys(Config, loc)


def _merge_union_errors(errors: List[dict]) -> List[dict]:
    """pydantic reports a value that fits no member of a union (`auto` | bool, `auto` | int >= 0, bool
    | 'qkv') once per member, each at the key plus the member's tag: one error at the key instead,
    naming every alternative ("should be 'auto' or a valid boolean")."""
    out: List[dict] = []
    merged: Dict[tuple, dict] = {}
    for e in errors:
        loc = tuple(str(x) for x in e["loc"])
        if len(loc) < 2 or loc[-1].isdigit() or not _is_leaf_field(loc[:-1]):
            out.append(e)
            continue
        what = e["msg"].removeprefix("Input should be ").split(", unable")[0]
        if loc[:-1] in merged:
            merged[loc[:-1]]["alternatives"].append(what)
            continue
        merged[loc[:-1]] = {"type": "union", "loc": loc[:-1], "input": e.get("input"), "alternatives": [what]}
        out.append(merged[loc[:-1]])
    return out


def _format_validation_error(err: ValidationError, source: str, overrides: Optional[Dict[tuple, str]] = None) -> str:
    lines, from_file = [], False
    for e in _merge_union_errors(err.errors()):
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Config, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(loc[:-1] + (close[0],))!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        elif e["type"] == "union":
            lines.append(f"{key}: should be {' or '.join(e['alternatives'])} (got {e['input']!r})")
        elif e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(msg if not loc else f"{key}: {msg}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        text = _override_for(loc, lines[-1], overrides or {})
        if text is not None:
            lines[-1] = f"--set {text}: {lines[-1]}"
        from_file = from_file or text is None
    head = source if from_file else "command line"
    return f"{head}: invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(data: Dict[str, Any], source: str = "<config>", overrides: Optional[List[str]] = None) -> Config:
    """Validate `data`; errors name `source`, or the `--set` (from `overrides`) that caused them."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        by_path = {tuple(parse_override(t)[0]): t for t in overrides or []}
        raise ConfigError(_format_validation_error(e, source, by_path)) from None


def load_config(path_or_name: Union[str, os.PathLike], overrides: Optional[List[str]] = None) -> Config:
    """Read, override and validate a config; every problem is a ConfigError naming the key."""
    path = resolve_config_path(path_or_name)
    data = apply_overrides(read_config_file(path), overrides or [])
    return config_from_dict(data, source=str(path), overrides=overrides)
