"""Throughput, FLOPs, MFU and the log sinks (stdout, metrics.jsonl, TensorBoard, wandb).

FLOPs per token (forward + backward, no recompute), the PaLM paper's model-FLOPs count
(Chowdhery et al. 2022, appendix B):

    model_flops_per_token = 6 * P_matmul + 12 * L * d * s

P_matmul is every weight that takes part in a matmul (QKV, attention output, both MLP matrices,
and the output head; the input embedding is a lookup), L layers, d the width, s the sequence
length (the 12*L*d*s term is attention's QK^T and AV, counted over the full s x s square as the
paper does). Activation recompute runs the checkpointed layers' forward once more:

    hardware_flops_per_token = model_flops_per_token + (2 * P_layers + 4 * L * d * s)   (when on)

`tflops_per_rank` reports the hardware FLOPs (work the ranks really did); `mfu` divides the model
FLOPs by the peak, so recompute does not inflate it.

Where the time goes, per rank: each rank times its own forward+backward work of every step
(`ComputeTimer`: CUDA events on a GPU, read once per log interval, so no step waits for the device)
and its wait for the data loader. At each log one all-reduce of two numbers per rank brings them to
rank 0, which logs the slowest rank's compute time per step and its rank id (`slowest_rank_s`,
`slowest_rank`), the fastest rank's (`fastest_rank_s`), and the longest data-loading wait per step
(`data_wait_s`). The compute time stops before the data-parallel gradient reduction, where ranks
wait for each other, so a straggler shows as the slowest rank rather than making every rank slow.
With a pipeline (pp > 1) DeepSpeed runs the whole schedule in one call: its time includes the
waits between stages.
"""
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_neox import hardware
from megatron_neox.config import Config
from megatron_neox.model.gpt_neox import count_parameters

def flops_per_token(cfg: Config, recompute: Optional[bool] = None) -> Dict[str, float]:
    m = cfg.model
    counts = count_parameters(m, cfg.parallel.tp)
    d, L, s = m.hidden_size, m.num_layers, m.seq_length
    p_layers = L * (counts["layer"] - counts["layer_norms"])
    p_head = m.padded_vocab(cfg.parallel.tp) * d  # tied or not, the head is a matmul
    model = 6 * (p_layers + p_head) + 12 * L * d * s
    if recompute is None:
        recompute = cfg.activation_checkpointing.interval > 0
    hardware = model + (2 * p_layers + 4 * L * d * s if recompute else 0)
    return {"model": float(model), "hardware": float(hardware)}


def resolve_peak_tflops(cfg: Config) -> float:
    """Peak TFLOP/s per rank for MFU: log.peak_tflops if a number, else the data sheet of this GPU
    (megatron_neox.hardware), else a matmul probe ('measure' always probes)."""
    peak = cfg.log.peak_tflops
    if isinstance(peak, (int, float)):
        return float(peak)
    if peak == "measure":
        return hardware.measure_peak_tflops(cfg.precision if torch.cuda.is_available() else "fp32")
    return hardware.peak_tflops(cfg.precision)[0]


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # Peak resident set of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ComputeTimer:
    """Sums the time of the spans between `start()` and `stop()`; `collect()` returns and resets it.
    On a GPU the spans are CUDA events, waited for only in `collect()` (once per log interval)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._events, self._total, self._t0 = [], 0.0, None

    def start(self) -> None:
        self._t0 = self._event() if self.cuda else time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events.append((self._t0, self._event()))
        else:
            self._total += time.perf_counter() - self._t0

    @staticmethod
    def _event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def collect(self) -> float:
        for a, b in self._events:
            b.synchronize()
            self._total += a.elapsed_time(b) / 1000.0
        total, self._events, self._total = self._total, [], 0.0
        return total


def drop_torn_tail(path: Path) -> Optional[str]:
    """Cut a last line that has no newline (a record torn by a crash mid-write) so the records a
    resumed run appends start on a line of their own; returns what was done, or None."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return None
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return None
            keep, pos = 0, size
            while pos > 0:  # back to the last newline, a block at a time
                start = max(0, pos - 65536)
                f.seek(start)
                cut = f.read(pos - start).rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                pos = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        return None
    return (f"{path}: its last line was cut mid-record ({size - keep} bytes without a newline, from a run that "
            "ended during a write); dropped it, new records follow the last complete one")


