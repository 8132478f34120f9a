"""Plan a run before launching it: layout, parameter counts, pipeline partition, memory per rank.

Everything here is analytic (no model is built), so planning GPT-3 175B takes a second:

* parameters come from `count_parameters` (exact) and a per-rank version of the same sums;
* the pipeline partition is computed by DeepSpeed's own `partition_uniform` / `partition_balanced`
  on our real layer list, exactly as `PipelineModule._partition_layers` would on each rank;
* memory per rank is `estimate_memory(cfg, layout)`, a dict of byte counts per component, so a
  benchmark can compare it with what a run measures.

Memory model (bytes per parameter held by the rank; P = parameters on this rank, dp = data-parallel
size). The textbook numbers are the ZeRO paper's (Rajbhandari et al. 2020, sec. 3.1 and 5: mixed
precision Adam keeps 2 bytes of fp16 weights, 2 of fp16 gradients and K = 12 of optimizer state --
fp32 master weights, momentum, variance; stage 1 partitions the K bytes over dp, stage 2 also the
gradients, stage 3 also the weights). Where DeepSpeed 0.19.8 differs we follow its code, because
that is what a run measures:

* fp32 with ZeRO >= 1 still keeps a flat fp32 copy of the rank's partition
  (`stage_1_and_2.py`, `single_partition_of_fp32_groups`): optimizer = (4 + 8) / dp, not 8 / dp.
* bf16 + ZeRO 0/1 with fp32 gradient accumulation (what training/engine.py `deepspeed_config` emits) runs
  `BF16_Optimizer`: a full fp32 gradient accumulator (4 bytes) next to the bf16 .grad (2 bytes).
* ZeRO 1/2 with `contiguous_gradients` allocate the whole reduce bucket of `reduce_bucket_size`
  elements every step, however few gradients fill it (`stage_1_and_2.py` `setup_buckets`; a second
  one with `overlap_comm`) and, under a pipeline, one more in `reduce_gradients(pipeline_parallel=
  True)`: reduce_bucket_size * grad bytes * (1 + overlap_comm + (pp > 1)). Measured by
  benchmarks/memory_estimate.py (buckets of exactly reduce_bucket_size elements, fp32: 500M x 4 B
  = 1907 MiB each).
* ZeRO-0 (and BF16_Optimizer) at dp > 1 all-reduce through `buffered_allreduce_fallback`, which
  flattens the gradients into a temporary of up to 500M elements (`MEMORY_OPT_ALLREDUCE_SIZE`);
  it exists after the backward pass, so the total counts max(activations, temporary). At dp = 1
  `build_engine` turns that all-reduce off: no temporary.
* The last pipeline stage keeps its stage output -- the logits, s*b*V/t * e bytes -- in
  `pipe_buffers['outputs']` between steps (`pipe/engine.py` `_exec_backward_pass` returns early on
  the last stage without clearing it): one per pipe buffer used, min(grad_accum, 2) (the last
  stage has `TrainSchedule.num_pipe_buffers()` = max(2, 1) buffers).
* The fp32 gradient partition made at `step()` is not counted: activations are freed by then, so
  it never adds to the backward-pass peak we report.

Activations per transformer layer are an itemised count of the tensors autograd saves in *our*
layer (the method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", sec. 4, applied to this implementation). With N = s*b*h elements, t = tp and
e = bytes per element (2 for fp16/bf16, 4 for fp32):

    norms      parallel residual: x, ln1(x), ln2(x) = 3N; shared norm (GPT-J) 2N; sequential
               (GPT-3) adds the mid-layer residual: 4N. LayerNorm adds fp32 mean and rstd per
               token; our RMSNorm keeps x/rms(x) and, in half precision, an fp32 copy of x.
               Divided by t with sequence parallelism.
    attention  fused QKV output 3N/t (SDPA keeps views of it) and the SDPA output N/t, plus a
               fp32 log-sum-exp (a*s*b/t); the dense layer reads the SDPA output in place (no
               copy). Rotary adds the rotated q and k (2N/t) and the half-width cos/sin (s*b*r:
               model/rotary.py keeps r/2 angles a position). Local (banded)
               layers keep their [s, s] mask. ALiBi's per-head mask sends SDPA down PyTorch's math
               path: fp32 q, k, v and softmax probabilities, 12N/t + 4*a*s*s*b/t bytes (on CUDA the
               memory-efficient kernel would keep the [a, s, s] mask instead).
    MLP        GELU: input and output of the activation, 2 * ffn*s*b/t; SwiGLU: 4 * ffn*s*b/t.
    dropout    one mask of N per dropout site when hidden_dropout > 0 (a float mask on CPU).

For a sequential GPT layer this is 4N + 12N/t elements. Korthikanti et al. count the same tensors
for that layer, s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes in half precision (s*b*h/t*(34 + 5*a*s/h)
with sequence parallelism); removing the two hidden dropout masks (2sbh bytes) and the s^2 terms
(5*a*s*s*b/t bytes: softmax output, its dropout mask and output), which flash attention does not
keep, leaves exactly 4N + 12N/t elements (flash's saved output is the projection input they
already count). The itemised count is checked against autograd's saved tensors in tests/test_plan.py (fp32 exact,
bf16 within 0.2%). Full recomputation (activation checkpointing every n layers) keeps only each
block's input (N, or N/t with partition_activations) plus one block's working set during its
backward. Under 1F1B pipeline stage k holds min(pp - k, grad_accum) micro-batches in flight
(DeepSpeed `TrainSchedule.num_pipe_buffers`); a non-last stage also keeps each in-flight output.
The last stage adds the final norm and the loss: the cross entropy (parallel/cross_entropy.py)
keeps the e-byte logits s*b*V/t * e and 17 bytes a token (fp32 max and sum of exponentials, the
int64 local target and a bool), and at its peak the logits' e-byte gradient plus its fp32 chunk
temporaries (at most 2^25 logits each; never an fp32 copy of all the logits). With checkpointing, the stage holding the head peaks at its kept block inputs
plus the larger of the loss (forward) and one recomputed block with its output gradient
(backward): the loss's tensors are freed before the first block is recomputed.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_neox.config import Config, ModelConfig, config_from_dict
from megatron_neox.layout import Layout
from megatron_neox.parallel.cross_entropy import _CHUNK_ELEMENTS
from megatron_neox.parallel.sharding import kv_heads_sharded
from megatron_neox.errors import ConfigError
from megatron_neox.model.gpt_neox import count_parameters, layer_specs
from megatron_neox.resolve import Decision, resolve

GiB = 1 << 30
# Tensor parallelism all-reduces inside every layer: keep it within one node (NVLink), 8 GPUs.
MAX_TP = 8


# ---- parameters ---------------------------------------------------------------------------------


def layer_names(model: ModelConfig, padded_vocab: int) -> List[str]:
    """Class names of the layer list as DeepSpeed sees them (what 'type:REGEX' matches)."""
    return [spec.typename.__name__ for spec in layer_specs(model, padded_vocab)]


def layer_params_per_rank(model: ModelConfig, tp: int) -> List[int]:
    """Parameters of each entry of the layer list on one tensor-parallel rank.

    This is what DeepSpeed's `_count_layer_params` measures for partition_method='parameters':
    it builds every layer on the rank, so column-parallel weights and biases and vocab shards
    count 1/tp, while norms and row-parallel biases (replicated) count in full. A tied head is a
    second copy of the embedding (`TiedLayerSpec` builds the whole embedding module).
    """
    full = count_parameters(model, tp)  # unsharded counts, vocab padded for this tp
    d = model.hidden_size
    norm = full["final_norm"]
    # Replicated on every TP rank: the layer's norms and the row-parallel (output) biases, and
    # learned position embeddings. Everything else is split evenly.
    layer_rep = (1 if model.shared_norm else 2) * norm + d * model.attention_out_bias + d * model.mlp_bias
    if not kv_heads_sharded(model.kv_heads, tp):  # tp > KV heads: every rank holds all of them
        kv = 2 * model.kv_heads * model.head_dim
        layer_rep += kv * (d + model.qkv_bias)
    pos = model.seq_length * d if model.position_embedding == "learned" else 0
    layer = (full["layer"] - layer_rep) // tp + layer_rep
    embedding = (full["embedding"] - pos) // tp + pos
    head = embedding if model.tie_embeddings else full["head"] // tp
    return [embedding] + [layer] * model.num_layers + [norm, head]


def partition(cfg: Config) -> List[int]:
    """Stage boundaries over the layer list, computed like `PipelineModule._partition_layers`."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime import utils as ds_utils

    m, p = cfg.model, cfg.parallel
    padded = m.padded_vocab(p.tp)
    specs = layer_specs(m, padded)
    method = p.partition_method.lower()
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(specs), num_parts=p.pp)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(weights=layer_params_per_rank(m, p.tp), num_parts=p.pp)
    else:  # 'type:REGEX'
        pattern = method.split(":")[1]  # as DeepSpeed splits it
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"parallel.partition_method={p.partition_method!r}: invalid regular expression: "
                              f"{e}") from None
        try:
            idxs = PipelineModule._find_layer_type(SimpleNamespace(_layer_specs=specs), pattern)
        except RuntimeError as e:
            names = sorted(set(layer_names(m, padded)))
            raise ConfigError(f"parallel.partition_method={p.partition_method!r}: {e} "
                              f"(layer classes: {', '.join(names)})") from None
        weights = [0] * len(specs)
        for i in idxs:
            weights[i] = 1
        parts = ds_utils.partition_balanced(weights=weights, num_parts=p.pp)
    return [int(x) for x in parts]  # DeepSpeed returns numpy ints


