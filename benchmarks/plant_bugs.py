"""Planted bugs: does each critical rule have a test that fails when the rule is broken?

Each mutation below replaces one exact piece of source text with a plausible bug, in a temporary
copy of the repository (the files git tracks or would track; the checkout itself is never
touched), and runs the tests that claim to cover that rule against the copy. A mutation is
*caught* when those tests fail (pytest exit 1), *slipped* when they pass. Its text must occur
exactly once in its file: code moves, and a mutation whose target is gone or ambiguous is
reported *stale* rather than silently skipped -- refresh it to the code's new form.

Before the mutations, every selected test runs once on an unmutated copy (the baseline): a test
that already fails would make every mutation look caught. Slow (real multi-rank runs): not part of
`make test`.

    python benchmarks/plant_bugs.py                    # every mutation, then the table
    python benchmarks/plant_bugs.py --list             # names and rules only
    python benchmarks/plant_bugs.py --check            # is every target text still there? (no tests)
    python benchmarks/plant_bugs.py --only rotary_interleaved local_window_plus_one --no-baseline

Exit status 0 when every mutation was caught, 1 when any slipped, was stale, or the baseline or a
run broke (collection error, timeout).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    rule: str                 # the rule the mutation breaks
    file: str                 # relative to the repository root
    old: str                  # exact text, present exactly once in `file`
    new: str
    tests: Tuple[str, ...]    # pytest arguments: test files / node ids, optionally "-k", EXPR


PRECISION = ("tests/test_precision.py",)
BAND = ("tests/test_attention.py", "-k", "band")
FINALIZE = ("tests/test_long_runs.py", "-k", "durably or finalize")
PROBE = ("tests/test_evaluation.py", "-k", "knowledge")

# Tried and left out: grad_accum_dtype bf16 under bf16 moves the tiny runs' losses by less than
# bf16's own rounding, so no test here tells it apart (a gap, not a catch); counting a global_stepN
# without complete.json as complete changes nothing a user sees (the loader reads complete.json,
# fails, and falls back to the next older tag).
MUTATIONS: Tuple[Mutation, ...] = (
    # -- half precision: the learning rate actually applied ------------------------------------------
    Mutation("bf16_lr_x0.1", "bf16 trains at the configured learning rate", "megatron_neox/training/engine.py",
             '"params": {"lr": o.lr,', '"params": {"lr": o.lr * (0.1 if cfg.precision == "bf16" else 1.0),',
             PRECISION),
    Mutation("fp16_lr_x0.5", "fp16 trains at the configured learning rate", "megatron_neox/training/engine.py",
             '"params": {"lr": o.lr,', '"params": {"lr": o.lr * (0.5 if cfg.precision == "fp16" else 1.0),',
             PRECISION),
    Mutation("fp16_no_loss_scale", "fp16 scales the loss (dynamic scale from 2**initial_scale_power)",
             "megatron_neox/training/engine.py", '"loss_scale": ls.static_scale,', '"loss_scale": 1.0,', PRECISION),
    # -- the sample corpus: each split holds each component's share of the tokens --------------------
    Mutation("corpus_whole_files", "Github documents are <= 4 KB pieces, so every split holds its token share",
             "megatron_neox/data/corpus.py", "GITHUB_PIECE_BYTES = 4096", "GITHUB_PIECE_BYTES = 10**7",
             ("tests/test_preprocess.py", "-k", "sample_corpus")),
    # -- local attention: token i sees j iff i - W < j <= i -------------------------------------------
    Mutation("local_window_plus_one", "the band is local_window wide (every kernel)", "megatron_neox/model/attention.py",
             "self.window = cfg.local_window if", "self.window = cfg.local_window + 1 if", BAND),
    Mutation("sdpa_band_inclusive", "the SDPA band is local_window wide", "megatron_neox/model/attention.py",
             "allowed = allowed & (dist < window)", "allowed = allowed & (dist <= window)", BAND),
    Mutation("flex_band_inclusive", "the FlexAttention band is local_window wide", "megatron_neox/model/attention.py",
             "ok = ok & (q_idx - kv_idx < window)", "ok = ok & (q_idx - kv_idx <= window)", BAND),
    Mutation("flash_window_size", "flash-attn's window_size=(W-1, 0) is a band W wide", "megatron_neox/model/attention.py",
             "window = (mask.window - 1, 0)", "window = (mask.window, 0)", BAND),
    # -- checkpoints: durable files, complete.json before latest, old markers before old files ---------
    Mutation("latest_before_complete", "complete.json is durable before `latest` names the tag",
             "megatron_neox/training/checkpoint.py",
             "    with naming_failures(ckpt_dir / tag / COMPLETE):\n"
             "        fsync_dir(ckpt_dir / tag)\n"
             "        write_meta(ckpt_dir / tag, pending.meta)\n"
             "    with naming_failures(ckpt_dir / LATEST):\n"
             "        write_latest(ckpt_dir, tag)\n",
             "    with naming_failures(ckpt_dir / LATEST):\n"
             "        write_latest(ckpt_dir, tag)\n"
             "    with naming_failures(ckpt_dir / tag / COMPLETE):\n"
             "        fsync_dir(ckpt_dir / tag)\n"
             "        write_meta(ckpt_dir / tag, pending.meta)\n", FINALIZE),
    Mutation("old_files_before_marker", "an old checkpoint loses its complete.json before its files",
             "megatron_neox/training/checkpoint.py",
             '            with naming_failures(ckpt_dir / old / COMPLETE, "removing an old checkpoint (keep_last)"):\n'
             "                (ckpt_dir / old / COMPLETE).unlink()\n"
             "                fsync_dir(ckpt_dir / old)\n"
             "            shutil.rmtree(ckpt_dir / old, ignore_errors=True)\n",
             "            shutil.rmtree(ckpt_dir / old, ignore_errors=True)\n", FINALIZE),
    Mutation("no_file_fsync", "a durable file is fsynced before its rename", "megatron_neox/durable.py",
             "        _fsync_file(Path(tmp))\n", "        pass\n", FINALIZE),
    Mutation("no_dir_fsync", "a durable rename is made durable (directory fsync)", "megatron_neox/durable.py",
             "        fsync_dir(Path(path).resolve().parent)\n", "        pass\n", FINALIZE),
    Mutation("copy_not_rename", "a finished temporary file is renamed into place (atomic write), not copied",
             "megatron_neox/durable.py", "    os.replace(tmp, path)\n", '    __import__("shutil").copyfile(tmp, path)\n',
             FINALIZE),
    Mutation("complete_before_durable", "an async checkpoint is declared complete only once every file is durable",
             "megatron_neox/training/checkpointer.py",
             "if self.pending is not None and not writing:", "if self.pending is not None:",
             ("tests/test_long_runs.py", "-k", "no_rank_is_still_writing")),
    Mutation("save_live_tensors", "an async save writes a snapshot taken at the save, not the live tensors",
             "megatron_neox/training/writer.py", 'return obj.detach().to("cpu", copy=True)', "return obj.detach()",
             ("tests/test_long_runs.py", "-k", "durably")),
    Mutation("resume_oldest_first", "a relaunch resumes from the newest complete checkpoint",
             "megatron_neox/training/checkpoint.py",
             "    order = [tag] if tag is not None else []\n"
             "    order += [t for t in reversed(complete_tags(load_dir)) if t != tag]\n",
             "    order = [t for t in complete_tags(load_dir) if t != tag] + ([tag] if tag is not None else [])\n",
             ("tests/test_launch.py", "-k", "kill_9")),
    # -- the knowledge probe ----------------------------------------------------------------------------
    Mutation("probe_bits_in_nats", "knowledge is counted in bits (log2)", "megatron_neox/evaluation/knowledge.py",
             "logprob / math.log(2)", "logprob", PROBE),
    Mutation("probe_target_without_space", "the probe's target is the value after a space (byte-level BPE)",
             "megatron_neox/evaluation/knowledge.py", 'tok.encode(" " + str(rec[attr]))', "tok.encode(str(rec[attr]))",
             PROBE),
    # -- the model ------------------------------------------------------------------------------------------
    Mutation("rotary_interleaved", "rotary pairs (i, i + d/2) (rotate half, HF GPT-NeoX), not GPT-J's (2i, 2i+1)",
             "megatron_neox/model/rotary.py",
             "x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]",
             "x1, x2, rest = x[..., 0:2 * half:2], x[..., 1:2 * half:2], x[..., 2 * half:]",
             ("tests/test_hf_parity.py",)),
    Mutation("vocab_padding_ignores_tp", "the vocab is padded to a multiple of 128 x tp", "megatron_neox/config.py",
             "    step = multiple * tp\n", "    step = multiple\n", ("tests/test_tokenizer.py", "-k", "pad_vocab")),
    Mutation("qkv_split_per_block", "a TP rank's rows of the fused QKV hold whole heads ([head][q|k|v])",
             "megatron_neox/parallel/sharding.py",
             'return rule.dim, 2 if rule.fused_swiglu and cfg.activation == "swiglu" else 1',
             'return rule.dim, 3 if "query_key_value" in name else 2 if rule.fused_swiglu and cfg.activation == "swiglu" else 1',
             ("tests/test_sharding.py",)),
    Mutation("compiled_biases_summed_in_graph", "compiled layers accumulate each output bias's gradient once "
             "(Inductor returned one buffer for both when they were summed in the graph)",
             "megatron_neox/model/transformer.py",
             "bias = self.output_bias() if self.parallel_residual else None",
             "bias = None", ("tests/test_lean_layer.py", "-k", "compiled_layers")),
    Mutation("replicated_kv_bias_grads_not_summed", "replicated KV heads (tp > KV heads) sum their bias gradients "
             "over the TP group too (Qwen2)", "megatron_neox/model/transformer.py",
             "sum_grads_over_tensor_parallel_group(self.key_value.parameters(), tp_group)",
             "sum_grads_over_tensor_parallel_group([self.key_value.weight], tp_group)",
             ("tests/test_model_families_parallel.py", "-k", "qwen2")),
    Mutation("loss_mask_mean_over_all_tokens", "the loss is the mean over the tokens whose loss_mask is 1",
             "megatron_neox/model/gpt_neox.py", "/ loss_mask.sum().clamp(min=1.0)", "/ loss_mask.numel()",
             ("tests/test_attention.py", "-k", "loss")),
    # -- the training loop --------------------------------------------------------------------------------
    Mutation("warmup_off_by_one", "warmup reaches lr * (i + 1) / warmup_iters at step i (no zero-lr step)",
             "megatron_neox/training/schedules.py", "return self.peak * (iteration + 1) / self.warmup_iters",
             "return self.peak * iteration / self.warmup_iters", ("tests/test_schedules.py",)),
    Mutation("cosine_to_zero", "cosine decay ends at min_lr (10% of the peak), not 0", "megatron_neox/training/schedules.py",
             "return self.min_lr + (self.peak - self.min_lr) * factor", "return self.peak * factor",
             ("tests/test_schedules.py",)),
    Mutation("resume_from_sample_0", "a resumed run continues at the saved data position",
             "megatron_neox/training/trainer.py", "        self.loader.load_state_dict(self.state.data_position())\n",
             "", ("tests/test_training.py", "-k", "resume_is_exact_on_one_rank")),
)


# ---- running them ------------------------------------------------------------------------------------


def tracked_files(repo: str) -> List[str]:
    """What git tracks or would track (untracked files that are not ignored too): the repository
    as a fresh clone plus uncommitted work; never .venv, caches or run outputs."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(repo, p))]


