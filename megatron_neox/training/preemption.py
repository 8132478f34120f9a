"""Stop signals through a launcher: finish the step, save, and exit 0 for the command the user ran.

DeepSpeed 0.19's launchers do not pass a stop signal on to the ranks (read in
deepspeed/launcher/runner.py and launch.py, and measured):

- `deepspeed` (runner.py) handles SIGTERM/SIGINT only for multi-node pdsh: on one node, or with
  --no_ssh, it dies of the signal (exit 143) and the ranks train on as orphans;
- `deepspeed.launcher.launch` (one per node) answers SIGTERM by terminating every rank, waiting
  30 s, SIGKILLing what is left and exiting 1, even when every rank saved and exited 0;
- a signal to the whole process group reaches both launchers as well as the ranks.

`supervise` runs a launcher command (`deepspeed ...`, `torchrun ...`) in a process group of its
own with SIGTERM/SIGUSR1 ignored, and forwards SIGTERM, SIGUSR1 and SIGINT to the ranks alone (a
first Ctrl-C asks for a save, a second kills). The ranks tell it who they are through files in a
directory named by an environment variable: `announce_rank` once their handlers are installed (a
signal that comes earlier is held and delivered then), `report_exit` when they leave. When a
launcher fails after a stop signal although every rank reported "saved and exited 0" (launch.py's
exit 1 when SLURM signals every process of the step), the command still exits 0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron_neox.durable import write_json

ENV_DIR = "MEGATRON_NEOX_SUPERVISOR_DIR"
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# ---- the rank side ---------------------------------------------------------------------------


def _rank_dir() -> Optional[Path]:
    d = os.environ.get(ENV_DIR)
    return Path(d) if d and os.path.isdir(d) else None


def announce_rank() -> None:
    """Tell a supervising `supervise` that this process is a rank whose stop handlers are installed."""
    d = _rank_dir()
    if d is not None:
        write_json(d / f"rank-{os.getpid()}.json", {"rank": os.environ.get("RANK")})


def report_exit(code: int, stopped_by_signal: bool) -> None:
    """Record how this rank leaves (read by `supervise` when its launcher exits non-zero)."""
    d = _rank_dir()
    if d is not None:
        write_json(d / f"exit-{os.getpid()}.json", {"rank": os.environ.get("RANK"), "code": int(code),
                                                      "stopped_by_signal": bool(stopped_by_signal)})


def watch_launcher(on_gone: Callable[[str], None], poll_s: float = 1.0) -> bool:
    """Call `on_gone(why)` (from a daemon thread) when the `deepspeed` runner above this rank dies.

    On one node the runner dies of SIGTERM without passing it on (see above), leaving its per-node
    launcher and the ranks to train on as orphans. A rank whose parent is DeepSpeed's per-node
    launcher watches that launcher's parent: once it is reparented, the runner is gone and the
    trainer treats it as a stop signal (finish the step, save, exit 0). Not needed, and not started,
    under launch/run.py (it forwards signals) or any other launcher. Returns whether it watches."""
    if _rank_dir() is not None:
        return False
    import threading

    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
            return False
        runner = launcher.ppid()
    except psutil.Error:
        return False
    if runner <= 1:
        return False

    def poll():
        while True:
            time.sleep(poll_s)
            try:
                gone = launcher.ppid() != runner
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                on_gone(f"the deepspeed runner (pid {runner}) that started this rank's launcher is gone "
                        "(killed by a signal it does not pass on)")
                return

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
    return True


# ---- the supervisor --------------------------------------------------------------------------


def _ranks(d: Path) -> List[int]:
    return [int(p.name[5:-5]) for p in d.glob("rank-*.json")]


def _exits(d: Path) -> Dict[int, dict]:
    out = {}
    for p in d.glob("exit-*.json"):
        try:
            out[int(p.name[5:-5])] = json.loads(p.read_text())
        except (ValueError, OSError):
            pass
    return out


def _signal_ranks(pids: Sequence[int], *sigs: int) -> None:
    for pid in pids:
        for sig in sigs:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # already gone
                break


def _log(msg: str) -> None:
    print(f"[launch] {msg}", file=sys.stderr, flush=True)


def _ignore_stop_signals() -> None:  # runs in the launcher's child before exec
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def supervise(cmd: Sequence[str], env: Optional[dict] = None, poll_s: float = 0.2) -> int:
    """Run launcher `cmd`, forward stop signals to its ranks, and return the exit status to use."""
    state_dir = Path(tempfile.mkdtemp(prefix="mnx-ranks-"))
    env = dict(os.environ if env is None else env)
    env[ENV_DIR] = str(state_dir)
    pending: List[int] = []  # received by the handler, not yet acted on

    def on_signal(signum, frame):
        pending.append(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in _FORWARDED}
    try:
        # A group of its own: a signal to our process group (a terminal, SLURM's pgid tracking)
        # reaches us, not the launchers. Ignored dispositions survive exec; handlers do not.
        proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=_ignore_stop_signals)
        stops: List[int] = []  # every rank gets each of these once, whenever it announces itself
        sent: Dict[int, int] = {}  # pid -> how many of `stops` it got
        while True:
            try:
                rc = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            while pending:
                sig = pending.pop(0)
                if sig != signal.SIGINT:
                    _log(f"{signal.Signals(sig).name}: forwarded to the ranks; they finish their step, save and exit")
                elif signal.SIGTERM not in stops:
                    _log("interrupt: the ranks finish their step, save and exit (Ctrl-C again to kill)")
                    sig = signal.SIGTERM
                else:
                    _log("second interrupt: killing the launcher and every rank")
                    os.killpg(proc.pid, signal.SIGKILL)
                    sig = signal.SIGKILL
                stops.append(sig)
            for pid in _ranks(state_dir):
                _signal_ranks([pid], *stops[sent.get(pid, 0):])
                sent[pid] = len(stops)
        return _exit_status(rc, state_dir, bool(stops))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        shutil.rmtree(state_dir, ignore_errors=True)


def _exit_status(rc: int, state_dir: Path, signalled: bool) -> int:
    if rc < 0:  # killed by a signal: the shell's convention
        rc = 128 - rc
    if rc == 0:
        return 0
    ranks, exits = _ranks(state_dir), _exits(state_dir)
    saved = [e for e in exits.values() if e.get("code") == 0 and e.get("stopped_by_signal")]
    if ranks and set(ranks) <= set(exits) and len(saved) == len(exits):
        _log(f"the launcher exited {rc} after a stop signal, but all {len(ranks)} ranks saved and exited 0")
        return 0
    if signalled and not ranks:
        _log(f"stopped before any rank was ready (launcher exit {rc}); nothing was saved")
    for pid in sorted(set(ranks) - set(exits)):  # announced, never reported: killed before it could
        _log(f"rank {_rank_of(state_dir, pid)} (pid {pid}) died without reporting its exit{_how(rc)}")
    return rc


def _rank_of(state_dir: Path, pid: int) -> str:
    try:
        return str(json.loads((state_dir / f"rank-{pid}.json").read_text()).get("rank"))
    except (ValueError, OSError):
        return "?"


def _how(rc: int) -> str:
    """DeepSpeed's per-node launcher exits with its failed rank's return code modulo 256: a rank
    killed by signal N makes it exit 256 - N (SIGKILL: 247)."""
    try:
        return f": killed by {signal.Signals(256 - rc).name} (the launcher's exit {rc} = 256 - {256 - rc})"
    except ValueError:
        return f" (launcher exit {rc})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python launch/run.py LAUNCHER [ARGS...]\n"
              "  e.g. python launch/run.py deepspeed --num_gpus 8 launch/train.py --config 20B.json")
        return 0 if argv else 2
    if shutil.which(argv[0]) is None and not os.path.isfile(argv[0]):
        print(f"error: launcher {argv[0]!r} not found (expected e.g. deepspeed or torchrun on PATH)", file=sys.stderr)
        return 2
    start = time.monotonic()
    rc = supervise(argv)
    if rc:
        _log(f"exit {rc} after {time.monotonic() - start:.0f} s")
    return rc