# ---- memory -------------------------------------------------------------------------------------


def _state_bytes_per_param(cfg: Config, dp: int) -> Dict[str, float]:
    """Bytes per parameter of weights, gradients and optimizer state on one rank (see module doc)."""
    zero, prec = cfg.zero.stage, cfg.precision
    w = 4 if prec == "fp32" else 2
    weights = w / dp if zero >= 3 else w
    if prec == "bf16" and zero <= 1:
        grads = 2 + 4  # bf16 .grad plus BF16_Optimizer's fp32 accumulator, both unsharded
    elif prec == "bf16":
        grads = 4 / dp  # fp32-accumulated partition
    elif prec == "fp16" and zero == 0:
        grads = 2 + 4  # FP16_Optimizer also keeps fp32 copies of the gradients
    else:
        grads = w / dp if zero >= 2 else w
    if zero == 0:
        optimizer = 8 if prec == "fp32" else 4 + 8  # Adam m, v (+ fp32 master weights)
    else:
        optimizer = (4 + 8) / dp  # fp32 master partition + Adam m, v, sharded by ZeRO
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def _norm_bytes(model: ModelConfig, tokens: int, e: int, input_counted: bool) -> float:
    """Bytes one norm saves over its input and internals (its output is counted by its consumer)."""
    h = model.hidden_size
    if model.norm == "layernorm":
        return (0 if input_counted else tokens * h * e) + 8 * tokens  # input, fp32 mean and rstd
    # Our RMSNorm computes in fp32: it keeps x.float() (a copy in half precision), x/rms(x) in the
    # input dtype and the fp32 rsqrt per token.
    x = 0 if (input_counted and e == 4) else tokens * h * 4
    return x + tokens * h * e + 4 * tokens


