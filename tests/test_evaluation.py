"""lm-evaluation-harness on our checkpoints: the same numbers as lm-eval's own `hf` backend on the
Hugging Face export, any checkpoint layout, in-training evaluation on the sharded engine, the
presets, and the BioS knowledge in bits.

The local tasks under tests/eval_tasks/ (one each of multiple choice, rolling log-likelihood and
generation) are read offline (HF_DATASETS_OFFLINE=1); their data_files are relative to the
repository root, so every test here runs there.
"""
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import pytest
import torch

from _train import REPO, load_tool

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = ["mnx_choice", "mnx_rolling", "mnx_generate"]
INCLUDE = "tests/eval_tasks"
SEQ = 32  # short, so few-shot contexts are truncated and documents span several rolling windows


evaluate_tool, convert_to_hf = load_tool("evaluate"), load_tool("convert_to_hf")


def _model_dict():
    return {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ, "vocab_size": 300,
            "rotary_pct": 0.5, "make_vocab_size_divisible_by": 8, "intermediate_size": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A BPE tokenizer trained on bios, a random model saved at pp=1, pp=2 and tp=2, its HF export."""
    from megatron_neox.config import ModelConfig
    from megatron_neox.convert.checkpoint_io import write_weights_checkpoint
    from megatron_neox.data.corpus import bios_documents
    from megatron_neox.model.gpt_neox import GPTNeoX
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    tmp = tmp_path_factory.mktemp("evaluation")
    people_and_bios = list(itertools.islice(bios_documents(random.Random(0), 2), 300))
    tok, _ = train_bpe(((bio, None) for _, bio in people_and_bios), 300)
    save_tokenizer(tok, tmp / "tokenizer.json")
    facts = tmp / "bios_facts.jsonl"
    people = {p.name: p for p, _ in people_and_bios}
    facts.write_text("".join(json.dumps(p.facts()) + "\n" for p in people.values()))

    cfg = ModelConfig(**_model_dict())
    torch.manual_seed(0)
    model = GPTNeoX(cfg, cfg.padded_vocab(1))
    with torch.no_grad():  # peaked distributions: choices and greedy tokens are far from ties
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    run = {"model": _model_dict(), "train": {"iters": 1, "micro_batch_size": 1, "global_batch_size": 1},
           "tokenizer": {"path": str(tmp / "tokenizer.json")}}
    ckpts = {}
    for name, pp, tp in (("pp1", 1, 1), ("pp2", 2, 1), ("tp2", 1, 2)):
        ckpts[name] = write_weights_checkpoint(model.state_dict(), _model_dict(), tmp / name, pp=pp, tp=tp,
                                               run_config={**run, "parallel": {"pp": pp, "tp": tp}})
    assert convert_to_hf.main(["--checkpoint", str(ckpts["pp1"]), "--out", str(tmp / "hf")]) == 0
    return {"tmp": tmp, "ckpts": ckpts, "hf": tmp / "hf", "facts": facts}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def _ours(ckpt, **kw):
    from megatron_neox.evaluation.backends import MergedModel
    from megatron_neox.evaluation.harness import run_tasks
    from megatron_neox.evaluation.lm import NeoXLM
    from megatron_neox.generate import load_model, tokenizer_path
    from megatron_neox.tokenizer import load_tokenizer

    loaded = load_model(ckpt)
    tok = load_tokenizer(tokenizer_path(loaded.run), verify=False)
    lm = NeoXLM(MergedModel(loaded.model, tok.vocab_size), tok, max_length=SEQ, batch_size=4, show_progress=False)
    return run_tasks(lm, TASKS, include_path=INCLUDE, bootstrap_iters=0, log_samples=True, **kw)


def _responses(out):
    """task -> [per-document model responses], in document order."""
    got = {}
    for task, samples in out["samples"].items():
        rows = sorted(samples, key=lambda s: s["doc_id"])
        got[task] = [s["resps"] for s in rows]
    return got


def test_local_tasks_match_lm_eval_hf_backend(setup, capsys):
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    ours = _ours(setup["ckpts"]["pp1"])
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['hf']},dtype=float32", device="cpu",
                                     batch_size=4, tasks=TASKS, task_manager=TaskManager(include_path=INCLUDE),
                                     bootstrap_iters=0, log_samples=True)
    theirs_s = time.perf_counter() - start
    worst = 0.0
    for task in TASKS:
        a, b = ours["results"][task], theirs["results"][task]
        for key, value in b.items():
            if key == "alias" or "stderr" in key:
                continue
            if not isinstance(value, float):
                assert a[key] == value, f"{task} {key}"
            elif key.startswith(("acc", "exact_match")):
                assert a[key] == value, f"{task} {key}"
            else:
                assert a[key] == pytest.approx(value, rel=1e-4), f"{task} {key}"
                worst = max(worst, abs(a[key] - value) / abs(value))
    # Per request: every log-likelihood within 1e-4 relative, greedy flags and generations identical.
    ra, rb = _responses(ours), _responses(theirs)
    for task in ("mnx_choice", "mnx_rolling"):
        flat_a = [r for doc in ra[task] for resp in doc for r in (resp if isinstance(resp, list) else [resp])]
        flat_b = [r for doc in rb[task] for resp in doc for r in (resp if isinstance(resp, list) else [resp])]
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b):
            x, y = (x, None) if not isinstance(x, (list, tuple)) else x, (y, None) if not isinstance(y, (list, tuple)) else y
            assert x[0] == pytest.approx(y[0], rel=1e-4)
            worst = max(worst, abs(x[0] - y[0]) / abs(y[0]))
            assert x[1] == y[1]
    assert ra["mnx_generate"] == rb["mnx_generate"]
    # The cases must exercise what they are for: non-empty generations, several rolling windows.
    assert any(doc[0][0].strip() for doc in ra["mnx_generate"])
    from megatron_neox.tokenizer import load_tokenizer

    tok = load_tokenizer(setup["tmp"] / "tokenizer.json", verify=False)
    docs = [json.loads(line)["text"] for line in open(Path(INCLUDE) / "mnx_rolling.jsonl")]
    assert min(len(tok.encode(d)) for d in docs) > 2 * SEQ
    with capsys.disabled():
        print(f"\nparity vs lm-eval hf backend: worst relative difference {worst:.2e}; "
              f"ours {ours_s:.1f} s, hf {theirs_s:.1f} s")
        for task in TASKS:
            print(f"  {task}: " + ", ".join(f"{k}={v:.6g}" for k, v in ours["results"][task].items()
                                             if isinstance(v, float)))


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_evaluate_cli_on_pp2_and_tp2_checkpoints(setup, layout, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(setup["ckpts"][layout]), "--tasks", ",".join(TASKS), "--include-path", INCLUDE,
            "--bootstrap-iters", "0", "--output", str(out)]
    assert evaluate_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "mnx_choice" in printed and "|acc" in printed.replace(" ", "")  # lm-eval's table
    doc = json.loads(out.read_text())
    reference = _ours(setup["ckpts"]["pp1"])["results"]
    for task in TASKS:
        for key, value in reference[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert doc["results"][task][key] == pytest.approx(value, rel=1e-5), f"{layout} {task} {key}"
    assert set(doc["results"]["mnx_choice"]) >= {"acc,none", "acc_norm,none"}


def test_knowledge_probe_reports_bits(setup, capsys, monkeypatch):
    """The tool end to end with a scorer of known answers in place of the model (a random model scores
    0 bits everywhere, where a wrong formula or prompt would still give 0): people 0-2 are known with
    CE = 1 bit on the true value, people 3-4 guessed worse than uniformly. Each (prompt, target) pair
    must be the person's own prompt for the attribute and the true value with its leading space, else
    it scores nothing. Expected per attribute: 3/5 correct, 3 * (log2 N - 1) bits."""
    from megatron_neox.evaluation.knowledge import probe_prefixes, value_counts
    from megatron_neox.evaluation.lm import NeoXLM

    facts = [json.loads(line) for line in setup["facts"].read_text().splitlines()][:5]
    counts = value_counts()
    asked = []

    def known_answers(lm, prompts, targets):
        out = []
        for prompt, target in zip(prompts, targets):
            text, value = lm.tokenizer.decode(prompt[1:]), lm.tokenizer.decode(target)
            hits = [(i, a) for i, f in enumerate(facts) for a, head in probe_prefixes().items()
                    if prompt[0] == lm.tokenizer.eod_id and text == head.format(s=f["name"]) and value == f" {f[a]}"]
            asked.extend(hits)
            known = len(hits) == 1 and hits[0][0] < 3
            out.append((-math.log(2), True) if known else (-math.log(counts[hits[0][1]] if hits else 2) - 1, False))
        return out

    monkeypatch.setattr(NeoXLM, "score_pairs", known_answers)
    args = ["--checkpoint", str(setup["ckpts"]["pp1"]), "--facts", str(setup["facts"]), "--people", "5"]
    assert evaluate_tool.main(args) == 0
    assert sorted(asked) == sorted((i, a) for i in range(5) for a in probe_prefixes())  # each pair once
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("probe ")]
    assert [ln[1] for ln in lines][-1] == "all"
    bits = {ln[1]: float(ln[4]) for ln in lines}
    correct = {ln[1]: ln[2] for ln in lines}
    want = {a: 3 * max(0.0, math.log2(n) - 1) for a, n in counts.items()}
    assert bits.pop("all") == pytest.approx(sum(want.values()), abs=0.1)
    assert bits == pytest.approx(want, abs=0.06)  # printed to 0.1 bit
    assert bits["birth_date"] > 30 and bits["employer_city"] == 0.0  # a function of the employer
    assert correct == {**{a: "3/5" for a in counts}, "all": f"{3 * len(counts)}/{5 * len(counts)}"}


def test_knowledge_bits_formula_on_a_model_that_knows_and_one_that_guesses(tmp_path):
    """bits = sum max(0, log2 N - CE): a certain model stores log2 N per fact, a uniform one none."""
    from megatron_neox.evaluation import knowledge

    class FakeLM:
        def __init__(self, logprob):
            self.logprob = logprob
            self.tokenizer = type("T", (), {"eod_id": 0, "bos_ids": [], "encode": staticmethod(lambda s: [1, 2])})()

        def score_pairs(self, prompts, targets):
            return [(self.logprob, self.logprob == 0.0)] * len(prompts)

    facts = tmp_path / "facts.jsonl"
    rows = [{"name": f"P{i}", **{a: "x" for a in knowledge.probe_prefixes()}} for i in range(3)]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = knowledge.value_counts()
    knows = knowledge.knowledge_probe(FakeLM(0.0), facts, 3)
    assert {a: r.bits for a, r in knows.items()} == pytest.approx({a: 3 * math.log2(n) for a, n in counts.items()})
    guess = knowledge.knowledge_probe(FakeLM(-math.log(counts["birth_date"])), facts, 3)
    assert all(r.bits == pytest.approx(0.0, abs=1e-9) for r in guess.values())


def test_knowledge_probe_prompts_start_as_training_documents_do(tmp_path):
    """The prompt starts with EOD by default, and with `doc_start` (EOD + a domain token, say) when given."""
    from megatron_neox.evaluation import knowledge

    seen = []

    class RecordingLM:
        tokenizer = type("T", (), {"eod_id": 0, "bos_ids": [], "encode": staticmethod(lambda s: [7])})()

        def score_pairs(self, prompts, targets):
            seen.extend(prompts)
            return [(0.0, True)] * len(prompts)

    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"name": "P", **{a: "x" for a in knowledge.probe_prefixes()}}) + "\n")
    knowledge.knowledge_probe(RecordingLM(), facts, 1)
    assert {tuple(p) for p in seen} == {(0, 7)}
    seen.clear()
    knowledge.knowledge_probe(RecordingLM(), facts, 1, doc_start=[0, 99])
    assert {tuple(p) for p in seen} == {(0, 99, 7)}


def test_presets_name_tasks_of_the_installed_lm_eval():
    from megatron_neox.evaluation.harness import task_manager
    from megatron_neox.evaluation.presets import PRESETS, expand_tasks

    known = set(task_manager(INCLUDE).all_tasks)  # lm-eval's own tasks too; the index is cached
    for name, tasks in PRESETS.items():
        assert tasks and not [t for t in tasks if t not in known], name
    assert expand_tasks(["piqa", "neox20b"])[0] == "piqa" and "mmlu" in expand_tasks(["neox20b"])


def test_local_tasks_are_indexed_without_lm_evals_own():
    """Tasks all in the include path index that directory alone (lm-eval's ~5 s index of its own tasks
    is skipped on every rank); a built-in task, a preset or no names get the whole index."""
    from megatron_neox.evaluation.harness import task_manager

    own = task_manager(INCLUDE, TASKS)
    assert sorted(own.all_tasks) == sorted(TASKS) and own is task_manager(INCLUDE, TASKS[:1])
    whole = task_manager(INCLUDE)
    assert "piqa" in whole.all_tasks and set(TASKS) <= set(whole.all_tasks)
    assert task_manager(INCLUDE, ["mnx_choice", "piqa"]) is whole and task_manager(INCLUDE, ["neox20b"]) is whole


def test_unknown_task_is_a_clear_error(setup, capsys):
    args = ["--checkpoint", str(setup["ckpts"]["pp1"]), "--tasks", "mnx_choise", "--include-path", INCLUDE]
    assert evaluate_tool.main(args) == 2
    err = capsys.readouterr().err
    assert "mnx_choise" in err and "mnx_choice" in err and "Traceback" not in err


# ---- in-training evaluation on the sharded engine ------------------------------------------------


PROMPTS = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(1))
SCORED = torch.randint(1, 300, (3, 12), generator=torch.Generator().manual_seed(2))


def _train_with_tasks(rank, world_size, cfg_dict):
    """Train with eval.tasks; then the engine's own scores and greedy generations (sharded)."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.evaluation.backends import EngineModel
    from megatron_neox.training import trainer

    seen = {}
    build = trainer.build_engine

    def capture(cfg, topo, *args, **kwargs):
        built = build(cfg, topo, *args, **kwargs)
        seen["engine"], seen["topo"] = built[0], topo
        return built

    trainer.build_engine = capture
    try:
        state = trainer.train(config_from_dict(cfg_dict)).state.to_dict()
    finally:
        trainer.build_engine = build
    backend = EngineModel(seen["engine"], seen["topo"], 300)
    logprob, best = backend.score(SCORED[:, :-1], SCORED[:, 1:])
    generated = backend.generate(PROMPTS, 6, lambda row, ids: False)
    return state, logprob, best, generated


@pytest.mark.parametrize("pp,tp,interval", [(2, 2, 1), (1, 2, None)])
def test_training_logs_harness_metrics_equal_to_merged_evaluation(setup, tmp_path, capsys, pp, tp, interval):
    """The harness on the sharded engine (logits vocab-parallel; at pp=2 on the last stage only):
    the metrics logged after the last step, the scores and the greedy generations equal those of
    the merged model (tools/evaluate.py) on the checkpoint saved at that step."""
    from _dist import run_distributed
    from _train import config_dict, make_dataset

    from megatron_neox.evaluation.backends import MergedModel
    from megatron_neox.generate import load_model

    make_dataset(str(tmp_path / "data" / "rand"))
    cfg = config_dict(str(tmp_path), pp=pp, tp=tp, train__iters=2, model__vocab_size=300, model__seq_length=SEQ,
                      tokenizer__path=str(setup["tmp"] / "tokenizer.json"), eval__tasks=TASKS,
                      eval__include_path=INCLUDE, eval__tasks_interval=interval, eval__tasks_limit=4)
    start = time.perf_counter()
    state, logprob, best, generated = run_distributed(_train_with_tasks, pp * tp, cfg, timeout=600)[0]
    wall = time.perf_counter() - start
    assert state["iteration"] == 2
    merged = MergedModel(load_model(tmp_path / "ckpt").model, 300)
    ref_logprob, ref_best = merged.score(SCORED[:, :-1], SCORED[:, 1:])
    torch.testing.assert_close(logprob, ref_logprob, rtol=0, atol=1e-5)
    assert torch.equal(best, ref_best)
    assert generated == merged.generate(PROMPTS, 6, lambda row, ids: False)
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    harness = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in harness] == ([1, 2] if interval else [2])  # null: after the last step only
    logged = harness[-1]
    for key in ("eval/mnx_choice/acc", "eval/mnx_choice/acc_norm", "eval/mnx_rolling/word_perplexity",
                "eval/mnx_rolling/bits_per_byte", "eval/mnx_generate/exact_match"):
        assert key in logged, key
    if interval:
        assert harness[0] != {**logged, "step": 1}, "the weights changed between the two evaluations"

    out = tmp_path / "merged.json"
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", ",".join(TASKS), "--include-path",
                               INCLUDE, "--limit", "4", "--bootstrap-iters", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for key, value in logged.items():
        if not key.startswith("eval/"):
            continue
        _, task, metric = key.split("/")
        assert results[task][f"{metric},none"] == pytest.approx(value, rel=1e-4), key
    with capsys.disabled():
        print(f"\nin-training harness evaluation at pp={pp} tp={tp}: 2 steps + {len(harness)} evaluation(s) in {wall:.1f} s")

    # Perplexity on the train split of the run's data (issue 13): the run config names the data.
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--split", "train", "--iters", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("train: loss ")

    plot = load_tool("plot_metrics")
    assert plot.main([str(tmp_path / "log"), "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_tasks_without_a_tokenizer_is_refused_when_the_config_loads(tmp_path):
    from _train import config_dict

    from megatron_neox.config import config_from_dict
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.tasks needs tokenizer.path"):
        config_from_dict(config_dict(str(tmp_path), eval__tasks=["piqa"]))
    assert config_from_dict(config_dict(str(tmp_path), eval__tasks=["piqa"], tokenizer__path="t.json")).eval.tasks


def test_sampled_generation_repeats_with_the_seed_and_training_refuses_it(setup):
    from lm_eval.api.instance import Instance

    from megatron_neox.errors import ConfigError
    from megatron_neox.evaluation.backends import EngineModel, MergedModel
    from megatron_neox.evaluation.lm import NeoXLM
    from megatron_neox.generate import load_model
    from megatron_neox.tokenizer import load_tokenizer
    from megatron_neox.topology import Topology

    tok = load_tokenizer(setup["tmp"] / "tokenizer.json", verify=False)
    model = load_model(setup["ckpts"]["pp1"]).model
    sample = {"until": ["\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 6}
    requests = [Instance("generate_until", {}, (f"{name} works for", dict(sample)), 0)
                for name in ("Ada Lovelace", "Alan Turing", "Grace Hopper")]

    def run(seed):
        lm = NeoXLM(MergedModel(model, tok.vocab_size), tok, max_length=SEQ, seed=seed, show_progress=False)
        return lm.generate_until(requests)

    first = run(1)
    assert run(1) == first and run(2) != first
    greedy = [Instance("generate_until", {}, (r.args[0], {"until": ["\n"], "max_gen_toks": 6}), 0) for r in requests]
    lm = NeoXLM(MergedModel(model, tok.vocab_size), tok, max_length=SEQ, show_progress=False)
    assert lm.generate_until(greedy) != first  # sampling did sample
    with pytest.raises(ConfigError, match="greedily only"):
        EngineModel(None, Topology.single(), tok.vocab_size).generate(PROMPTS, 2, lambda row, ids: False,
                                                                       temperature=1.0)
