"""benchmarks/gpu_check.py --tiny: the GPU check's logic on CPU, so it cannot rot before it meets a GPU."""
import json
import os
import subprocess
import sys

from _train import REPO

# Syncs the attention/rotary code still asks for are reported by file; code outside it must have none.
ATTENTION_FILES = ("megatron_neox/model/rotary.py", "megatron_neox/model/transformer.py")


def test_gpu_check_tiny_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--tiny",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"gpu_check {r['verdict']} | cpu"), last
    assert proc.returncode == (0 if r["verdict"] == "PASS" else 1)

    runs = r["parity"]["runs"]
    assert r["parity"]["ok"], runs
    for name in ("fp32_zero0", "fp32_zero1", "fp16_zero1", "bf16_zero1"):
        assert runs[name]["max_rel_diff"] <= runs[name]["tolerance"], (name, runs[name])
        assert len(runs[name]["losses"]) == 3
    assert runs["fp32_zero0"]["max_rel_diff"] < 1e-6  # same CPU, same math: only summation order differs
    assert runs["fp16_zero1"]["loss_scale"] == 65536.0
    assert "zero.stage=0 is refused" in runs["fp16_zero0"]["refused"]

    syncs = r["syncs"]
    assert all(site.rsplit(":", 1)[0] in ATTENTION_FILES for site in syncs["model_sites"]), syncs["model_sites"]
    assert syncs["engine_step"] >= syncs["model_forward_backward"]

    assert set(r["kernels"]) == {"dense_rotary", "alibi", "alternating_local"}
    assert all(any("attention" in k for k in names) for names in r["kernels"].values()), r["kernels"]
    t = r["throughput"]
    assert t["tokens_per_sec"] > 0 and 0 < t["mfu"] < 1 and "ZeRO-0 (auto" in t["setup"], t
    assert r["decode"]["ok"] and r["decode"]["max_abs_diff_vs_recompute"] < 1e-4, r["decode"]