def layer_activation_bytes(model: ModelConfig, micro_batch: int, tp: int, precision: str,
                           sequence_parallel: bool = False, layer_index: int = 0) -> float:
    """Bytes autograd saves in one transformer layer for one micro-batch (itemised in module doc)."""
    e = 4 if precision == "fp32" else 2
    s, b, h, a, t = model.seq_length, micro_batch, model.hidden_size, model.num_attention_heads, tp
    tokens = s * b
    N = tokens * h
    sp = t if (sequence_parallel and t > 1) else 1
    # Norm region (replicated across TP unless sequence parallel).
    norms = _norm_bytes(model, tokens, e, input_counted=False)  # ln1 over x, x counted here
    outs = 1  # ln1(x)
    if model.parallel_residual:
        if not model.shared_norm:
            norms += _norm_bytes(model, tokens, e, input_counted=True)  # ln2 over the same x
            outs += 1  # ln2(x)
    else:
        norms += _norm_bytes(model, tokens, e, input_counted=False)  # ln2 over x + attn
        outs += 1
    norm_region = (norms + outs * N * e) / sp
    # Attention.
    local = model.attention_pattern == "alternating_local" and layer_index % 2 == 1
    qkv = model.qkv_size / h  # 3 for multi-head attention; fewer KV heads (GQA) shrink it
    attn = qkv * N * e / t + 4 * a * tokens / t  # QKV output (SDPA keeps views of it), fp32 log-sum-exp
    attn += N * e / t  # SDPA output
    if model.position_embedding == "rotary":
        r = model.rotary_ndims
        # Rotated q and k are new tensors; r/2 cos and r/2 sin angles per position. The dense
        # layer reads the SDPA output as a view (no copy).
        attn += 2 * N * e / t + tokens * r * e
    # The additive mask (model/attention.py: [1, heads/t, s, s] with ALiBi, [1, 1, s, s] for a banded
    # layer) is built once per forward and shared by every layer of the rank; each layer's SDPA
    # saves a reference to it, counted here per layer (an overestimate by the layers that share it).
    if model.position_embedding == "alibi":
        attn += a * s * s * e / t
    elif local:
        attn += s * s * e
    # MLP.
    ffn = model.ffn_size * tokens
    mlp = (4 if model.activation == "swiglu" else 2) * ffn * e / t
    dropout = 0.0
    if model.hidden_dropout > 0:
        dropout = (1 if model.parallel_residual else 2) * N * e
    return norm_region + attn + mlp + dropout


