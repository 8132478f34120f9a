#!/usr/bin/env python
"""Knowledge capacity of GPT-2-style and Llama-style models: the seed experiment of Physics of
Language Models 3.3 (Allen-Zhu & Li, "Physics of Language Models: Part 3.3, Knowledge Capacity
Scaling Laws", 2024), on the built-in biographies corpus.

    python benchmarks/knowledge_capacity.py                     # CPU default: ~10 min on 1 core
    python benchmarks/knowledge_capacity.py --people 16000 --exposures 1000 --device cuda   # at capacity: GPUs
    python benchmarks/knowledge_capacity.py --scale 16 --people 16000 --device cuda  # 4x wider, 256k people

The paper's findings, at capacity: trained with ~1000 exposures per person a model stores ~2 bits
per parameter; at 100 exposures a gated-MLP (Llama) model stores ~1.3x fewer bits per parameter
than a GPT-2-style one; with junk data mixed in capacity drops, and a domain token in front of
every document restores much of it.

What runs, for each architecture x condition, through the product's own path:
- data: `make_sample_corpus` (BioS + the stdlib's Python sources as the "junk"), one BPE trained
  with a domain token per component (`train_bpe`), `preprocess` (EOD after each document, and
  `<|domain:NAME|>` before it in the domain-token condition);
- training: a config file and `launch/train.py` in a subprocess (DeepSpeed engine, AdamW, cosine
  schedule), iterations set so every probed person (all 5 bios in the corpus) is seen
  `--exposures` times, whatever the share of junk;
- probe: the checkpoint loaded with `load_model` and scored with `knowledge_probe`
  (megatron_neox/evaluation/knowledge.py): bits = sum over people and attributes of
  max(0, log2 N_a - CE), bits/parameter over all parameters (embeddings included).

Architectures, same parameter count (the Llama MLP width is chosen to match GPT-2's total):
- gpt2: LayerNorm, tanh-GELU MLP of 4x width with biases, biases in attention, sequential residual;
- llama: RMSNorm, SwiGLU of ~8/3 x width, no biases, sequential residual.
Both use rotary positions on every head dim (`--gpt2-positions learned` gives GPT-2 its learned
table; Llama's width then absorbs the difference) and untied input/output embeddings, so the
comparison isolates the norm, the MLP gate and the biases.

At the CPU default the models are far from capacity (~250k parameters, ~1,800 bits to learn): the
figures show the pipeline and the relative order at 100 exposures, not the paper's 2 bits/param,
which needs more people than parameters / 19 (37.6 bits a person at 2 bits a parameter) and ~1000
exposures (`--people`, `--scale`, `--exposures` on a GPU).

Conditions: `clean` (BioS only), `junk` (half the bytes are stdlib code), `junk+domain` (the same
plus `<|domain:BioS|>` / `<|domain:Github|>` before each document; the probe's prompt then starts as
a training BioS document does: EOD, domain token). Domain tokens on BioS-only data would put one
token before every document; the paper asks what they do in a mix, so that run is not made.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_neox.durable import write_json, write_text  # noqa: E402

ARCHS = ("gpt2", "llama")
CONDITIONS = ("clean", "junk", "junk+domain")
BIOS_PER_PERSON = 5  # make_sample_corpus's default: 5 bios per person ("bioS multi5" in the paper)
BIO_BYTES = 330  # about the mean UTF-8 size of one bio (measured on the corpus generator)


def arch_model(arch: str, hidden: int, layers: int, heads: int, seq: int, vocab: int,
               positions: str = "rotary") -> dict:
    """The model section of one architecture (Llama's MLP width matched afterwards)."""
    common = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "seq_length": seq,
              "vocab_size": vocab, "position_embedding": "rotary", "rotary_pct": 1.0,
              "parallel_residual": False, "tie_embeddings": False,
              "init_method": "normal", "output_layer_init_method": "scaled_normal"}
    if arch == "gpt2":
        return {**common, "position_embedding": positions, "norm": "layernorm", "activation": "gelu_tanh",
                "attention_bias": True, "mlp_bias": True}
    return {**common, "norm": "rmsnorm", "activation": "swiglu", "attention_bias": False, "mlp_bias": False}


def param_count(model: dict) -> int:
    from megatron_neox.config import ModelConfig
    from megatron_neox.model.gpt_neox import count_parameters

    return count_parameters(ModelConfig(**model))["total"]


def match_llama_width(llama: dict, target: int) -> dict:
    """`llama` with the SwiGLU width (near 8/3 x hidden) whose total is closest to `target`."""
    d = llama["hidden_size"]
    guess = round(8 * d / 3)
    best = min(range(max(1, guess - 2 * d), guess + 2 * d),
               key=lambda f: abs(param_count({**llama, "intermediate_size": f}) - target))
    return {**llama, "intermediate_size": best}


