"""Checkpoints <-> Hugging Face, generation and evaluation, end to end.

One 4-rank world (module fixture) trains two runs at pp=2, tp=2: one from scratch, and one that
continues from a small random HF model imported by tools/convert_from_hf.py. The tests then check
the exports, generation and the tools against Hugging Face on one process.
"""
import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import run_distributed
from _layouts import micro_batches
from _train import REPO, config_dict, load_tool, make_dataset

from megatron_neox.config import ModelConfig
from megatron_neox.convert.checkpoint_io import load_full_state_dict, write_weights_checkpoint
from megatron_neox.errors import CheckpointError, ConfigError
from megatron_neox.generate import generate_ids, greedy_continues_with, load_model

transformers = pytest.importorskip("transformers")


convert_from_hf, convert_to_hf = load_tool("convert_from_hf"), load_tool("convert_to_hf")
evaluate_tool, generate_tool = load_tool("evaluate"), load_tool("generate")

HF_VOCAB = 320  # > the tokenizer's 300 ids: rows 300..319 are padding that generation must never pick
TOKENIZER_VOCAB = 300


# ---- the 4-rank world ------------------------------------------------------------------------


def _world(rank, world_size, scratch_cfg, hf_config_file, hf_overrides):
    """Train both runs; capture the engine (for a loss on a fixed batch) and the first batch."""
    from megatron_neox.config import config_from_dict, load_config
    from megatron_neox.training import trainer
    from megatron_neox.training.step import eval_step

    seen = {}
    build, step = trainer.build_engine, trainer.train_step

    def capture_build(cfg, topo, *rest):
        built = build(cfg, topo, *rest)
        seen.update(engine=built.engine, topo=topo)
        return built

    def capture_step(engine, micro, *rest, **options):
        seen.setdefault("batches", []).append(micro)
        return step(engine, micro, *rest, **options)

    trainer.build_engine, trainer.train_step = capture_build, capture_step
    try:
        cfg = config_from_dict(scratch_cfg)
        scratch = trainer.train(cfg)
        probe = micro_batches(7, cfg, seen["topo"].dp, seen["topo"].dp_rank)
        probe_loss = eval_step(seen["engine"], probe, seen["topo"])
        seen.clear()
        continued = trainer.train(load_config(hf_config_file, hf_overrides))
    finally:
        trainer.build_engine, trainer.train_step = build, step
    return {
        "scratch_losses": scratch.losses, "scratch_eval": scratch.eval_losses, "probe": probe,
        "probe_loss": probe_loss, "hf_losses": continued.losses, "hf_state": continued.state.to_dict(),
        "hf_first_batch": seen["batches"][0],
    }


def _random_hf_model(out: Path, tokenizer_file: Path):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        rotary_pct=0.5, max_position_embeddings=16, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init zeroes biases and sets norms to one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        # Loud padding rows: unmasked, greedy decoding would pick them.
        model.get_output_embeddings().weight[TOKENIZER_VOCAB:] *= 5
    model.save_pretrained(out)
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from megatron_neox.data.corpus import bios_documents
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    tmp = tmp_path_factory.mktemp("convert")
    make_dataset(str(tmp / "data" / "rand"))
    people_and_bios = list(itertools.islice(bios_documents(random.Random(0), 2), 200))
    tok, _ = train_bpe(((bio, None) for _, bio in people_and_bios), TOKENIZER_VOCAB)
    save_tokenizer(tok, tmp / "tokenizer.json")
    facts = tmp / "bios_facts.jsonl"
    people = {p.name: p for p, _ in people_and_bios}
    facts.write_text("".join(json.dumps(p.facts()) + "\n" for p in people.values()))

    hf = _random_hf_model(tmp / "hf_in", tmp / "tokenizer.json")
    assert convert_from_hf.main(["--hf-dir", str(tmp / "hf_in"), "--out", str(tmp / "from_hf"), "--pp", "2",
                                 "--tp", "2", "--config-out", str(tmp / "from_hf.json")]) == 0

    scratch_cfg = config_dict(str(tmp), pp=2, tp=2, train__iters=2, eval__iters=2)
    overrides = [
        f"data.prefixes={json.dumps([str(tmp / 'data' / 'rand')])}", "data.split=90,10,0", "train.iters=2",
        "train.micro_batch_size=2", "train.global_batch_size=8", "optimizer.lr=0.001", "lr_schedule.warmup_iters=1",
        f"checkpoint.dir={tmp / 'hf_run'}", f"log.dir={tmp / 'hf_run_log'}", "eval.iters=1",
    ]
    results = run_distributed(_world, 4, scratch_cfg, str(tmp / "from_hf.json"), overrides, timeout=300)
    return {"tmp": tmp, "hf": hf, "r": results[0], "facts": facts,
            "scratch_ckpt": tmp / "ckpt", "hf_run_ckpt": tmp / "hf_run"}