def head_activation_bytes(model: ModelConfig, micro_batch: int, tp: int, precision: str,
                          padded_vocab: int, peak: bool = True) -> float:
    """Final norm and loss of the last stage for one micro-batch.

    Autograd keeps the final norm's input and output, the e-byte logits (s*b*V/t * e; the cross
    entropy saves them instead of a softmax) and 17 bytes a token of loss statistics (fp32 max and
    sum of exponentials, int64 target, bool), counted with the target ids and mask. With `peak`
    the backward's transients are added: the logits' e-byte gradient and two fp32 chunk
    temporaries of at most `_CHUNK_ELEMENTS` logits (parallel/cross_entropy.py).
    """
    e = 4 if precision == "fp32" else 2
    tokens = model.seq_length * micro_batch
    final_norm = _norm_bytes(model, tokens, e, input_counted=False) + tokens * model.hidden_size * e
    logits = tokens * padded_vocab / tp
    saved = logits * e + 17 * tokens
    if not peak:
        return final_norm + saved
    return final_norm + saved + logits * e + 2 * 4 * min(_CHUNK_ELEMENTS, logits)


def in_flight_microbatches(pp: int, stage: int, grad_accum: int) -> int:
    """Micro-batches whose activations a stage holds at once under DeepSpeed's 1F1B schedule."""
    return 1 if pp == 1 else max(1, min(pp - stage, grad_accum))


@dataclass
class StagePlan:
    stage: int
    start: int  # first index in the layer list
    stop: int  # one past the last
    names: List[str]
    params_per_rank: int
    memory: Dict[str, float] = field(default_factory=dict)

    @property
    def transformer_layers(self) -> int:
        return sum(1 for n in self.names if "Transformer" in n)


def _stage_layers(cfg: Config, parts: Sequence[int], stage: int) -> Tuple[int, int, List[str], int]:
    m, p = cfg.model, cfg.parallel
    padded = m.padded_vocab(p.tp)
    names = layer_names(m, padded)
    counts = layer_params_per_rank(m, p.tp)
    if p.pp == 1 and m.tie_embeddings:
        counts[-1] = 0  # one module holds the shared weight once
    start, stop = parts[stage], parts[stage + 1]
    return start, stop, names[start:stop], sum(counts[start:stop])


