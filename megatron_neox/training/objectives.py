"""What a step minimises (`train.objective`): next-token loss, SFT on answer tokens, or DPO.

Each objective turns a micro-batch into the label tuple the loss sees (the pipeline's last stage gets
exactly this tuple from the data iterator) and the loss into a scalar. The logits are vocab-parallel:
every per-token log-probability comes from `vocab_parallel_cross_entropy`, so any tensor-parallel
size gives the same numbers and only [B, T] vectors cross ranks.

- lm:  mean cross entropy over the micro-batch's loss_mask (pretraining; unchanged).
- sft: the sum of per-token losses times a weight the loader computed: loss_mask x (micro-batches
       x dp) / (trained tokens of the global batch). DeepSpeed averages micro-batches and
       data-parallel ranks, so the step's loss is the mean over every trained token of the global
       batch (per token, as TRL and Megatron-LM do: a long answer counts by its tokens, and the
       result does not depend on how the batch is split into micro-batches or ranks).
- dpo: the sigmoid loss of Rafailov et al. 2023 (eq. 7), mean over the pairs:
       -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), pi/ref = summed log-probabilities of
       the answer tokens under the policy / the frozen start model. Rows [0, B) of a micro-batch are
       the chosen answers of B pairs, rows [B, 2B) the rejected ones (TRL's layout).

DPO's statistics (rewards, accuracy, margin, log-probs) are recorded as sums by the loss on the ranks
that compute it (the last pipeline stage) and combined over the world once per step (`pop_stats`):
one all-reduce of 7 numbers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_neox.model.gpt_neox import lm_loss
from megatron_neox.parallel.cross_entropy import vocab_parallel_cross_entropy

DPO_STATS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin", "logps_chosen",
             "logps_rejected")


def sequence_logps(logits_parallel: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   tp_group=None) -> torch.Tensor:
    """[B] sum over masked positions of log p(label) (fp32 at least)."""
    token_logps = -vocab_parallel_cross_entropy(logits_parallel, labels, tp_group)
    return (token_logps * mask.to(token_logps.dtype)).sum(dim=-1)


def sft_loss(logits_parallel: torch.Tensor, labels: Tuple[torch.Tensor, torch.Tensor], tp_group=None) -> torch.Tensor:
    """Sum of per-token losses times the loader's weights (see the module docstring)."""
    targets, weights = labels
    losses = vocab_parallel_cross_entropy(logits_parallel, targets, tp_group)
    return (losses * weights.to(losses.dtype)).sum()


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(mean sigmoid DPO loss, per-pair statistics) of Rafailov et al. 2023, eq. 7.

    The implicit rewards are beta x (policy - reference) log-probabilities; a pair is "accurate"
    when the chosen reward is strictly above the rejected one (TRL's definition)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"rewards_chosen": chosen_rewards, "rewards_rejected": rejected_rewards,
             "rewards_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
             "rewards_margin": chosen_rewards - rejected_rewards,
             "logps_chosen": chosen_logps.detach(), "logps_rejected": rejected_logps.detach()}
    return losses.mean(), stats


class Objective:
    """The lm objective; the base of the others. `loss(logits, labels)` is the PipelineModule's loss_fn."""

    name = "lm"

    def __init__(self, tp_group=None, recording_ranks: bool = True):
        self.tp_group = tp_group
        # Only one rank per tensor-parallel group of the last stage records statistics (the
        # others compute the same numbers), so a sum over the world counts each pair once.
        self.recording_ranks = recording_ranks

    def labels(self, mb: Dict[str, torch.Tensor]) -> tuple:
        return mb["labels"], mb["loss_mask"]

    def loss(self, logits_parallel: torch.Tensor, labels: tuple) -> torch.Tensor:
        return lm_loss(logits_parallel, labels, self.tp_group)

    def pop_stats(self, group=None) -> Dict[str, float]:
        return {}

    def discard_stats(self) -> None:
        pass

    def swap_stats(self, sums):
        """Set the running sums (None: empty) and return the previous ones (evaluation keeps the
        training window's figures apart)."""
        return None


class SFTObjective(Objective):
    name = "sft"

    def loss(self, logits_parallel, labels):
        return sft_loss(logits_parallel, labels, self.tp_group)


class DPOObjective(Objective):
    """Micro-batches carry `ref_logps` [2B]; `record_logps` (the reference pass) keeps every row's
    policy log-probability instead of needing it."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, tp_group=None, recording_ranks: bool = True):
        super().__init__(tp_group, recording_ranks)
        self.beta = float(beta)
        self._sums: Optional[torch.Tensor] = None  # [pairs, *DPO_STATS]
        self.recorded: Optional[List[torch.Tensor]] = None  # reference pass: [2B] per micro-batch

    def labels(self, mb):
        return mb["labels"], mb["loss_mask"], mb["ref_logps"]

    def loss(self, logits_parallel, labels):
        targets, mask, ref = labels
        logps = sequence_logps(logits_parallel, targets, mask, self.tp_group)
        if self.recorded is not None:
            self.recorded.append(logps.detach().double())
        B = logps.shape[0] // 2
        ref = ref.to(logps.dtype)
        loss, stats = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], self.beta)
        if self.recording_ranks:
            sums = torch.stack([torch.tensor(float(B), dtype=torch.float64, device=logps.device)]
                               + [stats[k].double().sum() for k in DPO_STATS])
            self._sums = sums if self._sums is None else self._sums + sums
        return loss

    def discard_stats(self) -> None:
        self._sums = None

    def swap_stats(self, sums):
        old, self._sums = self._sums, sums
        return old

    def pop_stats(self, group=None) -> Dict[str, float]:
        """Means over every pair since the last call, combined over `group` (default: the world)."""
        sums, self._sums = self._sums, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            from deepspeed.accelerator import get_accelerator

            # Ranks that computed no loss contribute zeros; NCCL needs every rank's tensor on its device.
            device = get_accelerator().current_device_name()
            sums = torch.zeros(1 + len(DPO_STATS), dtype=torch.float64, device=device) if sums is None else sums.to(device)
            dist.all_reduce(sums, group=group)
        elif sums is None:
            return {}
        pairs = float(sums[0])
        return {k: float(v) / pairs for k, v in zip(DPO_STATS, sums[1:].tolist())} if pairs else {}


def build_objective(train_cfg, topo=None) -> Objective:
    """The objective of `train.objective` for this rank."""
    tp_group = topo.tp_group if topo is not None else None
    records = topo is None or (topo.is_last_stage and topo.tp_rank == 0)
    if train_cfg.objective == "sft":
        return SFTObjective(tp_group, records)
    if train_cfg.objective == "dpo":
        return DPOObjective(train_cfg.dpo_beta, tp_group, records)
    return Objective(tp_group, records)