def build_data(out: Path, people: int, junk_fraction: float, vocab: int, seed: int) -> dict:
    """Corpora, one tokenizer, the three datasets, and the facts of the people to probe."""
    from megatron_neox.data.corpus import make_sample_corpus
    from megatron_neox.data.preprocess import PreprocessOptions, preprocess
    from megatron_neox.data.readers import iter_documents
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    # `people` bios are shuffled together (one chunk); the cap holds about that chunk's
    # BIOS_PER_PERSON bios each (~300-350 bytes a bio). Only people with all their bios in both
    # corpora are probed, so each was seen exactly `exposures` times.
    bios_mb = people * BIOS_PER_PERSON * BIO_BYTES / 1e6
    made = {"clean": make_sample_corpus(out / "clean", size_mb=bios_mb, seed=seed, github_fraction=0.0,
                                        chunk_people=people),
            # The same people: the BioS stream is drawn independently of the Github share (corpus.py).
            "junk": make_sample_corpus(out / "junk", size_mb=bios_mb / (1 - junk_fraction), seed=seed,
                                       github_fraction=junk_fraction, chunk_people=people)}
    tok_path = out / "tokenizer.json"
    # One vocabulary for every run (trained on the mixed corpus, with both domain tokens), so the
    # parameter counts and the probe's tokens are the same in all of them.
    hf, _ = train_bpe(iter_documents([str(made["junk"].corpus_path)]), vocab_size=vocab, domain_tokens=True)
    save_tokenizer(hf, tok_path)
    data = {}
    for cond, corpus, domain in (("clean", "clean", False), ("junk", "junk", False), ("junk+domain", "junk", True)):
        prefix = out / cond.replace("+", "_")
        s = preprocess(PreprocessOptions(inputs=[str(made[corpus].corpus_path)], tokenizer=str(tok_path),
                                         output_prefix=str(prefix), append_eod=True, workers=0,
                                         domain_tokens=domain, progress=False))
        data[cond] = (f"{prefix}_text_document", s.tokens)
    complete = [{json.loads(line)["name"]: json.loads(line) for line in open(m.facts_path, encoding="utf-8")}
                for m in made.values()]
    probed = [rec for name, rec in complete[0].items()
              if rec["bios"] == BIOS_PER_PERSON and complete[1].get(name, {}).get("bios") == BIOS_PER_PERSON]
    facts = out / "probed_facts.jsonl"
    write_text(facts, "".join(json.dumps(rec) + "\n" for rec in probed))
    return {"data": data, "tokenizer": tok_path, "facts": facts, "people": len(probed)}


