"""The config tree: strict errors that name the key, file and line; overrides; shipped configs.

`tools/plan.py` is launched for the bad-input cases: each must exit 2 with a message and no
traceback. These launches stop before the tool imports torch/DeepSpeed, so they are cheap.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_neox.config import (
    CONFIG_DIR,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    resolve_config_path,
)
from megatron_neox.errors import ConfigError
from megatron_neox.resolve import resolve
from megatron_neox.training.engine import deepspeed_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in CONFIG_DIR.glob("*") if p.suffix in (".json", ".yaml", ".yml"))

# The smallest valid config: every section but model and train has defaults.
MINIMAL = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 1000},
    "train": {"iters": 10, "micro_batch_size": 2, "global_batch_size": 8},
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _with(**sections):
    data = json.loads(json.dumps(MINIMAL))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def test_unknown_key_names_path_and_closest_valid_key(tmp_path):
    path = _write(tmp_path, "c.json", json.dumps(_with(model={"num_layer": 3})))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "model.num_layer" in msg and "did you mean 'model.num_layers'" in msg
    assert str(path) in msg


def test_unknown_top_level_section_suggests_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser'.*did you mean 'optimizer'"):
        config_from_dict({**MINIMAL, "optimiser": {"lr": 1e-3}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"model\.hidden_size: .*'big'"):
        config_from_dict(_with(model={"hidden_size": "big"}))


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"hidden_size=66 is not divisible by model.num_attention_heads=4"):
        config_from_dict(_with(model={"hidden_size": 66}))


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by parallel.tp=3"):
        config_from_dict(_with(parallel={"tp": 3}))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "nope.json")


def test_invalid_json_reports_line(tmp_path):
    text = '{\n  "model": {"num_layers": 2,\n    "hidden_size": 64,,\n  }\n}\n'
    path = _write(tmp_path, "bad.json", text)
    with pytest.raises(ConfigError, match=rf"{path.name}:3:\d+: invalid JSON"):
        load_config(path)


def test_invalid_yaml_reports_line(tmp_path):
    text = "model:\n  num_layers: 2\n  hidden_size: [64\ntrain:\n  iters: 1\n"
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=rf"{path.name}:\d+:\d+: invalid YAML") as e:
        load_config(path)
    line = int(str(e.value).split(f"{path.name}:")[1].split(":")[0])
    assert 3 <= line <= 4  # the unclosed bracket opens on line 3; the parser notices by line 4


def test_override_values_parse_as_json_else_string():
    assert parse_override("train.iters=100") == (["train", "iters"], 100)
    assert parse_override("optimizer.betas=[0.9, 0.99]") == (["optimizer", "betas"], [0.9, 0.99])
    assert parse_override("activation_checkpointing.partition_activations=true")[1] is True
    assert parse_override("tokenizer.path=data/tok.json") == (["tokenizer", "path"], "data/tok.json")
    assert parse_override("log.peak_tflops=auto")[1] == "auto"
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("train.iters")


def test_overrides_apply_through_load_config(tmp_path):
    path = _write(tmp_path, "c.json", json.dumps(MINIMAL))
    cfg = load_config(path, ["train.iters=7", "optimizer.lr=0.001", "parallel.partition_method=uniform",
                             "data.prefixes=[\"a\", \"b\"]"])
    assert (cfg.train.iters, cfg.optimizer.lr, cfg.parallel.partition_method) == (7, 0.001, "uniform")
    assert cfg.data.prefixes == ["a", "b"]
    with pytest.raises(ConfigError, match=r"train.iters is a value, not a section"):
        apply_overrides(MINIMAL, ["train.iters.x=1"])


def test_bare_name_resolves_to_shipped_config():
    assert resolve_config_path("20B") == CONFIG_DIR / "20B.json"
    assert resolve_config_path("pythia-70M.json") == CONFIG_DIR / "pythia-70M.json"
    with pytest.raises(ConfigError, match=r"did you mean.*pythia-70M.json"):
        resolve_config_path("pythia-70m")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads_and_batch_identity_holds(path):
    cfg = load_config(path.name)
    assert cfg.comment and len(cfg.comment) > 80, "every shipped config says where its numbers come from"
    p, t = cfg.parallel, cfg.train
    # The smallest world this layout runs on, and a data-parallel one.
    for dp in (1, 2, 4):
        world = p.pp * p.tp * dp
        if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * dp):
            continue
        resolved = resolve(cfg, world)
        ds = deepspeed_config(resolved)
        assert ds["train_batch_size"] == (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
        )
        if t.global_batch_size is not None:
            assert ds["train_batch_size"] == t.global_batch_size
        assert ds["zero_optimization"]["stage"] == resolved.zero.stage != "auto"
        assert ("fp16" in ds) == (cfg.precision == "fp16") and ("bf16" in ds) == (cfg.precision == "bf16")


def test_20B_reproduces_the_trained_batch_on_96_gpus():
    ds = deepspeed_config(resolve(load_config("20B"), 96))
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 32, 1536)
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["fp16"]["hysteresis"] == 2


BAD_INPUTS = [
    (["--config", "no-such-config"], "not found"),
    (["--config", "{bad_json}"], "invalid JSON"),
    (["--config", "{bad_yaml}"], "invalid YAML"),
    (["--config", "pythia-70M", "--set", "model.num_layer=3"], "did you mean 'model.num_layers'"),
    (["--config", "pythia-70M", "--set", "model.hidden_size=big"], "model.hidden_size"),
    (["--config", "pythia-70M", "--set", "parallel.tp=3"], "not divisible by parallel.tp=3"),
    (["--config", "pythia-70M", "--set", "train.iters"], "KEY.PATH=VALUE"),
    (["--config", "pythia-70M", "--gpus", "0"], "positive"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUTS, ids=[a[-1] for a, _ in BAD_INPUTS])
def test_plan_tool_exits_2_on_bad_input(tmp_path, args, expected):
    bad_json = _write(tmp_path, "bad.json", '{"model": {,}}')
    bad_yaml = _write(tmp_path, "bad.yaml", "model: [1\n")
    args = [a.format(bad_json=bad_json, bad_yaml=bad_yaml) for a in args]
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), *args], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# ---- resolution (megatron_neox/resolve.py) --------------------------------------------------


def test_resolve_decides_every_auto_once_and_attaches_the_layout():
    cfg = config_from_dict(_with(zero={"stage": "auto"}))
    assert cfg.zero.stage == "auto" and cfg.zero.overlap_comm is None and not cfg.is_resolved
    one, two = resolve(cfg, 1), resolve(cfg, 2)
    assert (one.zero.stage, one.zero.overlap_comm) == (0, False)  # fp32 on one data-parallel rank
    assert (two.zero.stage, two.zero.overlap_comm) == (1, True)
    assert one.resolved.layout == cfg.layout(1) and two.resolved.layout.dp == 2
    assert one.resolved.why("zero.stage") == "auto: one data-parallel rank, nothing to shard"
    assert one.model.compile is False and one.resolved.why("model.compile") == "auto: eager on cpu"
    assert resolve(one, 1) is one  # resolving is done once
    with pytest.raises(ConfigError, match="resolved for 1 ranks, used on 2"):
        resolve(one, 2)
    with pytest.raises(ConfigError, match="not resolved"):
        cfg.resolved


def test_a_set_value_is_not_a_decision():
    resolved = resolve(config_from_dict(_with(zero={"stage": 1, "overlap_comm": False},
                                              model={"compile": False})), 2)
    assert (resolved.zero.stage, resolved.zero.overlap_comm) == (1, False)
    assert resolved.resolved.decisions == () and resolved.resolved.why("zero.stage") == "set"


def test_config_sections_are_immutable():
    cfg = resolve(config_from_dict(MINIMAL), 1)
    for section, key, value in (("zero", "stage", 3), ("train", "iters", 5), ("model", "num_layers", 4)):
        with pytest.raises(Exception, match="frozen"):
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(Exception, match="frozen"):
        cfg.precision = "bf16"


def test_a_value_that_fits_no_alternative_is_one_error_naming_them_all():
    """`auto` | bool and `auto` | int >= 0 keys: pydantic's one error per alternative becomes one line."""
    with pytest.raises(ConfigError) as e:
        config_from_dict(copy.deepcopy(MINIMAL) | {"model": {**MINIMAL["model"], "compile": "maybe"},
                                                    "activation_checkpointing": {"interval": -1}})
    lines = str(e.value).splitlines()[1:]
    assert sorted(line.strip() for line in lines) == [
        "activation_checkpointing.interval: should be 'auto' or greater than or equal to 0 (got -1)",
        "model.compile: should be 'auto' or a valid boolean (got 'maybe')"], lines
    with pytest.raises(ConfigError, match=r"data.prefixes.1: Input should be a valid string \(got 2\)"):
        config_from_dict(copy.deepcopy(MINIMAL) | {"data": {"prefixes": ["a", 2]}})  # list items stay per item
