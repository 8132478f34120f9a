"""Hostile input through the command-line tools and the trainer: every case ends in a clear error
(exit 2, the path or key named, no traceback) or a said warning, and nothing the user did not ask to
delete is deleted. Each test runs the CLI the way a user meets it (a subprocess)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _train import REPO, config_dict, make_dataset

PYTHON = sys.executable
TOOLS = Path(REPO) / "tools"
TRAIN = os.path.join(REPO, "launch", "train.py")
HF_VOCAB = 320  # the tokenizer below has 300 ids; the model's rows 300..319 are padding


def _run(script, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([PYTHON, str(script), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout)


def _clear_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, an 'error:' line holding every needle, no traceback; returns stderr."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-4000:])
    return r.stderr


def _unwritable_dir(tmp_path: Path) -> Path:
    """An existing directory in which no file can be created. Root ignores permission bits, so as
    root this is /sys (sysfs refuses new files to everyone)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d


def _one_rank_env() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), TORCH_EXTENSIONS_DIR=os.environ.get(
                    "TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions")))


def _train(tmp: Path, *overrides, **cfg_overrides) -> subprocess.CompletedProcess:
    cfg = config_dict(str(tmp), log__peak_tflops=1.0, train__iters=2, **cfg_overrides)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return _run(TRAIN, "--config", path, *overrides, env=_one_rank_env(), timeout=240)


def _write_index(prefix: Path, docs) -> Path:
    from megatron_neox.data.indexed import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetBuilder(str(prefix), np.uint16) as b:
        for d in docs:
            b.add_document(np.asarray(d))
    return prefix


# ---- shared inputs: a tokenizer, a small Hugging Face model, its imported checkpoint -----------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import transformers

    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    tmp = tmp_path_factory.mktemp("robust")
    texts = [f"document {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 13}." for i in range(400)]
    hf_tok, _ = train_bpe(((t, None) for t in texts), 300)
    save_tokenizer(hf_tok, tmp / "tokenizer.json")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    cfg = transformers.GPTNeoXConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(tmp / "hf")
    shutil.copyfile(tmp / "tokenizer.json", tmp / "hf" / "tokenizer.json")
    r = _run(TOOLS / "convert_from_hf.py", "--hf-dir", tmp / "hf", "--out", tmp / "ckpt")
    assert r.returncode == 0, r.stderr
    return tmp


# ---- 1. never delete what the user did not ask to delete ------------------------------------------


def test_convert_to_hf_replaces_only_what_it_may_and_only_with_overwrite(world, tmp_path):
    ckpt = world / "ckpt"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "important.txt").write_text("precious")
    _clear_error(_run(TOOLS / "convert_to_hf.py", "--checkpoint", ckpt, "--out", keep),
                 f"--out {keep}: exists and is not empty", "--overwrite")
    assert (keep / "important.txt").read_text() == "precious"

    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    shutil.copytree(ckpt, run_dir / "ckpt", dirs_exist_ok=True)
    for out, what in ((run_dir, "a training run"), (run_dir / "ckpt", "a checkpoint"),
                      (run_dir / "ckpt" / "global_step0", "a checkpoint")):
        _clear_error(_run(TOOLS / "convert_to_hf.py", "--checkpoint", ckpt, "--out", out, "--overwrite"),
                     f"--out {out}: holds {what}")
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "ckpt" / "latest").read_text() == "global_step0"
    assert (run_dir / "ckpt" / "global_step0" / "complete.json").is_file()

    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    _clear_error(_run(TOOLS / "convert_to_hf.py", "--checkpoint", ckpt, "--out", a_file), "is a file")

    r = _run(TOOLS / "convert_to_hf.py", "--checkpoint", ckpt, "--out", keep, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in keep.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "model.bin", "run"]  # no temporary left


# ---- 3. corrupt or missing checkpoint files ------------------------------------------------------------


def test_changed_or_missing_checkpoint_files_are_named_and_resume_falls_back(tmp_path):
    make_dataset(str(tmp_path / "data" / "rand"))
    r = _train(tmp_path, "--set", "train.iters=4", "checkpoint.save_interval=2")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    missing = tmp_path / "missing"
    shutil.copytree(ckpt, missing)
    (missing / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    shard = ckpt / "global_step4" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 5000] = bytes(5000)  # the zip directory at the end stays intact
    shard.write_bytes(bytes(data))

    for tool, extra in (("convert_to_hf.py", ["--out", tmp_path / "hf"]), ("generate.py", ["--prompt", "x"])):
        _clear_error(_run(TOOLS / tool, "--checkpoint", ckpt, *extra), f"{shard}: entry", "fails its CRC-32 check")
    r = _run(TOOLS / "reshard.py", "--checkpoint", missing, "--out", tmp_path / "universal")
    _clear_error(r, f"{missing / 'global_step4' / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}: missing")
    assert not (tmp_path / "universal").exists()

    for d, why in ((ckpt, "fails its CRC-32 check"), (missing, "zero_pp_rank_0_mp_rank_00_optim_states.pt: missing")):
        r = _train(tmp_path, "--set", "train.iters=5", f"checkpoint.dir={d}", f"log.dir={d}_log")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"cannot resume from global_step4: {d}" in r.stderr and why in r.stderr, r.stderr[-3000:]
        assert "(iteration 2)" in r.stderr
        assert [json.loads(line)["step"] for line in (Path(f"{d}_log") / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)] == [3, 4, 5]


