#!/usr/bin/env python
"""Evaluate a checkpoint: perplexity on a dataset split, and a BioS knowledge probe.

    python tools/evaluate.py --checkpoint runs/demo/checkpoints                   # the run's valid split
    python tools/evaluate.py --checkpoint DIR --data data/other_text_document --split test --iters 20
    python tools/evaluate.py --checkpoint DIR --facts data/sample/bios_facts.jsonl --people 200

Perplexity: `--iters` batches of the run's global batch size from the split, on one CPU process with
the merged model; the mean is over tokens. The sample order depends on how many samples are drawn,
so with --iters = eval.iters (the default) and a run without eval.interval, these are the batches of
the trainer's final evaluation and the loss is the one it logged.
`--data` replaces the run config's data.prefixes (required when the checkpoint has no run config).

Knowledge probe (`--facts`, written by tools/make_sample_corpus.py): for each of the first
`--people` people and each of the six attributes, the prompt is a bio sentence cut before the value
("Abigail Ada Abernathy was born on"), after an end-of-document token as at the start of a
training document; the answer counts when greedy generation starts with the true value's tokens.
Prints the accuracy per attribute.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.errors import MegatronNeoxError  # noqa: E402

SPLITS = ("train", "valid", "test")


def perplexity(loaded, data_prefixes, split: str, iters, tok) -> dict:
    """{'loss', 'ppl', 'tokens', 'batches', 'batch_size'} over `iters` global batches of `split`."""
    import torch

    from megatron_neox.config import DataConfig
    from megatron_neox.data.loader import BatchLoader, build_datasets, loader_options
    from megatron_neox.errors import ConfigError

    run = loaded.run
    data = run.data.model_copy() if run is not None else DataConfig()
    if data_prefixes:
        data = DataConfig(**{**data.model_dump(), "prefixes": list(data_prefixes), "weights": None})
    if not data.prefixes:
        raise ConfigError("no dataset to evaluate on: the checkpoint's run config has no data.prefixes; "
                          "pass --data PREFIX")
    if run is not None:
        micro = run.train.micro_batch_size
        global_batch = run.layout(run.parallel.pp * run.parallel.tp).global_batch_size
        iters = iters or run.eval.iters
        seed = run.train.seed
    else:
        micro, global_batch, iters, seed = 4, 4, iters or 10, 1234
    batch_options = loader_options(data, tok.eod_id if tok is not None else None, fix="pass --tokenizer")
    index = SPLITS.index(split)
    sizes = tuple(iters * global_batch if i == index else 0 for i in range(3))
    datasets = build_datasets(data, seq_length=loaded.model_config.seq_length, seed=seed, num_samples=sizes,
                              vocab_size=loaded.model_config.vocab_size)
    ds = datasets[index]
    if ds is None:
        raise ConfigError(f"data.split={data.split!r} leaves no documents in the {split} split of {data.prefixes}")
    loader = BatchLoader(ds, micro_batch_size=micro, dp_rank=0, dp_size=1, **batch_options)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for _ in range(iters):
            for mb in loader.next_global_batch(global_batch):
                loss = loaded.model(mb["tokens"], mb["position_ids"], labels=mb["labels"], loss_mask=mb["loss_mask"],
                                    doc_ids=mb.get("doc_ids"))
                n = float(mb["loss_mask"].sum())
                total += float(loss) * n  # the model returns the masked mean: weight it by its tokens
                count += n
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count), "batches": iters,
            "batch_size": global_batch}


def probe_prefixes() -> dict:
    """attribute -> the part before the value of its first template that names the person in full
    and needs no pronoun (the facts file does not record gender)."""
    from megatron_neox.data.corpus import BIO_TEMPLATES, ATTRIBUTES

    out = {}
    for attr in ATTRIBUTES:
        for template in BIO_TEMPLATES[attr]:
            head = template[: template.index("{v}")]
            if head.startswith("{s} ") and head.count("{") == 1:
                out[attr] = head.rstrip()
                break
    return out


def knowledge_probe(loaded, tok, facts_path: Path, people: int) -> dict:
    """attribute -> (correct, total)."""
    from megatron_neox.errors import DataError
    from megatron_neox.generate import greedy_continues_with

    records = []
    with open(facts_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(records) >= people:
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{facts_path}:{lineno}: invalid JSON ({e.msg})") from None
    results = {}
    for attr, head in probe_prefixes().items():
        prompts, targets = [], []
        for lineno, rec in enumerate(records, 1):
            if "name" not in rec or attr not in rec:
                raise DataError(f"{facts_path}:{lineno}: expected keys 'name' and {attr!r} "
                                "(a bios_facts.jsonl from tools/make_sample_corpus.py)")
            prompts.append([tok.eod_id] + tok.encode(head.format(s=rec["name"])))
            # Byte-level BPE keeps the space with the following word, as in the bios themselves.
            targets.append(tok.encode(" " + str(rec[attr])))
        ok = greedy_continues_with(loaded.model, prompts, targets, vocab_size=tok.vocab_size)
        results[attr] = (sum(ok), len(ok))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (follows `latest`) or DIR/global_stepN")
    p.add_argument("--data", nargs="+", metavar="PREFIX", help="dataset prefix(es) instead of the run's data.prefixes")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="split to evaluate (default valid)")
    p.add_argument("--iters", type=int, help="global batches to evaluate (default: the run's eval.iters)")
    p.add_argument("--facts", help="bios_facts.jsonl for the knowledge probe")
    p.add_argument("--people", type=int, default=200, help="people to probe (default 200)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run config's tokenizer.path)")
    args = p.parse_args(argv)
    if (args.iters is not None and args.iters < 1) or args.people < 1:
        p.error("--iters and --people must be >= 1")

    from megatron_neox.data.corpus import check_facts_file
    from megatron_neox.errors import ConfigError
    from megatron_neox.generate import check_tokenizer_fits, load_model, tokenizer_path
    from megatron_neox.tokenizer import load_tokenizer

    try:
        loaded = load_model(args.checkpoint)
        tok_file = args.tokenizer or tokenizer_path(loaded.run)
        tok = load_tokenizer(tok_file, verify=False) if tok_file and Path(tok_file).is_file() else None
        if args.tokenizer and tok is None:
            raise ConfigError(f"{args.tokenizer}: tokenizer file not found")
        if tok is not None:
            check_tokenizer_fits(tok, loaded.padded_vocab)
        has_data = bool(args.data) or (loaded.run is not None and loaded.run.data.prefixes)
        if has_data or not args.facts:
            r = perplexity(loaded, args.data, args.split, args.iters, tok)
            print(f"{args.split}: loss {r['loss']:.6f} | ppl {r['ppl']:.3f} | {r['tokens']:,} tokens in "
                  f"{r['batches']} batches of {r['batch_size']} sequences", flush=True)
        if args.facts:
            if tok is None:
                raise ConfigError("--facts needs a tokenizer: pass --tokenizer (the checkpoint's run config names none "
                                  "that exists here)")
            check_facts_file(args.facts)
            results = knowledge_probe(loaded, tok, Path(args.facts), args.people)
            correct = sum(c for c, _ in results.values())
            total = sum(n for _, n in results.values())
            for attr, (c, n) in results.items():
                print(f"probe {attr:<14} {c:>5}/{n:<5} {100.0 * c / max(n, 1):6.1f}%")
            print(f"probe {'all':<14} {correct:>5}/{total:<5} {100.0 * correct / max(total, 1):6.1f}%")
    except (MegatronNeoxError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
