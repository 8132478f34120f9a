"""The layer order (megatron_neox/devtools/imports.py LAYERS) holds: no upward import, no cycle."""
import subprocess
import sys

from megatron_neox.devtools import imports

from _train import REPO


def test_package_imports_follow_the_layer_order():
    proc = subprocess.run([sys.executable, "-m", "megatron_neox.devtools.imports"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no cycle" in proc.stdout


def test_upward_import_and_cycle_are_reported():
    g = {
        "megatron_neox.config": [(3, "megatron_neox.training.precision")],
        "megatron_neox.training.precision": [(7, "megatron_neox.config")],
        "megatron_neox.errors": [],
    }
    found = imports.layer_problems(g)
    assert found == ["megatron_neox/config.py:3: config imports megatron_neox.training.precision from a higher "
                     "layer (training)"]
    assert imports.cycles(g) == [["megatron_neox.config", "megatron_neox.training.precision"]]


def test_every_package_unit_has_a_layer():
    units = {imports.unit_of(m) for m in imports.graph()} - {""}
    assert units <= set(imports.layer_of()), units - set(imports.layer_of())