def estimate_memory(cfg: Config, layout: Layout, stage: int = 0, parts: Optional[Sequence[int]] = None,
                    checkpoint_interval: Optional[int] = None) -> Dict[str, float]:
    """Bytes per rank of pipeline stage `stage`, by component (see the module docstring).

    Keys: params (count), weights, gradients, optimizer, optimizer_cpu (ZeRO-Offload),
    buffers (ZeRO reduce buckets, the ZeRO-0 all-reduce temporary at dp > 1, the logits the last
    pipeline stage keeps between steps), activations_per_microbatch (no recomputation),
    activations_per_microbatch_checkpointed (full recomputation every `interval` layers, 1 when
    the config has none), in_flight_microbatches, activations (peak under the config's setting or
    `checkpoint_interval`; 0 means off) and total (what the rank needs on the device: the
    all-reduce temporary, allocated after the backward pass, counts only where it exceeds the
    activations).
    """
    cfg = resolve(cfg, layout.world_size)
    m = cfg.model
    if parts is None:
        parts = partition(cfg) if layout.pp > 1 else [0, m.num_layers + 3]
    start, stop, names, P = _stage_layers(cfg, parts, stage)
    per = _state_bytes_per_param(cfg, layout.dp)
    out: Dict[str, float] = {"params": P}
    for k, v in per.items():
        out[k] = P * v
    out["optimizer_cpu"] = 0.0
    if cfg.zero.offload_optimizer == "cpu" and cfg.zero.stage >= 1:
        out["optimizer_cpu"], out["optimizer"] = out["optimizer"], 0.0
    z = cfg.zero
    e = 4 if cfg.precision == "fp32" else 2
    grad_e = e  # reduce buckets and the all-reduce temporary hold model-dtype gradients
    bf16_optimizer = cfg.precision == "bf16" and z.stage <= 1
    buckets = 0.0  # allocated at the first backward hook: alive with the activations
    reduce_temp = 0.0  # allocated after the backward pass: never alive with the activations
    if z.stage in (1, 2) and z.contiguous_gradients and not bf16_optimizer:
        # The whole bucket every step (setup_buckets), twice with overlap_comm, plus the one
        # reduce_gradients(pipeline_parallel=True) appends under a pipeline (see module doc).
        buckets = z.reduce_bucket_size * grad_e * ((2 if z.overlap_comm else 1) + (1 if layout.pp > 1 else 0))
    elif (z.stage == 0 or bf16_optimizer) and layout.dp > 1:
        # buffered_allreduce_fallback flattens the gradients into buckets of up to 500M elements
        # (MEMORY_OPT_ALLREDUCE_SIZE); build_engine disables it at dp = 1.
        reduce_temp = min(P, 500_000_000) * grad_e

    # Activations of this stage for one micro-batch.
    b, t, prec, sp = layout.micro_batch_size, layout.tp, cfg.precision, cfg.parallel.sequence_parallel
    layer_idx = [i - 1 for i in range(start, stop) if 1 <= i <= m.num_layers]  # transformer layers here
    per_layer = [layer_activation_bytes(m, b, t, prec, sp, li) for li in layer_idx]
    tokens = m.seq_length * b
    N = tokens * m.hidden_size
    last = stop == m.num_layers + 3
    head = head_activation_bytes(m, b, t, prec, layout.padded_vocab) if last else 0.0
    # A non-last stage also keeps its output tensor in DeepSpeed's pipe buffers until backward.
    pipe_out = N * e if (layout.pp > 1 and not last) else 0.0
    # The last stage of a pipeline keeps its outputs (the logits) between steps, one per pipe
    # buffer used: min(grad_accum, num_pipe_buffers = max(2, 1)) (see module doc).
    kept_logits = min(layout.grad_accum, 2) * tokens * layout.padded_vocab / t * e if (layout.pp > 1 and last) else 0.0
    out["buffers"] = buckets + reduce_temp + kept_logits
    full = sum(per_layer) + head + pipe_out

    interval = cfg.activation_checkpointing.interval if checkpoint_interval is None else checkpoint_interval
    if interval == "auto":
        raise ValueError("estimate_memory needs a number: resolve(cfg, world, extra=(decide_checkpoint_interval,)) "
                         "first, or pass checkpoint_interval")
    n = interval or 1
    block_input = N * e / (t if cfg.activation_checkpointing.partition_activations else 1)
    blocks = [per_layer[i:i + n] for i in range(0, len(per_layer), n)]
    kept = len(blocks) * block_input + pipe_out  # per micro-batch in flight
    working = max((sum(blk) for blk in blocks), default=0.0)
    flight = in_flight_microbatches(layout.pp, stage, layout.grad_accum)
    if last:
        # The loss's softmax and logits are freed before the first block is recomputed, so the
        # head and a recomputed block (+ the gradient of its output, N*e) do not coexist.
        ckpt = kept + max(head, working + N * e)
        ckpt_peak = flight * kept + max(head, working + N * e)
    else:
        ckpt = kept + working
        ckpt_peak = flight * kept + working  # only one block is recomputed at a time

    out["activations_per_microbatch"] = full
    out["activations_per_microbatch_checkpointed"] = ckpt
    out["in_flight_microbatches"] = flight
    out["activations"] = ckpt_peak if interval else flight * full
    # The all-reduce temporary comes after the activations are freed: the peak is the larger.
    out["total"] = (out["weights"] + out["gradients"] + out["optimizer"] + buckets + kept_logits
                    + max(out["activations"], reduce_temp))
    return out


# ---- activation checkpointing: 'auto' -------------------------------------------------------------