def _export(world, ckpt: Path, name: str):
    out = world["tmp"] / name
    if not out.exists():
        assert convert_to_hf.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()


def _mean_loss(logits_fn, batches) -> float:
    losses = []
    with torch.no_grad():
        for mb in batches:
            logits = logits_fn(mb["tokens"]).float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
            mask = mb["loss_mask"].flatten()
            losses.append(float((ce * mask).sum() / mask.sum()))
    return sum(losses) / len(losses)


# ---- export to HF ----------------------------------------------------------------------------


def test_pp2_tp2_checkpoint_exports_to_hf_with_same_logits_and_loss(world):
    loaded = load_model(world["scratch_ckpt"])
    hf = _export(world, world["scratch_ckpt"], "hf_scratch")
    tokens = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (3, 16, loaded.padded_vocab)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # The pp=2/tp=2 engine's last-stage loss on a batch is the merged model's and HF's.
    r = world["r"]
    assert _mean_loss(lambda t: hf(t).logits, r["probe"]) == pytest.approx(r["probe_loss"], abs=1e-5)
    assert _mean_loss(loaded.model, r["probe"]) == pytest.approx(r["probe_loss"], abs=1e-5)


def test_export_writes_tokenizer_and_suppresses_padded_ids(world):
    hf = _export(world, world["hf_run_ckpt"], "hf_continued")
    out = world["tmp"] / "hf_continued"
    assert (out / "tokenizer.json").is_file()  # from the run config's tokenizer.path
    assert hf.generation_config.suppress_tokens == list(range(TOKENIZER_VOCAB, HF_VOCAB))


# ---- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("run,export,vocab,stop_at_eod", [
    ("hf_run_ckpt", "hf_continued", TOKENIZER_VOCAB, False),  # loud padding rows: the mask matters
    ("scratch_ckpt", "hf_scratch", 96, True),  # trained on EOD-separated data: stops early
])
def test_greedy_generation_equals_hf_generate_token_for_token(world, run, export, vocab, stop_at_eod):
    loaded = load_model(world[run])
    hf = _export(world, world[run], export)
    g = torch.Generator().manual_seed(5)
    padded_picks, stopped = 0, 0
    for n in (1, 2, 4, 9):
        prompt = torch.randint(1, vocab, (n,), generator=g).tolist()
        eod = 0 if stop_at_eod else None
        ours = generate_ids(loaded.model, prompt, max_new_tokens=20, vocab_size=vocab, eod_id=eod)
        # The scratch run has no tokenizer, so its export names no EOD: the data's (0) is passed.
        kwargs = {"eos_token_id": eod}
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, **kwargs)[0, n:].tolist()
        assert ours == theirs, f"prompt {prompt}"
        assert all(t < vocab for t in ours)
        stopped += len(ours) < 20
        with torch.no_grad():  # would the unmasked argmax have picked a padding id somewhere?
            logits = loaded.model(torch.tensor([prompt + ours[:-1]]))[0, n - 1:]
            padded_picks += int((logits.argmax(-1) >= vocab).sum())
    # The cases must exercise what they are for.
    assert stopped > 0 if stop_at_eod else padded_picks > 0