class MetricsLogger:
    """One line on stdout and one JSON object in metrics.jsonl per log event (rank 0 only).

    It also keeps the training window: `record_step` after every step, and `log_step` (when
    `should_log`) reports the window's mean loss and throughput and the run's ETA."""

    def __init__(self, cfg: Config, world_size: int, enabled: bool, peak_tflops: float, rank: int = 0):
        self.cfg, self.world, self.enabled, self.rank = cfg, world_size, enabled, rank
        self.flops = flops_per_token(cfg)
        self.peak = peak_tflops
        self.compute_timer = ComputeTimer()
        self.start(0, 0)
        self.file = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        log_dir = Path(cfg.log.dir) if cfg.log.dir else None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            repaired = drop_torn_tail(log_dir / "metrics.jsonl")
            if repaired:
                log_info(f"warning: {repaired}")
            self.file = open(log_dir / "metrics.jsonl", "a", buffering=1)
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        if cfg.log.wandb:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=cfg.log.wandb_project, dir=str(log_dir or "."), mode=mode,
                                    config=cfg.to_dict())

    def start(self, iteration: int, total_steps: int) -> None:
        """The run (re)starts at `iteration` of `total_steps`: the ETA is measured from here."""
        self.total_steps = total_steps
        self._run_start, self._run_start_iter = time.perf_counter(), iteration
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start, self._window_tokens, self._window_losses = time.perf_counter(), 0, []
        self._window_steps, self._window_data_wait, self._window_paused = 0, 0.0, 0.0
        self.compute_timer.collect()

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (validation, lm-eval, checkpoint saves): left out of the window's
        tokens_per_sec and mfu, as Megatron-LM stops its interval timer around evaluation and saving;
        eta_s still counts it."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_paused += time.perf_counter() - start

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log.interval == 0 or step == self.total_steps

    def record_step(self, loss: float, tokens: int, counted: bool, data_wait: float = 0.0) -> None:
        """One finished step: its tokens count for throughput, its loss for the window's mean
        unless the step was skipped or non-finite (`counted` False); `data_wait` seconds were spent
        waiting for its batch."""
        self._window_tokens += tokens
        self._window_steps += 1
        self._window_data_wait += data_wait
        if counted:
            self._window_losses.append(loss)

    def log_step(self, state: Dict[str, int], *, lr: float, grad_norm: Optional[float], loss_scale: Optional[float],
                 global_batch_size: int, extra: Optional[Dict[str, float]] = None) -> None:
        """The training record of the window ending at `state["iteration"]`; starts a new window.
        Every rank calls it (the per-rank times are all-reduced); rank 0 writes it. `extra`: the
        objective's figures over the window (DPO rewards)."""
        ranks = self._rank_times()
        now = time.perf_counter()
        trained_s = now - self._window_start - self._window_paused
        step, window = state["iteration"], self._window_losses
        per_step = (now - self._run_start) / max(1, step - self._run_start_iter)
        self.log({
            "step": step, "total_steps": self.total_steps,
            "consumed_samples": state["consumed_samples"], "tokens": state["consumed_tokens"],
            "loss": sum(window) / len(window) if window else float("nan"), "lr": lr,
            "grad_norm": grad_norm, "loss_scale": loss_scale, "skipped_steps": state["skipped_steps"],
            "global_batch_size": global_batch_size, **self.throughput(self._window_tokens, trained_s),
            "mem_gb": memory_gb(), "eta_s": per_step * (self.total_steps - step), **ranks, **(extra or {}),
        })
        self._reset_window()

    def _rank_times(self) -> Dict[str, Any]:
        """The slowest and fastest rank's compute time per step and the longest data wait per step,
        over the window; one all-reduce of a (world, 2) tensor in which each rank fills its row."""
        from deepspeed.accelerator import get_accelerator

        steps = max(1, self._window_steps)
        times = torch.zeros(self.world, 2, dtype=torch.float64, device=get_accelerator().current_device_name())
        times[self.rank, 0] = self.compute_timer.collect() / steps
        times[self.rank, 1] = self._window_data_wait / steps
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(times)
        compute = times[:, 0].cpu()
        slowest = int(compute.argmax())
        return {"slowest_rank_s": float(compute[slowest]), "slowest_rank": slowest,
                "fastest_rank_s": float(compute.min()), "data_wait_s": float(times[:, 1].max())}

    def throughput(self, tokens: int, seconds: float) -> Dict[str, float]:
        tokens_per_sec = tokens / max(seconds, 1e-9)
        tflops_rank = tokens_per_sec * self.flops["hardware"] / self.world / 1e12
        mfu = tokens_per_sec * self.flops["model"] / self.world / 1e12 / self.peak if self.peak > 0 else 0.0
        return {"tokens_per_sec": tokens_per_sec, "tflops_per_rank": tflops_rank, "mfu": mfu}

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        print(_format_line(record), flush=True)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    tag = k if k.startswith("eval/") else f"eval/{k}" if k.startswith("eval") else f"train/{k}"
                    self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _format_line(r: Dict[str, Any]) -> str:
    harness = [f"{k[len('eval/'):]} {_fmt(v)}" for k, v in r.items() if k.startswith("eval/")]
    if harness:  # lm-eval task metrics (eval.tasks)
        return f"eval  step {r['step']:>6} | " + " | ".join(harness)
    if "eval_loss" in r:
        ppl = f" | eval_ppl {_fmt(r['eval_ppl'])}" if "eval_ppl" in r else ""
        return f"eval  step {r['step']:>6} | eval_loss {_fmt(r['eval_loss'])}{ppl}" + _rewards(r, "eval_")
    if "eval_tasks_error" in r:
        return f"warning: eval.tasks at step {r['step']} failed, training goes on: {r['eval_tasks_error']}"
    if "rollback_to" in r:
        a, b = r["skipped_batches"]
        return (f"spike step {r['step']:>6} | loss {_fmt(r['spike_loss'])} ({r['spike_reason']}) | rollback "
                f"{r['rollbacks']} to step {r['rollback_to']} | skipping global batches {a}..{b - 1}")
    eta = r.get("eta_s")
    eta_txt = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
    parts = [
        f"step {r['step']:>6}/{r.get('total_steps', '?')}",
        f"loss {_fmt(r.get('loss'))}",
        f"lr {r.get('lr', 0):.3e}",
        f"gnorm {_fmt(r.get('grad_norm'))}",
    ]
    if r.get("loss_scale") is not None:
        parts.append(f"scale {_fmt(r['loss_scale'])}")
    if "rewards_accuracy" in r:
        parts[-1] += _rewards(r, "")
    parts += [
        f"skipped {r.get('skipped_steps', 0)}",
        f"batch {r.get('global_batch_size')}",
        f"{r.get('tokens_per_sec', 0):,.0f} tok/s",
        f"{r.get('tflops_per_rank', 0):.3g} TFLOP/s/rank",
        f"mfu {100 * r.get('mfu', 0):.1f}%",
        f"mem {r.get('mem_gb', 0):.2f} GB",
        f"slowest rank {r.get('slowest_rank')} {1000 * r.get('slowest_rank_s', 0):.0f} ms "
        f"(fastest {1000 * r.get('fastest_rank_s', 0):.0f}) data {1000 * r.get('data_wait_s', 0):.0f} ms",
        f"eta {eta_txt}",
    ]
    return " | ".join(parts)


def _rewards(r: Dict[str, Any], prefix: str) -> str:
    """DPO's reward accuracy and margin, when the record has them."""
    if f"{prefix}rewards_accuracy" not in r:
        return ""
    return (f" | reward acc {_fmt(r[prefix + 'rewards_accuracy'])} margin {_fmt(r.get(prefix + 'rewards_margin'))}"
            f" | logps chosen {_fmt(r.get(prefix + 'logps_chosen'))} rejected {_fmt(r.get(prefix + 'logps_rejected'))}")


def log_info(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