def run_config(run_dir: Path, model: dict, prefix: str, tok_path: Path, iters: int, args) -> dict:
    return {
        "comment": "benchmarks/knowledge_capacity.py",
        "model": model,
        "parallel": {"pp": 1, "tp": 1},
        "train": {"iters": iters, "micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch,
                  "seed": args.seed},
        # The repo's AdamW defaults (DESIGN.md: GPT-3's betas), at the demo config's lr for tiny models.
        "optimizer": {"type": "adamw", "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                      "clip_grad": 1.0},
        "lr_schedule": {"decay_style": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1},
        "precision": args.precision,
        "zero": {"stage": "auto"},
        # Every document trains (the probe measures memorisation, not generalisation).
        "data": {"prefixes": [prefix], "split": "1000,0,0", "cache_dir": str(run_dir / "index_cache")},
        "tokenizer": {"path": str(tok_path)},
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "save_interval": iters, "keep_last": 1},
        "log": {"dir": str(run_dir), "interval": max(1, iters // 10)},
    }


def train(run_dir: Path, cfg: dict, threads: int) -> float:
    """Train through launch/train.py (one rank); returns the last logged loss."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    write_json(cfg_path, cfg, indent=2)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    with open(run_dir / "train.log", "w") as log:
        r = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(cfg_path)],
                           cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"training failed (exit {r.returncode}); see {run_dir / 'train.log'}")
    losses = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")
              if '"loss"' in line and json.loads(line).get("loss") is not None]
    return losses[-1] if losses else float("nan")


def probe(run_dir: Path, tok_path: Path, facts: Path, people: int, domain: bool, device: str) -> dict:
    from megatron_neox.evaluation.backends import MergedModel
    from megatron_neox.evaluation.knowledge import knowledge_probe
    from megatron_neox.evaluation.lm import NeoXLM
    from megatron_neox.generate import load_model
    from megatron_neox.tokenizer import domain_token, load_tokenizer

    loaded = load_model(run_dir / "checkpoints", device=device)
    tok = load_tokenizer(tok_path, verify=False)
    lm = NeoXLM(MergedModel(loaded.model, tok.vocab_size, device), tok, max_length=loaded.model_config.seq_length,
                batch_size=64, show_progress=False)
    start = [tok.eod_id] + ([tok.token_to_id(domain_token("BioS"))] if domain else [])
    results = knowledge_probe(lm, facts, people, doc_start=start)
    params = sum(t.numel() for t in loaded.model.parameters())
    bits = sum(r.bits for r in results.values())
    correct, total = sum(r.correct for r in results.values()), sum(r.total for r in results.values())
    return {"params": params, "bits": bits, "bits_per_param": bits / params, "accuracy": correct / max(total, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/knowledge_capacity", help="work directory (data, runs, results.json)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies the people by scale and the hidden size by sqrt(scale) "
                        "(x4: twice the width, four times the facts); for GPUs")
    p.add_argument("--people", type=int, default=48, help="people at scale 1 (5 bios each)")
    p.add_argument("--exposures", type=int, default=100, help="times each person's bios are seen (paper: 100, 1000)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size at scale 1")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (the junk corpus's)")
    p.add_argument("--junk-fraction", type=float, default=0.5, help="share of the junk corpus's bytes that is code")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--gpt2-positions", choices=["rotary", "learned"], default="rotary")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--device", default="cpu", help="device of the probe (training uses the launcher's)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    archs, conds = args.archs.split(","), args.conditions.split(",")
    if set(archs) - set(ARCHS) or set(conds) - set(CONDITIONS) or not 0 < args.junk_fraction < 1:
        p.error(f"--archs from {ARCHS}, --conditions from {CONDITIONS}, --junk-fraction in (0, 1)")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    d = build_data(out / "data", max(1, round(args.people * args.scale)), args.junk_fraction, args.vocab, args.seed)
    hidden = int(round(args.hidden * math.sqrt(args.scale) / args.heads)) * args.heads
    gpt2 = arch_model("gpt2", hidden, args.layers, args.heads, args.seq, args.vocab + 2, args.gpt2_positions)
    models = {"gpt2": gpt2, "llama": match_llama_width(arch_model("llama", hidden, args.layers, args.heads,
                                                                   args.seq, args.vocab + 2), param_count(gpt2))}
    print(f"data: {d['people']:,} people probed, {d['data']['clean'][1]:,} BioS tokens, "
          f"built in {time.time() - t0:.0f} s; "
          f"hidden {hidden}, llama intermediate {models['llama']['intermediate_size']}", flush=True)

    results = []
    for cond in conds:
        prefix, tokens = d["data"][cond]
        # Every token of the corpus is seen exposures / BIOS_PER_PERSON times: each probed person
        # `exposures` times in all, whatever the share of junk. A sample takes seq new tokens.
        iters = math.ceil(tokens * args.exposures / BIOS_PER_PERSON / (args.global_batch * args.seq))
        for arch in archs:
            run_dir = out / f"{arch}_{cond.replace('+', '_')}"
            t1 = time.time()
            loss = train(run_dir, run_config(run_dir, models[arch], prefix, d["tokenizer"], iters, args),
                         args.threads)
            r = probe(run_dir, d["tokenizer"], d["facts"], d["people"], cond.endswith("domain"), args.device)
            r.update(arch=arch, condition=cond, iters=iters, loss=loss, seconds=time.time() - t1)
            results.append(r)
            print(f"{arch:<6} {cond:<12} {r['params']:>10,} params  {iters:>6} iters  loss {loss:6.3f}  "
                  f"acc {100 * r['accuracy']:5.1f}%  {r['bits']:>10,.0f} bits  {r['bits_per_param']:.4f} bits/param  "
                  f"({r['seconds']:.0f} s)", flush=True)

    by = {(r["arch"], r["condition"]): r for r in results}
    for cond in conds:
        g, l = by.get(("gpt2", cond)), by.get(("llama", cond))
        if g and l and l["bits"] > 0:
            print(f"{cond}: gpt2 / llama bits = {g['bits'] / l['bits']:.2f}")
    from megatron_neox.evaluation.knowledge import value_counts

    ceiling = d["people"] * sum(math.log2(n) for n in value_counts().values())
    print(f"most bits any model can show here: {ceiling:,.0f} ({d['people']:,} people); "
          f"total {time.time() - t0:.0f} s", flush=True)
    write_json(out / "results.json", {"args": vars(args), "people": d["people"], "ceiling_bits": ceiling,
                                      "results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
