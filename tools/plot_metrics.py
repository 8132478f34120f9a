#!/usr/bin/env python
"""Plot a run's metrics.jsonl: training and eval loss, learning rate, throughput, and the
lm-evaluation-harness metrics of `eval.tasks` (keys eval/<task>/<metric>) when the run has them.

    python tools/plot_metrics.py runs/125M/log --out loss.png
    python tools/plot_metrics.py runs/125M/log --x tokens          # x axis in tokens, not steps

LOGDIR is the run's `log.dir` (or the metrics.jsonl file itself). A resumed run appends to the
same file; when it logs a step at or before one already seen (it resumed from an older checkpoint
than the last step logged), the records it replays win and the abandoned ones are dropped.
Exit status 2 with FILE:LINE on a malformed line.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.durable import atomic_paths  # noqa: E402

Record = Dict[str, object]


class MetricsFileError(Exception):
    pass


def read_metrics(path: Path) -> Tuple[List[Record], List[Record]]:
    """(training records, eval records) of one timeline, in step order."""
    train: List[Record] = []
    evals: List[Record] = []
    try:
        text = path.read_text()
        lines = text.splitlines()
    except OSError as e:
        raise MetricsFileError(f"{path}: cannot read ({e.strerror or e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):  # torn by a crash mid-write
                print(f"warning: {where}: the last line was cut mid-record; skipped it", file=sys.stderr)
                continue
            raise MetricsFileError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): {line[:80]!r}; "
                                   "fix or delete the line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise MetricsFileError(f"{where}: expected a JSON object with an integer 'step', found {line[:80]!r}")
        if "eval_loss" in rec or any(k.startswith("eval/") for k in rec):
            evals.append(rec)
            continue
        if "eval_tasks_error" in rec:  # an in-training lm-eval failure, logged and passed over
            continue
        if "rollback_to" in rec:  # a loss-spike rollback: the replayed steps that follow replace the old ones
            continue
        if "loss" not in rec:
            raise MetricsFileError(f"{where}: a record with neither 'loss' nor 'eval_loss': {line[:80]!r}")
        step = rec["step"]
        if train and step <= train[-1]["step"]:
            # A restart replays steps after its checkpoint: keep the replayed timeline.
            train = [r for r in train if r["step"] < step]
            evals = [r for r in evals if r["step"] < step]
        train.append(rec)
    if not train:
        raise MetricsFileError(f"{path}: no training records (lines with 'loss'); has the run logged a step yet?")
    return train, evals


def _num(value) -> float:
    """Logged non-finite values are null: plot them as gaps."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def plot(train: List[Record], evals: List[Record], out: Path, x_axis: str = "step", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    import numpy as np

    def xs(records):
        steps = [r["step"] for r in records]
        if x_axis == "step":
            return steps
        # Eval records carry no token count: interpolate the training records' (exact at a logged
        # step; between two, exact too unless the batch size is ramping up).
        known = [(r["step"], _num(r.get("tokens"))) for r in train if math.isfinite(_num(r.get("tokens")))]
        if not known:
            raise MetricsFileError("--x tokens: no training record has a 'tokens' value")
        return np.interp(steps, [k[0] for k in known], [k[1] for k in known])

    harness = [r for r in evals if any(k.startswith("eval/") for k in r)]
    losses = [r for r in evals if "eval_loss" in r]
    rows = 4 if harness else 3
    fig, axes = plt.subplots(rows, 1, figsize=(9, 9 + 2.5 * (rows - 3)), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1, 1, 2][:rows]})
    ax_loss, ax_lr, ax_speed = axes[:3]
    x_train = xs(train)
    ax_loss.plot(x_train, [_num(r["loss"]) for r in train], lw=1.2, label="train loss")
    if losses:
        ax_loss.plot(xs(losses), [_num(r["eval_loss"]) for r in losses], "o-", ms=4, lw=1.2, label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_lr.plot(x_train, [_num(r.get("lr")) for r in train], color="tab:green", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_speed.plot(x_train, [_num(r.get("tokens_per_sec")) for r in train], color="tab:purple", lw=1.2)
    ax_speed.set_ylabel("tokens / s")
    if harness:
        # One line per task metric; perplexities live on another scale than accuracies: log axis
        # when any value exceeds 1.
        ax_tasks = axes[3]
        keys = sorted({k for r in harness for k in r if k.startswith("eval/")})
        for key in keys:
            points = [r for r in harness if key in r]
            ax_tasks.plot(xs(points), [_num(r[key]) for r in points], "o-", ms=3, lw=1, label=key[len("eval/"):])
        if any(_num(r[k]) > 1 for r in harness for k in keys if k in r):
            ax_tasks.set_yscale("log")
        ax_tasks.set_ylabel("lm-eval tasks")
        ax_tasks.legend(loc="best", fontsize=7, ncol=2)
    axes[-1].set_xlabel("tokens" if x_axis == "tokens" else "step")
    if x_axis == "step":
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    last = train[-1]
    fig.suptitle(f"{title}  (step {last['step']}/{last.get('total_steps', '?')})".strip())
    fig.tight_layout()
    # Write beside the target and rename: a reader (or a crash) never sees half a PNG.
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_paths(out) as (tmp,):
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", help="the run's log.dir (holding metrics.jsonl), or the file itself")
    parser.add_argument("--out", default=None, help="PNG to write (default LOGDIR/metrics.png)")
    parser.add_argument("--x", dest="x_axis", choices=["step", "tokens"], default="step", help="x axis")
    args = parser.parse_args(argv)

    src = Path(args.logdir)
    path = src / "metrics.jsonl" if src.is_dir() else src
    out = Path(args.out) if args.out else path.with_name("metrics.png")
    try:
        train, evals = read_metrics(path)
    except MetricsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        plot(train, evals, out, args.x_axis, title=str(path))
    except MetricsFileError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(train)} training and {len(evals)} eval records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
