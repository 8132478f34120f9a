"""benchmarks/gpu_check.py --tiny: the GPU check's logic on CPU, so it cannot rot before it meets a GPU.

The bounds here are the test's own (from differences measured on CPU, see PARITY_TOLERANCE in the
script), not the tolerance the script reports about itself: a run whose weights do not move, a
wrong learning rate or an unscaled gradient fails here even if the script's constants drift."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from _train import REPO

# |loss - reference| / reference loss movement, gradient-norm and update differences (relative).
BOUNDS = {"fp32_zero0": (1e-6, 1e-6, 2e-3), "fp32_zero1": (1e-6, 1e-6, 2e-3),
          "fp16_zero1": (1e-3, 2e-3, 6e-2), "bf16_zero1": (5e-3, 1e-2, 0.1)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    # Every check, the CLI row (opt-in on CPU: a second process through launch/train.py) included.
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--tiny",
                           "--only", "parity,syncs,kernels,decode,throughput,cli", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_gpu_check_tiny_passes_every_check_on_cpu(report):
    r, proc = report
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check PASS | cpu"), last
    assert proc.returncode == 0 and r["verdict"] == "PASS"
    assert r["syncs"]["ok"] and r["kernels"]["ok"] and r["decode"]["ok"]


def test_parity_runs_train_as_far_as_the_reference(report):
    r, _ = report
    ref = r["parity"]["reference_cpu_fp32"]
    assert ref[-1] < 0.5 * ref[0], ref  # the loss really moves: a broken lr or scale shows
    runs = r["parity"]["runs"]
    for name, (loss, norm, update) in BOUNDS.items():
        v = runs[name]
        assert len(v["losses"]) == r["parity"]["steps"] == 6
        assert v["loss"] <= loss and v["grad_norm"] <= norm and v["update"] <= update, (name, v)
        assert abs(v["moved"] - 1) <= update, (name, v)  # the weights moved as far as the reference's
    assert runs["fp16_zero1"]["loss_scale"] == 65536.0 and runs["fp16_zero1"]["skipped_steps"] == 0
    assert "zero.stage=0 is refused" in runs["fp16_zero0"]["refused"]


def test_syncs_steady_model_has_none_and_engine_sites_are_named(report):
    r, _ = report
    s = r["syncs"]
    assert s["model_steady"]["dispatch"] == 0 and s["model_first"]["dispatch"] == 0, s
    sites = s["engine_steady"]["dispatch_sites"]
    assert s["engine_steady"]["dispatch_in_model"] == 0 and sites, s
    assert all(site.startswith(("deepspeed/", "megatron_neox/training/")) for site in sites), sites


def test_throughput_rows_compare_with_hf(report):
    r, _ = report
    rows = r["throughput"]["rows"]
    for name in ("eager_recompute", "eager_no_recompute"):
        assert rows[name]["ours"]["tokens_per_sec"] > 0 and rows[name]["hf"]["tokens_per_sec"] > 0, rows[name]
        assert rows[name]["ours_over_hf"] > 0
    assert "skipped" in rows["compiled_no_recompute"]


def test_cli_row_trains_through_launch_train_and_compares_with_engine_and_hf(report):
    r, _ = report
    cli = r["cli"]
    assert cli["ok"] and cli["recompute_interval"] == 1, cli
    assert cli["cli_fp32"]["step"] == cli["steps"] and cli["cli_fp32"]["tokens_per_sec"] > 0, cli
    assert cli["engine_fp32"]["tokens_per_sec"] > 0 and cli["hf_eager_fp32"]["tokens_per_sec"] > 0, cli
    assert cli["cli_over_engine_fp32"] > 0 and cli["cli_fp32_over_hf_fp32"] > 0


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_mod", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_check_fails_on_the_math_path_and_sync_watch_sees_an_item_in_the_model():
    """The checks can fail: SDPA's math fallback is not the expected CPU kernel, and a .item() in a
    layer's forward is counted at the model's own line."""
    import torch

    g = _gpu_check()
    assert not g.kernel_verdict("cpu", "dense_rotary", ["aten::scaled_dot_product_attention",
                                                        "aten::_scaled_dot_product_attention_math"])
    assert g.kernel_verdict("cpu", "alibi", ["aten::_scaled_dot_product_flash_attention_for_cpu"])

    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.model.transformer import TransformerLayer

    cfg = g.make_config(g.PARITY_MODEL["tiny"], "fp32", 0, 2, 2)
    model = GPTNeoX(cfg.model, cfg.model.padded_vocab(1))
    forward = TransformerLayer.forward

    def syncing_forward(self, x, *args, **kwargs):
        x.sum().item()  # planted: a host sync inside the model
        return forward(self, x, *args, **kwargs)

    tokens = torch.randint(0, 100, (2, 32))
    TransformerLayer.forward = syncing_forward
    try:
        with g.SyncWatch() as watch:
            model(tokens).sum().backward()
    finally:
        TransformerLayer.forward = forward
    s = watch.summary()
    # One per layer, attributed to the model (the innermost project frame: where the layer is called).
    assert s["dispatch"] == s["dispatch_in_model"] == cfg.model.num_layers, s
    assert all(site.startswith("megatron_neox/model/") for site in s["dispatch_sites"]), s


def test_a_check_that_raises_is_a_fail_and_the_others_still_report(tmp_path, monkeypatch, capsys):
    """A GPU run is one shot: a check that breaks is named with its error, the checks after it
    still run, and the JSON holds every figure."""
    from deepspeed.accelerator import get_accelerator

    g = _gpu_check()
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", get_accelerator().is_fp16_supported)  # main sets it

    def broken(size, device):
        raise RuntimeError("cuDNN error: planted")

    monkeypatch.setattr(g, "check_kernels", broken)
    monkeypatch.setattr(g, "check_decode", lambda size, device: {
        "new_tokens": 3, "max_abs_diff_vs_recompute": 0.0, "decode_tokens_per_sec": 1.0, "ok": True})
    out = tmp_path / "r.json"
    assert g.main(["--tiny", "--only", "kernels,decode", "--json", str(out)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]  # DeepSpeed's log
    assert lines[0].startswith("kernels    FAIL | RuntimeError: cuDNN error: planted"), lines
    assert lines[1].startswith("decode     ok"), lines
    assert lines[-1].startswith("gpu_check FAIL: kernels | cpu"), lines
    r = json.loads(out.read_text())
    assert r["verdict"] == "FAIL: kernels" and r["decode"]["ok"] and "planted" in r["kernels"]["traceback"]


def test_budget_skips_what_would_start_late_and_says_so(tmp_path, monkeypatch, capsys):
    """--budget: a check (or throughput row) that would start after it is reported as skipped, the
    verdict names it, and the JSON is complete."""
    import time

    from deepspeed.accelerator import get_accelerator

    g = _gpu_check()
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", get_accelerator().is_fp16_supported)  # main sets it
    monkeypatch.setattr(g, "check_kernels", lambda size, device: time.sleep(0.3) or {"ok": True, "flavours": {}})
    monkeypatch.setattr(g, "check_decode", lambda size, device: pytest.fail("started after the budget"))
    out = tmp_path / "r.json"
    assert g.main(["--tiny", "--only", "kernels,decode", "--budget", "0.1", "--json", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]
    assert lines[1] == "decode     skipped: over --budget", lines
    r = json.loads(out.read_text())
    assert r["verdict"] == "PASS (skipped over --budget: decode)" and r["decode"] == {"skipped": "over --budget"}
    monkeypatch.setattr(g, "_DEADLINE", 0.0)  # long past: no row starts
    rows = g.check_throughput("tiny", compile_rows=True)["rows"]
    assert list(rows) == ["compiled_no_recompute", "eager_no_recompute", "compiled_recompute", "eager_recompute"]
    assert all(v == {"skipped": "over --budget"} for v in rows.values()), rows
