#!/usr/bin/env python
"""Import a local Hugging Face directory of GPTNeoXForCausalLM (Pythia, GPT-NeoX-20B), GPTJForCausalLM,
LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM as a checkpoint that training continues from.

    python tools/convert_from_hf.py --hf-dir hf/pythia-160m --out runs/pythia-160m-init --pp 2 --tp 1
    python tools/convert_from_hf.py --hf-dir hf/Qwen2.5-7B --out runs/qwen-init --tp 4 --seq-length 4096
    deepspeed --num_gpus 2 launch/train.py --config runs/pythia-160m-init/train_config.json \\
        --set data.prefixes='["data/pile_00_text_document"]'

Writes OUT/global_step0/ (DeepSpeed's layout for --pp x --tp, weights only), OUT/latest,
OUT/train_config.json (a copy goes to --config-out): its model section is the HF config's, the rest
are defaults for continued pretraining to edit (data.prefixes, train.iters, batch size, lr);
checkpoint.load points at OUT, so the run starts at step 0 from these weights with a fresh
optimizer. OUT/tokenizer.json is copied from the HF directory when it has one. Nothing is downloaded.
A config or checkpoint we cannot reproduce exactly (an unknown rope_scaling type, biases the class
does not have, a head_dim of its own) is refused with exit status 2, naming the field; nothing is written.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402

CONFIG_NAME = "train_config.json"
LONG_CONTEXT = 8192  # a max_position_embeddings above this gets a note: it is a long training sample


def run_config(model: dict, hf_dir: Path, out: Path, pp: int, tp: int, tokenizer: bool) -> dict:
    """A config to continue pretraining from `out`; everything but `model` is a starting point."""
    run_dir = out.with_name(out.name + "-run")
    cfg = {
        "comment": (f"Continued pretraining of {hf_dir} (imported by tools/convert_from_hf.py). The model section "
                    "comes from its config.json; the rest are defaults to edit: data.prefixes (required), "
                    "train.iters and batch size, optimizer.lr (1e-4: below a typical pretraining peak, with a short "
                    "re-warmup, as continued pretraining usually uses), precision (bf16 on GPUs that have it)."),
        "model": model,
        "parallel": {"pp": pp, "tp": tp},
        "train": {"iters": 1000, "micro_batch_size": 4, "global_batch_size": 32, "seed": 1234},
        "optimizer": {"type": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                      "clip_grad": 1.0},
        "lr_schedule": {"decay_style": "cosine", "warmup_iters": 50, "min_lr_ratio": 0.1},
        "precision": "fp32",
        "zero": {"stage": 1},
        "data": {"prefixes": [], "split": "969,30,1"},
        "checkpoint": {"load": str(out), "dir": str(run_dir), "save_interval": 500},
        "log": {"dir": str(run_dir), "interval": 10},
        "eval": {"interval": 500, "iters": 10},
    }
    if tokenizer:
        cfg["tokenizer"] = {"path": str(out / "tokenizer.json")}
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="local Hugging Face model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of the run that will load it (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of that run (default 1)")
    p.add_argument("--config-out", help="also write the training config here")
    p.add_argument("--seq-length", type=int,
                   help="the run's context (model.seq_length; default the HF max_position_embeddings, which is "
                        "131072 for Llama-3.1 and Qwen2.5: longer than most continued pretraining wants)")
    args = p.parse_args(argv)
    if args.seq_length is not None and args.seq_length <= 0:
        p.error(f"--seq-length must be positive, got {args.seq_length}")

    from megatron_neox.config import config_from_dict
    from megatron_neox.convert.checkpoint_io import write_weights_checkpoint
    from megatron_neox.convert.hf import from_hf_state_dict, load_hf

    hf_dir, out = Path(args.hf_dir), Path(args.out).resolve()
    try:
        model, hf_sd = load_hf(hf_dir)
        if args.seq_length is not None:
            model["seq_length"] = args.seq_length
        elif model["seq_length"] > LONG_CONTEXT:
            print(f"note: model.seq_length = {model['seq_length']} (the HF max_position_embeddings): every training "
                  "sample is that long; pass --seq-length, or --set model.seq_length=N when training",
                  file=sys.stderr)
        hf_vocab = model["vocab_size"]
        if hf_vocab % args.tp == 0:
            # Keep exactly HF's rows: our padding rule would add zero rows, whose logits (0) enter the
            # softmax, so the loss would differ from HF's until training pushes them down.
            model["padded_vocab_size"] = hf_vocab
        else:
            print(f"note: HF vocab {hf_vocab} is not divisible by tp={args.tp}; padding it with zero rows",
                  file=sys.stderr)
        tok_src = hf_dir / "tokenizer.json"
        cfg_dict = run_config(model, hf_dir.resolve(), out, args.pp, args.tp, tok_src.is_file())
        cfg = config_from_dict(cfg_dict, source="generated config")  # the layout fits the model
        padded = cfg.model.padded_vocab(args.tp)
        sd = from_hf_state_dict(hf_sd, cfg.model, padded)
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / CONFIG_NAME
            cfg_file.write_text(json.dumps(cfg_dict, indent=2) + "\n")
            extra = {CONFIG_NAME: cfg_file, **({"tokenizer.json": tok_src} if tok_src.is_file() else {})}
            write_weights_checkpoint(sd, model, out, args.pp, args.tp, run_config=cfg_dict, extra_files=extra,
                                     source=str(hf_dir.resolve()))
        if args.config_out:
            Path(args.config_out).write_text(json.dumps(cfg_dict, indent=2) + "\n")
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {out} ({n:,} parameters, pp={args.pp} tp={args.tp}, vocab padded to {padded})")
    print(f"train with: launch/train.py --config {args.config_out or out / CONFIG_NAME} "
          "--set data.prefixes='[\"YOUR_PREFIX\"]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