def copy_repo(repo: str, dest: str) -> None:
    for rel in tracked_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target)


def stale(m: Mutation, root: str) -> Optional[str]:
    """Why `m` cannot be planted in the tree at `root` (its file or exact text is gone, or the text is
    ambiguous), else None."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return f"{m.file} does not exist"
    with open(path, encoding="utf-8") as f:
        n = f.read().count(m.old)
    return None if n == 1 else f"{m.file}: the target text occurs {n} times (expected once): {m.old.strip()[:60]!r}"


def apply(m: Mutation, root: str) -> Optional[str]:
    """Plant `m` in the copy at `root`; None on success, else why it is stale."""
    why = stale(m, root)
    if why is None:
        path = os.path.join(root, m.file)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(m.old, m.new))
    return why


def run_tests(root: str, tests: Sequence[str], timeout: float) -> Tuple[int, float, str]:
    """pytest on the copy at `root` (imports resolve to the copy); (exit code, seconds, output tail)."""
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, f"timed out after {timeout:.0f} s"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode, time.monotonic() - start, tail


def check_imports_from(root: str) -> None:
    """The copy's tests must import the copy's package, not an installed one."""
    env = dict(os.environ, PYTHONPATH=root)
    got = subprocess.run([sys.executable, "-c", "import megatron_neox; print(megatron_neox.__file__)"], cwd=root,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.realpath(got).startswith(os.path.realpath(root) + os.sep):
        raise SystemExit(f"megatron_neox imports from {got}, not from the copy {root}: an installed package "
                         "shadows PYTHONPATH")


def baseline_args(mutations: Sequence[Mutation]) -> List[List[str]]:
    """One pytest invocation per distinct test selection (each -k applies to its own files)."""
    seen: List[List[str]] = []
    for m in mutations:
        if list(m.tests) not in seen:
            seen.append(list(m.tests))
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--check", action="store_true", help="only check that every target text is still there")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)

    mutations = list(MUTATIONS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            print(f"unknown mutation(s) {unknown}; known: {[m.name for m in MUTATIONS]}", file=sys.stderr)
            return 2
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list or args.check:
        problems = [(m, stale(m, REPO) if args.check else None) for m in mutations]
        for m, why in problems:
            print(f"{m.name:<32} {m.file:<40} {'STALE: ' + why if why else m.rule}")
        return 1 if any(why for _, why in problems) else 0

    failed = False
    with tempfile.TemporaryDirectory(prefix="plant_bugs_") as tmp:
        base = os.path.join(tmp, "base")
        copy_repo(REPO, base)
        check_imports_from(base)
        if not args.no_baseline:
            for tests in baseline_args(mutations):
                rc, secs, tail = run_tests(base, tests, args.timeout)
                print(f"baseline {' '.join(tests):<60} {'pass' if rc == 0 else f'FAIL (exit {rc})'} {secs:6.0f} s",
                      flush=True)
                if rc != 0:
                    print(tail)
                    failed = True
            if failed:
                print("the unmutated tests fail: a mutation's failure would mean nothing")
                return 1

        rows = []
        for m in mutations:
            root = os.path.join(tmp, m.name)
            shutil.copytree(base, root)
            why = apply(m, root)
            if why:
                verdict, secs, tail = "STALE", 0.0, why
            else:
                rc, secs, tail = run_tests(root, m.tests, args.timeout)
                verdict = {0: "SLIPPED", 1: "caught"}.get(rc, f"ERROR (exit {rc})")
            rows.append((m, verdict, secs))
            print(f"{m.name:<32} {verdict:<16} {secs:6.0f} s  {' '.join(m.tests)}", flush=True)
            if verdict == "caught":  # by which test (pytest -q's summary line)
                failed_by = [ln for ln in tail.splitlines() if ln.startswith("FAILED ")][:1]
                print("    " + (failed_by[0][:150] if failed_by else "(no FAILED line)"), flush=True)
            if verdict != "caught":
                print("    " + tail.replace("\n", "\n    "))
                failed = True
            shutil.rmtree(root, ignore_errors=True)

    caught = sum(v == "caught" for _, v, _ in rows)
    print(f"\n{caught}/{len(rows)} planted bugs caught")
    for m, verdict, _ in rows:
        print(f"  {verdict:<16} {m.name:<32} {m.rule}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