# ---- 4. unwritable outputs ---------------------------------------------------------------------------


def test_every_writing_tool_names_an_unwritable_output(world, tmp_path):
    ro = _unwritable_dir(tmp_path)
    make_dataset(str(tmp_path / "d" / "a"), num_docs=5)
    cases = [
        (TOOLS / "preprocess_data.py", ["--input", world / "corpus.jsonl", "--tokenizer", world / "tokenizer.json",
                                        "--output-prefix", ro / "p", "--workers", "0", "--no-progress"],
         f"output directory {ro} for dataset prefix {ro / 'p'}_text_document: cannot write there"),
        (TOOLS / "merge_datasets.py", ["--inputs", tmp_path / "d" / "a", "--output-prefix", ro / "m"],
         f"output directory {ro} for dataset prefix {ro / 'm'}: cannot write there"),
        (TOOLS / "train_tokenizer.py", ["--input", world / "corpus.jsonl", "--vocab-size", "300",
                                        "--out", ro / "tok.json"], f"{ro / 'tok.json'}"),
        (TOOLS / "make_sample_corpus.py", ["--out", ro / "sample", "--size-mb", "0.01"], f"{ro / 'sample'}"),
        (TOOLS / "convert_to_hf.py", ["--checkpoint", world / "ckpt", "--out", ro / "hf"],
         f"--out {ro / 'hf'}: parent directory {ro}: cannot write there"),
    ]
    for tool, args, needle in cases:
        err = _clear_error(_run(tool, *args), needle)
        assert "Permission denied" in err or "Operation not permitted" in err or "Read-only" in err, err
    assert not list(tmp_path.glob("**/*.tmp-*"))


def test_training_checks_checkpoint_dir_before_building_the_model(tmp_path):
    make_dataset(str(tmp_path / "data" / "rand"))
    ro = _unwritable_dir(tmp_path)
    t0 = time.monotonic()
    r = _train(tmp_path, "--set", f"checkpoint.dir={ro / 'ckpt'}")
    err = _clear_error(r, f"checkpoint.dir {ro / 'ckpt'}: cannot write there")
    assert "parameters" not in r.stdout + err  # the model was never built
    assert time.monotonic() - t0 < 60


