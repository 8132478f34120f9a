"""tools/evaluate.py where lm-eval is not installed (a GPU user's plain `pip install -e .`):
perplexity runs, --tasks / --facts exit 2 naming the extra to install, no traceback."""
import os
import subprocess
import sys

import torch

from _train import REPO, make_dataset

# Runs the tool with lm_eval unimportable: None in sys.modules makes `import lm_eval` raise
# ModuleNotFoundError, as on a machine without the package.
RUNNER = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['evaluate.py'] + sys.argv[1:]; "
          "runpy.run_path({tool!r}, run_name='__main__')")


def _run(*args):
    code = RUNNER.format(tool=os.path.join(REPO, "tools", "evaluate.py"))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def _checkpoint(tmp_path):
    from megatron_neox.config import ModelConfig
    from megatron_neox.convert.checkpoint_io import write_weights_checkpoint
    from megatron_neox.model.gpt_neox import GPTNeoX

    model = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 16, "vocab_size": 96,
             "make_vocab_size_divisible_by": 8}
    cfg = ModelConfig(**model)
    torch.manual_seed(0)
    run = {"model": model, "train": {"iters": 1, "micro_batch_size": 2, "global_batch_size": 2},
           "data": {"split": "50,50,0"}}
    return write_weights_checkpoint(GPTNeoX(cfg, cfg.padded_vocab(1)).state_dict(), model, tmp_path / "ckpt",
                                    run_config=run)


def test_valid_split_perplexity_runs_without_lm_eval_and_tasks_name_the_extra(tmp_path):
    ckpt = _checkpoint(tmp_path)
    prefix = make_dataset(str(tmp_path / "data" / "rand"), num_docs=60)
    out = tmp_path / "eval.json"
    ok = _run("--checkpoint", str(ckpt), "--data", prefix, "--split", "valid", "--iters", "2", "--output", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "\nvalid: loss " in "\n" + ok.stdout, ok.stdout
    assert out.exists() and '"perplexity"' in out.read_text()

    for flag, value in (("--tasks", "lambada_openai"), ("--facts", str(tmp_path / "facts.jsonl"))):
        refused = _run("--checkpoint", str(ckpt), flag, value)
        assert refused.returncode == 2, (flag, refused.stderr[-2000:])
        assert f"error: {flag} needs lm-evaluation-harness" in refused.stderr, refused.stderr
        assert "pip install -e .[eval]" in refused.stderr and "Traceback" not in refused.stderr