# What the estimate leaves out (the CUDA context, cuBLAS/cuDNN workspaces, the caching allocator's
# fragmentation) is kept free: 10% of the device. Against torch's peak allocated memory on an H200
# (DESIGN.md, Pythia-1B micro 8 bf16) the estimate is 4-7% high: 44.7 GiB estimated vs 42.8 measured
# without recompute, 27.7 vs 25.8 with it every layer.
RECOMPUTE_MARGIN = 0.10
# Cards `tools/plan.py` reports the 'auto' choice for (GiB torch can address: an 80 GB A100/H100
# reports ~79-80 GiB; a 141 GB H200 ~139 GiB, docs of the H200 machine this project measures on).
REFERENCE_CARDS: Tuple[Tuple[str, float], ...] = (("80 GB card", 79.0), ("141 GB card", 139.0))


@dataclass(frozen=True)
class CheckpointChoice:
    interval: int  # 0 = no recompute
    why: str  # for the start-up line


def _peak_total(cfg: Config, layout: Layout, parts: Sequence[int], interval: int) -> float:
    return max(estimate_memory(cfg, layout, s, parts, checkpoint_interval=interval)["total"]
               for s in range(layout.pp))


def choose_checkpoint_interval(cfg: Config, layout: Layout, device_bytes: float) -> CheckpointChoice:
    """What activation_checkpointing.interval runs: the config's number, or for 'auto' the planner's
    decision on a device of `device_bytes`.

    No recompute when the busiest stage's estimate fits in (1 - RECOMPUTE_MARGIN) of the device.
    Otherwise every interval recomputes each layer's forward once (the cost is the same), so the
    interval with the smallest estimated peak is taken (kept block inputs vs one block's working
    set; usually 1). Every rank computes the same answer from the same estimate.
    """
    ac = cfg.activation_checkpointing
    if ac.interval != "auto":
        return CheckpointChoice(int(ac.interval), "set")
    cfg = resolve(cfg, layout.world_size)
    m = cfg.model
    parts = partition(cfg) if layout.pp > 1 else [0, m.num_layers + 3]
    budget = (1 - RECOMPUTE_MARGIN) * device_bytes
    card = f"{(1 - RECOMPUTE_MARGIN):.0%} of {device_bytes / GiB:.1f} GiB"
    without = _peak_total(cfg, layout, parts, 0)
    if without <= budget:
        return CheckpointChoice(0, f"auto: {without / GiB:.1f} GiB estimated without recompute fits {card}")
    most = max(sum(1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= m.num_layers) for s in range(layout.pp))
    peaks = {k: _peak_total(cfg, layout, parts, k) for k in range(1, max(1, most) + 1)}
    k = min(peaks, key=lambda i: (peaks[i], i))
    verdict = "" if peaks[k] <= budget else " -- still more than that: see tools/plan.py for a layout that fits"
    return CheckpointChoice(k, f"auto: {without / GiB:.1f} GiB estimated without recompute exceeds {card}; "
                               f"recompute every {k} layer(s): {peaks[k] / GiB:.1f} GiB{verdict}")


def decide_checkpoint_interval(cfg: Config, layout: Layout, device_bytes: Optional[float] = None
                               ) -> List[Decision]:
    """resolve's decision for activation_checkpointing.interval 'auto' (an `extra` decision: it needs
    the planner) on a device of `device_bytes` (default this one's, `hardware.device_memory_bytes`)."""
    if cfg.activation_checkpointing.interval != "auto":
        return []
    if device_bytes is None:
        from megatron_neox.hardware import device_memory_bytes

        device_bytes = device_memory_bytes()
    choice = choose_checkpoint_interval(cfg, layout, device_bytes)
    return [Decision("activation_checkpointing.interval", choice.interval, choice.why)]


def recompute_of(cfg: Config) -> CheckpointChoice:
    """The interval a resolved config runs, and why ("set", or the planner's reason for 'auto')."""
    return CheckpointChoice(int(cfg.activation_checkpointing.interval),
                            cfg.resolved.why("activation_checkpointing.interval"))


# ---- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: Config
    layout: Optional[Layout]
    problem: Optional[str]  # why the layout does not fit, or None
    parameters: Dict[str, int]
    stages: List[StagePlan]
    gpu_memory_bytes: float
    recompute: Optional[CheckpointChoice] = None  # activation_checkpointing.interval and why

    @property
    def peak(self) -> Optional[StagePlan]:
        return max(self.stages, key=lambda s: s.memory.get("total", 0.0)) if self.stages else None

    @property
    def fits(self) -> bool:
        return self.problem is None