def test_kv_cache_logits_equal_full_recompute(world):
    model = load_model(world["hf_run_ckpt"]).model
    seq = torch.randint(0, TOKENIZER_VOCAB, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(seq)
        logits, cache = model(seq[:, :5], use_cache=True)
        steps = [logits]
        for t in range(5, 14):
            logits, cache = model(seq[:, t:t + 1], kv_cache=cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_generate_cli_prints_the_greedy_continuation(world, capsys):
    from megatron_neox.tokenizer import load_tokenizer

    ckpt = world["hf_run_ckpt"]
    assert generate_tool.main(["--checkpoint", str(ckpt), "--prompt", "Rosalind was born",
                               "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = load_tokenizer(world["tmp"] / "from_hf" / "tokenizer.json")  # what the run config names
    ids = generate_ids(load_model(ckpt).model, tok.encode("Rosalind was born"), max_new_tokens=6,
                       vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    assert printed == "Rosalind was born" + tok.decode([i for i in ids if i != tok.eod_id])
    sample = ["--checkpoint", str(ckpt), "--prompt", "She", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9",
              "--seed", "3"]
    assert generate_tool.main(sample) == 0
    first = capsys.readouterr().out
    assert generate_tool.main(sample) == 0
    assert capsys.readouterr().out == first, "a seeded sample must repeat"


# ---- import from HF and continue training -----------------------------------------------------


def test_hf_import_trains_from_the_hf_weights(world):
    r = world["r"]
    hf_loss = _mean_loss(lambda t: world["hf"](t).logits, r["hf_first_batch"])
    assert r["hf_losses"][0] == pytest.approx(hf_loss, abs=1e-5), "step 1 must see exactly the HF weights"
    assert r["hf_state"]["iteration"] == 2
    assert r["hf_losses"][1] != r["hf_losses"][0]
    before = load_full_state_dict(world["tmp"] / "from_hf").state_dict
    after = load_full_state_dict(world["hf_run_ckpt"]).state_dict
    assert any(not torch.equal(before[k], after[k]) for k in before), "training must have changed the weights"


@pytest.mark.parametrize("pp,tp,tied", [(1, 1, False), (1, 2, False), (2, 1, True), (3, 2, False)])
def test_weights_checkpoint_roundtrips_every_layout(tmp_path, pp, tp, tied):
    from megatron_neox.model.gpt_neox import GPTNeoX

    model = {"num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 90,
             "make_vocab_size_divisible_by": 8, "tie_embeddings": tied}
    cfg = ModelConfig(**model)
    sd = GPTNeoX(cfg, cfg.padded_vocab(1), seed=2).state_dict()  # padded for tp=1: refit for tp
    out = write_weights_checkpoint(sd, model, tmp_path / "w", pp, tp)
    ck = load_full_state_dict(out)
    padded, back = ck.padded_vocab, ck.state_dict
    assert padded == cfg.padded_vocab(tp) and ck.model.tie_embeddings == tied and ck.run is None
    for k, v in sd.items():
        assert torch.equal(back[k][: v.shape[0]], v), k
    names = {p.name for p in (out / "global_step0").iterdir()}
    assert (f"layer_{cfg.num_layers + 2:02d}-model_00-model_states.pt" in names) == (pp > 1 and not tied)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory may remain"


def test_probe_counts_a_greedy_match_only_when_every_value_token_is_predicted():
    class Oracle(torch.nn.Module):
        """Predicts the next input token (sees the future): greedy 'knows' every target; with
        `miss` it gets the target's last token wrong."""

        def __init__(self, miss):
            super().__init__()
            self.cfg, self.miss = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1, seq_length=32,
                                              vocab_size=40), miss

        def forward(self, tokens):
            nxt = torch.roll(tokens, -1, dims=1)
            if self.miss is not None:
                for b, pos in enumerate(self.miss):
                    nxt[b, pos] = 39
            return torch.nn.functional.one_hot(nxt, 48).float()

    prompts, targets = [[0, 5, 6], [0, 7]], [[8, 9, 10], [11]]
    assert greedy_continues_with(Oracle(None), prompts, targets) == [True, True]
    # Last target token of sequence 0 is predicted at position len(prompt) + len(target) - 2 = 4.
    assert greedy_continues_with(Oracle([4, 0]), prompts, targets) == [False, True]
    assert greedy_continues_with(Oracle([5, 1]), prompts, targets) == [True, False]


# ---- evaluation ------------------------------------------------------------------------------


def test_evaluate_reproduces_the_training_eval_loss(world, capsys):
    assert evaluate_tool.main(["--checkpoint", str(world["scratch_ckpt"]), "--split", "valid", "--iters", "2"]) == 0
    line = capsys.readouterr().out
    loss = float(line.split("loss ")[1].split()[0])
    assert loss == pytest.approx(world["r"]["scratch_eval"][-1], abs=1e-5), line


def test_evaluate_knowledge_probe_prints_accuracy_per_attribute(world, capsys):
    from megatron_neox.data.corpus import ATTRIBUTES

    args = ["--checkpoint", str(world["hf_run_ckpt"]), "--facts", str(world["facts"]), "--people", "5", "--iters", "1"]
    assert evaluate_tool.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("valid: loss ")
    probes = [ln.split() for ln in lines if ln.startswith("probe ")]
    assert [p[1] for p in probes] == [*ATTRIBUTES, "all"]
    assert all(p[2].endswith("/5") for p in probes[:-1]) and probes[-1][2].endswith("/30")


# ---- damaged checkpoints -----------------------------------------------------------------------


def test_damaged_checkpoints_are_clear_errors(world, tmp_path, capsys):
    src = world["scratch_ckpt"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tag = broken / (src / "latest").read_text().strip()
    shard = tag / "layer_03-model_01-model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # As a user runs it: exit status 2, one line naming the file, no traceback.
    proc = subprocess.run([sys.executable, str(Path(REPO) / "tools" / "convert_to_hf.py"), "--checkpoint", str(broken),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "layer_03-model_01-model_states.pt" in proc.stderr and "truncated" in proc.stderr
    assert not (tmp_path / "hf").exists()

    shard.unlink()
    assert convert_to_hf.main(["--checkpoint", str(broken), "--out", str(tmp_path / "hf")]) == 2
    assert "layer_03-model_01-model_states.pt" in capsys.readouterr().err
    (tag / "complete.json").unlink()
    assert convert_to_hf.main(["--checkpoint", str(broken), "--out", str(tmp_path / "hf")]) == 2
    assert "partial" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_full_state_dict(tmp_path / "nowhere")


def test_load_model_in_bf16_keeps_logits_and_refuses_bad_devices(world, capsys):
    ref = load_model(world["hf_run_ckpt"]).model
    half = load_model(world["hf_run_ckpt"], device="cpu", dtype=torch.bfloat16).model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    seq = torch.randint(0, TOKENIZER_VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        # bf16 keeps 8 bits of mantissa: logits of order 1-10 agree to ~2^-8 relative per op.
        torch.testing.assert_close(half(seq).float(), ref(seq), rtol=0, atol=0.1)
    assert torch.get_default_dtype() == torch.float32, "load_model must restore the default dtype"
    with pytest.raises(ConfigError, match="'gpu' is not a device name"):
        load_model(world["hf_run_ckpt"], device="gpu")
    ckpt = str(world["hf_run_ckpt"])
    assert generate_tool.main(["--checkpoint", ckpt, "--prompt", "She", "--max-new-tokens", "3",
                               "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("She")
