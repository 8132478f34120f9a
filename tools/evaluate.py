#!/usr/bin/env python
"""Evaluate a checkpoint: lm-evaluation-harness tasks, perplexity on a dataset split, a BioS probe.

    python tools/evaluate.py --checkpoint runs/demo/checkpoints --tasks lambada_openai,piqa --output eval.json
    python tools/evaluate.py --checkpoint DIR --tasks neox20b --num-fewshot 5 --device cuda --dtype bf16
    python tools/evaluate.py --checkpoint DIR --tasks my_task --include-path my_tasks/ --limit 100
    python tools/evaluate.py --checkpoint runs/demo/checkpoints                   # the run's valid split
    python tools/evaluate.py --checkpoint DIR --data data/other_text_document --split train --iters 20
    python tools/evaluate.py --checkpoint DIR --facts data/sample/bios_facts.jsonl --people 200

The checkpoint may have any layout (pp, tp, ZeRO, universal): its shards are merged as
tools/convert_to_hf.py does and the whole model runs on one device (no launcher, no conversion;
the model must fit that device's memory). The model's own tokenizer (the run config's
tokenizer.path, or --tokenizer) encodes the text, and its end-of-document token is lm-eval's
end of text.

--tasks: lm-eval 0.4.13 task names, comma-separated, or the presets `neox20b` and `gpt3` (the
papers' suites, see README). Prints lm-eval's table; --output writes lm-eval's result JSON
(`results[task]["acc,none"]`, ...) plus our perplexity/probe figures under "megatron_neox".

Perplexity (runs when --split/--data/--iters is given, or when neither --tasks nor --facts is):
--iters global batches of the split (train, valid or test), mean over tokens.

--tasks and --facts need lm-evaluation-harness, an optional extra (`pip install -e .[eval]`);
without it they exit with status 2 and say so, while perplexity runs.

Knowledge probe (--facts): accuracy per attribute, and the knowledge stored in bits and bits
per parameter (Physics of Language Models 3.3; megatron_neox/evaluation/knowledge.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_neox.durable import write_json  # noqa: E402
from megatron_neox.errors import MegatronNeoxError, error_message  # noqa: E402
from megatron_neox.hardware import DTYPES  # noqa: E402



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (follows `latest`) or DIR/global_stepN")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated, or a preset: neox20b, gpt3")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: the task's own)")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="at most this many examples per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="lm-eval's bootstrap iterations for stderrs (default 100000 as lm-eval; 0 skips)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda, cuda:1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--data", nargs="+", metavar="PREFIX", help="dataset prefix(es) instead of the run's data.prefixes")
    p.add_argument("--split", choices=["train", "valid", "test"], help="split for perplexity (default valid)")
    p.add_argument("--iters", type=int, help="global batches for perplexity (default: the run's eval.iters)")
    p.add_argument("--facts", help="bios_facts.jsonl for the knowledge probe")
    p.add_argument("--people", type=int, default=200, help="people to probe (default 200)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run config's tokenizer.path)")
    args = p.parse_args(argv)
    if (args.iters is not None and args.iters < 1) or args.people < 1 or args.batch_size < 1:
        p.error("--iters, --people and --batch-size must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        p.error("--num-fewshot must be >= 0")

    from megatron_neox.data.corpus import check_facts_file
    from megatron_neox.errors import ConfigError
    from megatron_neox.evaluation import require_lm_eval
    from megatron_neox.evaluation.backends import MergedModel
    from megatron_neox.generate import check_tokenizer_fits, load_model, tokenizer_path
    from megatron_neox.tokenizer import load_tokenizer

    report = {}
    try:
        # lm-eval is an optional extra: only the harness (--tasks) and the probe, which scores through
        # the harness adapter (--facts), need it; perplexity runs without it.
        for flag, value in (("--tasks", args.tasks), ("--facts", args.facts)):
            if value:
                require_lm_eval(flag)
        if args.output:
            _check_output_file(Path(args.output))
        tasks = None
        if args.tasks is not None:  # before the model is loaded: a bad task costs seconds, not a whole evaluation
            from megatron_neox.evaluation.harness import check_include_path, check_task_setup, task_manager

            names = [t.strip() for t in args.tasks.split(",") if t.strip()]
            if not names:
                raise ConfigError(f"--tasks {args.tasks!r}: names no task; expected lm-eval task names, comma-separated, "
                                  "or a preset: neox20b, gpt3 (leave --tasks out for perplexity)")
            check_include_path(args.include_path)  # before lm-eval indexes it
            tasks = check_task_setup(names, task_manager(args.include_path, names),
                                     num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path)
        loaded = load_model(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])
        tok_file = args.tokenizer or tokenizer_path(loaded.run)
        tok = load_tokenizer(tok_file, verify=False) if tok_file and Path(tok_file).is_file() else None
        if args.tokenizer and tok is None:
            raise ConfigError(f"{args.tokenizer}: tokenizer file not found")
        if tok is not None:
            check_tokenizer_fits(tok, loaded.padded_vocab)
        if (tasks or args.facts) and tok is None:
            raise ConfigError("--tasks and --facts need a tokenizer: pass --tokenizer (the checkpoint's run config "
                              "names none that exists here)")
        lm = None
        if args.tasks or args.facts:
            from megatron_neox.evaluation.lm import NeoXLM

            lm = NeoXLM(MergedModel(loaded.model, tok.vocab_size, args.device), tok,
                        max_length=loaded.model_config.seq_length, batch_size=args.batch_size)

        if args.split or args.data or args.iters or not (tasks or args.facts):
            from megatron_neox.evaluation.perplexity import perplexity

            split = args.split or "valid"
            r = perplexity(loaded, args.data, split, args.iters, tok, device=args.device)
            report["perplexity"] = {"split": split, **r}
            print(f"{split}: loss {r['loss']:.6f} | ppl {r['ppl']:.3f} | {r['tokens']:,} tokens in "
                  f"{r['batches']} batches of {r['batch_size']} sequences", flush=True)

        if args.facts:
            from megatron_neox.evaluation.knowledge import knowledge_probe

            check_facts_file(args.facts)
            results = knowledge_probe(lm, Path(args.facts), args.people)
            params = sum(t.numel() for t in loaded.model.parameters())
            correct = sum(r.correct for r in results.values())
            total = sum(r.total for r in results.values())
            bits = sum(r.bits for r in results.values())
            for attr, r in results.items():
                print(f"probe {attr:<14} {r.correct:>5}/{r.total:<5} {100.0 * r.correct / max(r.total, 1):6.1f}% "
                      f"{r.bits:12.1f} bits")
            print(f"probe {'all':<14} {correct:>5}/{total:<5} {100.0 * correct / max(total, 1):6.1f}% "
                  f"{bits:12.1f} bits | {bits / params:.3e} bits/parameter ({params:,} parameters)")
            report["knowledge"] = {"attributes": {a: vars(r) for a, r in results.items()}, "bits": bits,
                                   "parameters": params, "bits_per_parameter": bits / params}

        out = None
        if tasks:
            from lm_eval.utils import make_table

            from megatron_neox.evaluation.harness import run_tasks

            out = run_tasks(lm, tasks, num_fewshot=args.num_fewshot, include_path=args.include_path,
                            limit=args.limit, bootstrap_iters=args.bootstrap_iters)
            print(make_table(out))
            if "groups" in out:
                print(make_table(out, "groups"))
        if args.output:
            _write_json(Path(args.output), out, report, args)
    except (MegatronNeoxError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


def _check_output_file(path: Path) -> None:
    """--output must be a file we can create or replace: checked before the evaluation runs."""
    from megatron_neox.errors import ConfigError
    from megatron_neox.outputs import check_writable_dir

    if path.is_dir():
        raise ConfigError(f"--output {path}: is a directory, expected a JSON file to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {path}: {parent} is a file, not a directory")
    check_writable_dir(path.parent, f"--output {path}: directory")


def _write_json(path: Path, out, report: dict, args) -> None:
    """lm-eval's result dict (as its CLI writes it) + ours, via a temporary file and a rename."""
    if out is not None:  # lm-eval ran: its own encoder for its numpy/torch values
        from lm_eval.utils import handle_non_serializable
    else:
        handle_non_serializable = str

    doc = dict(out or {"results": {}})
    doc.pop("samples", None)
    doc["megatron_neox"] = {"checkpoint": str(args.checkpoint), "device": args.device, "dtype": args.dtype, **report}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc, indent=2, default=handle_non_serializable, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