def make_plan(cfg: Config, world_size: Optional[int] = None, gpu_memory_gb: float = 80.0) -> Plan:
    """Layout on `world_size` ranks (default pp*tp, i.e. dp=1), partition and memory per stage."""
    p = cfg.parallel
    world = world_size if world_size is not None else p.pp * p.tp
    params = count_parameters(cfg.model, p.tp)
    gpu_bytes = gpu_memory_gb * GiB
    try:
        layout = cfg.layout(world)
    except ConfigError as e:
        return Plan(cfg, None, str(e), params, [], gpu_bytes)
    # every 'auto' -> what this world runs; the recompute interval on this card
    cfg = resolve(cfg, world, extra=(lambda c, lay: decide_checkpoint_interval(c, lay, gpu_bytes),))
    recompute = recompute_of(cfg)
    parts = partition(cfg) if p.pp > 1 else [0, cfg.model.num_layers + 3]
    stages = []
    for s in range(p.pp):
        start, stop, names, P = _stage_layers(cfg, parts, s)
        stages.append(StagePlan(s, start, stop, names, P, estimate_memory(cfg, layout, s, parts)))
    problem = None
    peak = max(stages, key=lambda st: st.memory["total"])
    if peak.memory["total"] > gpu_bytes:
        problem = (f"stage {peak.stage} needs {peak.memory['total'] / GiB:.1f} GiB per GPU, more than "
                   f"--gpu-memory-gb {gpu_memory_gb:g}")
    return Plan(cfg, layout, problem, params, stages, gpu_bytes, recompute)


def _with_parallel(cfg: Config, pp: int, tp: int) -> Config:
    data = copy.deepcopy(cfg.to_dict())
    data["parallel"].update(pp=pp, tp=tp)
    return config_from_dict(data)