def test_training_names_data_cache_dir_when_the_index_cache_cannot_be_written(tmp_path):
    make_dataset(str(tmp_path / "data" / "rand"))
    if os.geteuid() == 0:  # permission bits do not stop root: make the default cache path unusable instead
        (tmp_path / "data" / "index-cache").write_text("not a directory")
    else:
        (tmp_path / "data").chmod(0o555)
    r = _train(tmp_path)
    _clear_error(r, f"index cache {tmp_path / 'data' / 'index-cache'}: cannot write", "set data.cache_dir")
    r = _train(tmp_path, "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr[-3000:]


# ---- 5. corrupt index entries, out-of-range token ids -----------------------------------------------


@pytest.mark.parametrize("field, value, needle", [
    ("pointer", 10**12, "sequence 3 has pointer 1000000000000, expected 18"),
    ("size", -5, "sequence 3 has size -5, expected >= 0"),
    ("size", 10_000, "sequence 4 has pointer 24, expected 20018"),  # an overlong size moves every later pointer
], ids=["pointer", "negative-size", "overlong-size"])
def test_merge_datasets_names_the_corrupt_input_entry_and_writes_nothing(tmp_path, field, value, needle):
    from megatron_neox.data.indexed import _HEADER

    good = _write_index(tmp_path / "good", [[1, 2, 3]] * 6)
    bad = _write_index(tmp_path / "bad", [[1, 2, 3]] * 6)
    idx = bytearray(Path(f"{bad}.idx").read_bytes())
    n = 6
    offset = _HEADER.size + (4 * 3 if field == "size" else 4 * n + 8 * 3)  # entry 3
    idx[offset:offset + (4 if field == "size" else 8)] = np.array([value], "<i4" if field == "size" else "<i8").tobytes()
    Path(f"{bad}.idx").write_bytes(bytes(idx))
    out = tmp_path / "out"
    out.mkdir()
    _clear_error(_run(TOOLS / "merge_datasets.py", "--inputs", good, bad, "--output-prefix", out / "m"),
                 f"{bad}.idx: {needle}")
    assert list(out.iterdir()) == []


def test_token_ids_past_the_vocab_are_named_in_training_and_evaluate(world, tmp_path):
    docs = [[5, 6, 7, 8]] * 40 + [[5, 6, HF_VOCAB + 3, 8]] + [[5, 6, 7, 8]] * 40
    prefix = _write_index(tmp_path / "data" / "rand", docs)
    needle = f"{prefix}.bin: token id {HF_VOCAB + 3} in sequence 40 (document 40, position 2) is outside"
    _clear_error(_train(tmp_path, model__vocab_size=HF_VOCAB), needle, f"[0, {HF_VOCAB})")
    _clear_error(_run(TOOLS / "evaluate.py", "--checkpoint", world / "ckpt", "--data", prefix, "--iters", "1"), needle)


# ---- 6. convert_from_hf with a damaged model; non-finite sampling arguments ---------------------------


@pytest.mark.parametrize("damage", ["config-not-json", "config-bad-value", "weights-truncated"])
def test_convert_from_hf_names_a_damaged_model(world, tmp_path, damage):
    hf = tmp_path / "hf"
    shutil.copytree(world / "hf", hf)
    if damage == "config-not-json":
        (hf / "config.json").write_text('{"model_type": "gpt_neox", "hidden_size": ')
        needle = f"{hf / 'config.json'}: not a usable Hugging Face config"
    elif damage == "config-bad-value":
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
        needle = f"{hf / 'config.json'}:"
    else:
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
        needle = f"{hf / 'model.safetensors'}: unreadable weights"
    _clear_error(_run(TOOLS / "convert_from_hf.py", "--hf-dir", hf, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_generate_rejects_non_finite_sampling_arguments(world):
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")):
        r = _run(TOOLS / "generate.py", "--checkpoint", world / "ckpt", "--prompt", "x", flag, value)
        assert r.returncode == 2 and f"argument {flag}: '{value}': expected a finite number" in r.stderr, r.stderr


# ---- 7. data too small, empty facts, config keys --------------------------------------------------------


def test_too_small_data_and_a_skipped_eval_are_said_and_split_100_works(tmp_path):
    _write_index(tmp_path / "data" / "rand", [[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0]])  # 11 tokens, seq_length 16
    r = _train(tmp_path, "--set", "data.split=100")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "holds 11 tokens, fewer than one sample (model.seq_length + 1 = 17)" in out, out[-3000:]
    assert "data.split='100' leaves no validation documents" in out and "(eval.iters=2) is skipped" in out


def test_evaluate_refuses_an_empty_facts_file(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _clear_error(_run(TOOLS / "evaluate.py", "--checkpoint", world / "ckpt", "--facts", empty),
                 f"{empty}: no facts (an empty file)")


def test_config_duplicate_keys_and_bad_set_values_are_named(tmp_path):
    dup = tmp_path / "dup.json"
    dup.write_text('{"model": {"num_layers": 2,\n  "num_layers": 4}}\n')
    _clear_error(_run(TRAIN, "--config", dup), f"{dup}: duplicate key 'num_layers' (at lines 1, 2)")
    cfg = tmp_path / "ok.json"
    cfg.write_text(json.dumps(config_dict(str(tmp_path))))
    err = _clear_error(_run(TRAIN, "--config", cfg, "--set", "train.iters=abc"),
                       "--set train.iters=abc: train.iters: Input should be a valid integer")
    assert str(cfg) not in err  # the file is not at fault


# ---- 8. a preprocess run killed with SIGKILL --------------------------------------------------------------


def test_preprocess_removes_the_temporaries_of_a_killed_run_and_says_so(world, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"document number {i} " * 400}) + "\n" for i in range(2000)))
    out = tmp_path / "out"
    out.mkdir()
    args = ["--tokenizer", world / "tokenizer.json", "--output-prefix", out / "p", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen([PYTHON, str(TOOLS / "preprocess_data.py"), "--input", str(big), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(".bin.tmp-" in n for n in os.listdir(out)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = sorted(n for n in os.listdir(out) if ".tmp-" in n)
    assert stale and all(f".tmp-{proc.pid}-" in n for n in stale)

    r = _run(TOOLS / "preprocess_data.py", "--input", world / "corpus.jsonl", *args)
    assert r.returncode == 0, r.stderr
    for name in stale:
        assert f"removed {out / name}" in r.stderr and f"left by process {proc.pid}, which no longer runs" in r.stderr
    assert sorted(os.listdir(out)) == ["p_text_document.bin", "p_text_document.idx"]
