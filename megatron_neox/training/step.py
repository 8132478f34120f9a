"""One optimizer step (or one evaluation) over a global batch, for both engine kinds.

A micro-batch is a dict with tokens, labels, loss_mask, position_ids and, with
data.reset_attention_mask, doc_ids (see data/loader.py). The pipeline engine pulls micro-batches
from an iterator as ((tokens, position_ids[, doc_ids]), (labels, loss_mask)); the plain engine gets
one forward/backward per micro-batch.
The reported loss is the mean over micro-batches and data-parallel ranks, on every rank.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_neox.topology import Topology
from megatron_neox.training.clipping import GlobalNormClipper
from megatron_neox.training.schedules import StepPlan

MicroBatch = Dict[str, torch.Tensor]


@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    skipped: bool
    loss_scale: Optional[float]


def _stop_when_backward_ends(loss: torch.Tensor, timer) -> None:
    """`timer.stop()` once the backward pass of `loss` is done, before DeepSpeed's backward epilogue
    reduces the gradients across data-parallel ranks: an autograd callback queued when the
    backward reaches `loss` runs at the end of that backward (how torch's FSDP hooks the same point)."""
    def queue(grad):
        torch.autograd.Variable._execution_engine.queue_callback(timer.stop)

    if isinstance(timer, _NoTimer) or not loss.requires_grad:
        timer.stop()
    else:
        loss.register_hook(queue)


class _NoTimer:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _pipe_items(micro_batches: List[MicroBatch], objective=None):
    for mb in micro_batches:
        docs = (mb["doc_ids"],) if "doc_ids" in mb else ()
        labels = objective.labels(mb) if objective is not None else (mb["labels"], mb["loss_mask"])
        yield (mb["tokens"], mb["position_ids"], *docs), labels


def _forward(engine, mb: MicroBatch, objective=None) -> torch.Tensor:
    if objective is not None:  # train.objective sft / dpo (training/objectives.py): the loss sees the logits
        logits = engine(mb["tokens"], mb["position_ids"], doc_ids=mb.get("doc_ids"))
        return objective.loss(logits, objective.labels(mb))
    return engine(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"],
                  doc_ids=mb.get("doc_ids"))


def _to_device(mb: MicroBatch, device) -> MicroBatch:
    """The pipeline engine moves its inputs itself; the plain engine's forward does not.

    To a CUDA device the batch goes through page-locked host memory first: a non_blocking copy
    from pageable memory may synchronise the host (CUDA runtime docs, "API synchronization
    behavior"), one from pinned memory is queued and the host moves on to the next micro-batch."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
            for k, v in mb.items()}


def _dp_mean(value: torch.Tensor, topo: Topology) -> float:
    if topo.dp > 1:
        value = value.clone()
        dist.all_reduce(value, group=topo.dp_group)
        value /= topo.dp
    return float(value)


def _loss_scale(engine) -> Optional[float]:
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None and hasattr(opt, "loss_scaler"):
        scale = opt.loss_scaler.cur_scale
    return float(scale) if scale is not None else None


def train_step(engine, micro_batches: List[MicroBatch], topo: Topology,
               clipper: Optional[GlobalNormClipper] = None, plan: Optional[StepPlan] = None,
               timer=None, objective=None) -> StepResult:
    """One optimizer step, top to bottom:

    1. `plan` (schedules.py; None keeps the engine's settings) sets the learning rate and the
       global batch size of this step;
    2. forward + backward over all micro-batches (the pipeline engine runs its schedule);
    3. the gradients are clipped by their global norm: by `clipper` when `build_engine` returned
       one (fp32 without ZeRO: it runs as the optimizer's step pre-hook, see clipping.py, and
       drops non-finite gradients), else by DeepSpeed inside its optimizer;
    4. the optimizer step (DeepSpeed's, at the gradient-accumulation boundary) or a skip;
    5. the result: mean loss, the global gradient norm (the clipper's or DeepSpeed's), whether the
       step was skipped, the fp16 loss scale.

    `timer` (metrics.ComputeTimer) times this rank's own work: the forwards and backwards up to the
    data-parallel gradient reduction, where the ranks wait for each other (the whole pipeline
    schedule when pp > 1). `objective` (training/objectives.py, the one the engine was built with)
    is what the loss computes; None is the pretraining loss."""
    if plan is not None:
        plan.apply(engine)
    if engine.gradient_accumulation_steps() != len(micro_batches):
        raise ValueError(f"{len(micro_batches)} micro-batches for an engine set to accumulate "
                         f"{engine.gradient_accumulation_steps()}: pass the StepPlan of this batch size")
    timer = timer or _NoTimer()
    skipped_before = engine.skipped_steps
    clipper_skips = clipper.skipped if clipper is not None else 0
    timer.start()
    if topo.pp > 1:
        loss = engine.train_batch(data_iter=_pipe_items(micro_batches, objective))
        timer.stop()
        loss_value = float(loss)
    else:
        total = torch.zeros((), device=engine.device)
        for i, mb in enumerate(micro_batches):
            mb = _to_device(mb, engine.device)
            loss = _forward(engine, mb, objective)
            if i == len(micro_batches) - 1:
                _stop_when_backward_ends(loss, timer)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        loss_value = _dp_mean(total / len(micro_batches), topo)
    if clipper is not None:  # it ran inside the optimizer step above
        norm = clipper.last_norm
        skipped = clipper.skipped > clipper_skips
    else:
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        skipped = engine.skipped_steps > skipped_before
    return StepResult(loss=loss_value, grad_norm=norm, skipped=skipped, loss_scale=_loss_scale(engine))


@torch.no_grad()
def eval_step(engine, micro_batches: List[MicroBatch], topo: Topology, objective=None) -> float:
    """Mean loss over the micro-batches (and data-parallel ranks) without touching the weights."""
    if topo.pp > 1:
        loss = engine.eval_batch(data_iter=_pipe_items(micro_batches, objective), num_micro_batches=len(micro_batches))
        return float(loss)
    engine.eval()
    try:
        total = torch.zeros((), device=engine.device)
        for mb in micro_batches:
            mb = _to_device(mb, engine.device)
            total += _forward(engine, mb, objective).float()
    finally:
        engine.train()
    return _dp_mean(total / len(micro_batches), topo)