def candidate_layouts(cfg: Config, gpus: int, gpu_memory_gb: float = 80.0) -> List[Plan]:
    """Every (pp, tp) that runs this config on `gpus` GPUs and fits, fewest model-parallel ranks first.

    Rule: tp is a power of two up to 8 (one node), pp divides gpus/tp and is at most the number of
    layers; the config's own checks (heads, MLP width and padded vocab divisible by tp, ZeRO <= 1
    with pp > 1) and the batch identity (global batch divisible by micro * dp) must hold.
    """
    plans = []
    tp = 1
    while tp <= min(MAX_TP, gpus):
        if gpus % tp == 0:
            for pp in range(1, min(gpus // tp, cfg.model.num_layers) + 1):
                if (gpus // tp) % pp:
                    continue
                try:
                    c = _with_parallel(cfg, pp, tp)
                except ConfigError:
                    continue
                plan = make_plan(c, gpus, gpu_memory_gb)
                if plan.fits:
                    plans.append(plan)
        tp *= 2
    plans.sort(key=lambda pl: (pl.cfg.parallel.pp * pl.cfg.parallel.tp, pl.cfg.parallel.tp))
    return plans


# ---- text ---------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _describe_stage(st: StagePlan, num_layers: int) -> str:
    kinds = []
    n_tf = st.transformer_layers
    if st.start == 0:
        kinds.append("embedding")
    if n_tf:
        first = max(st.start, 1) - 1
        kinds.append(f"{n_tf} transformer (layers {first}-{first + n_tf - 1})")
    if st.start <= num_layers + 1 < st.stop:
        kinds.append("final norm")
    if st.stop == num_layers + 3:
        kinds.append("head")
    return " + ".join(kinds) if kinds else "nothing"


def format_plan(plan: Plan) -> str:
    cfg, m, p = plan.cfg, plan.cfg.model, plan.cfg.parallel
    lines = []
    pr = plan.parameters
    if plan.layout is None:
        lines.append(f"layout: pp={p.pp} tp={p.tp}: DOES NOT FIT: {plan.problem}")
    else:
        lay = plan.layout
        tokens = lay.global_batch_size * m.seq_length
        lines.append(
            f"layout: pp={lay.pp} tp={lay.tp} dp={lay.dp} ({lay.world_size} ranks), "
            f"micro_batch={lay.micro_batch_size} grad_accum={lay.grad_accum} "
            f"global_batch={lay.global_batch_size} sequences ({tokens:,} tokens), padded_vocab={lay.padded_vocab}"
        )
    lines.append(f"parameters: {pr['total']}")
    lines.append(
        f"  embedding {pr['embedding']:,} + {m.num_layers} layers x {pr['layer']:,} + final norm "
        f"{pr['final_norm']:,} + head {pr['head']:,}" + (" (tied)" if m.tie_embeddings else "")
    )
    if plan.layout is None:
        return "\n".join(lines)
    lines.append(f"pipeline: {p.pp} stage(s), partition_method {p.partition_method!r} (DeepSpeed)")
    for st in plan.stages:
        lines.append(f"  stage {st.stage}: layers {st.start}-{st.stop - 1}: {_describe_stage(st, m.num_layers)}; "
                     f"{st.params_per_rank:,} parameters per rank")
    ac = cfg.activation_checkpointing
    ckpt = f"checkpointing every {ac.interval} layer(s)" if ac.interval else "no activation checkpointing"
    if ac.interval and ac.partition_activations:
        ckpt += ", partitioned over tp"
    if plan.recompute is not None and plan.recompute.why != "set":
        ckpt += f" ({plan.recompute.why})"
    offload = ", optimizer offloaded to CPU" if cfg.zero.offload_optimizer == "cpu" else ""
    lines.append(f"memory per rank (GiB; {cfg.precision}, ZeRO-{cfg.zero.stage} over dp={plan.layout.dp}{offload}, "
                 f"{ckpt}):")
    lines.append("  stage  weights  grads  optim  buffers  act/mb(full)  act/mb(ckpt)  in-flight  activations  total")
    for st in plan.stages:
        mm = st.memory
        lines.append(
            f"  {st.stage:>5}  {_gib(mm['weights']):>7}  {_gib(mm['gradients']):>5}  {_gib(mm['optimizer']):>5}  "
            f"{_gib(mm['buffers']):>7}  {_gib(mm['activations_per_microbatch']):>12}  "
            f"{_gib(mm['activations_per_microbatch_checkpointed']):>12}  {mm['in_flight_microbatches']:>9}  "
            f"{_gib(mm['activations']):>11}  {_gib(mm['total']):>5}"
        )
    peak = plan.peak
    verdict = "fits" if plan.fits else f"DOES NOT FIT: {plan.problem}"
    lines.append(f"peak: stage {peak.stage}, {_gib(peak.memory['total'])} of {_gib(plan.gpu_memory_bytes)} GiB: "
                 f"{verdict}")
    return "\n".join(lines)


def format_auto_recompute(cfg: Config, world_size: Optional[int] = None,
                           cards: Sequence[Tuple[str, float]] = REFERENCE_CARDS) -> Optional[str]:
    """What activation_checkpointing.interval 'auto' would choose for this layout on each reference
    card (for the shipped configs' comments), or None when the layout is invalid."""
    world = world_size if world_size is not None else cfg.parallel.pp * cfg.parallel.tp
    try:
        layout = cfg.layout(world)
    except ConfigError:
        return None
    auto = cfg.model_copy(update={"activation_checkpointing": cfg.activation_checkpointing.model_copy(
        update={"interval": "auto"})})
    parts = []
    for name, gib in cards:
        c = choose_checkpoint_interval(auto, layout, gib * GiB)
        parts.append(f"{name} ({gib:g} GiB): " + (f"every {c.interval} layer(s)" if c.interval else "none"))
    return "activation_checkpointing.interval 'auto' would recompute: " + "; ".join(parts)


def format_candidates(plans: List[Plan], gpus: int, gpu_memory_gb: float, limit: int = 12) -> str:
    if not plans:
        return f"no (pp, tp) layout of {gpus} GPUs fits this config in {gpu_memory_gb:g} GiB"
    lines = [f"layouts of {gpus} GPUs that fit in {gpu_memory_gb:g} GiB (tp <= {MAX_TP} within a node; "
             "pp divides gpus/tp; fewest model-parallel ranks first):",
             "     pp  tp  dp  grad_accum  peak GiB"]
    for pl in plans[:limit]:
        lay = pl.layout
        lines.append(f"  {lay.pp:>5} {lay.tp:>3} {lay.dp:>3} {lay.grad_accum:>11}  {_gib(pl.peak.memory['total']):>8}")
    if len(plans) > limit:
        lines.append(f"  ... and {len(plans) - limit} more with more model-parallel ranks")
    return "\n".join(lines)


