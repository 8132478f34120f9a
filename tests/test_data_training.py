"""The data path end to end through training: the sample order survives extending a run, and the
end of document is a token (a GPT-2-style tokenizer whose <|endoftext|> is the last id, not 0)
from preprocessing through the loss mask, the HF export and generation.

One 1-rank world (module fixture) runs every training; the tests assert on what it returned.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from _dist import run_distributed
from _tokenizers import gpt2_style_tokenizer
from _train import REPO, config_dict, make_dataset

GPT2_VOCAB = 300  # <|endoftext|> = 299


def _capturing_train(cfg_dict):
    """Train; returns (losses, every global batch served as a list of micro-batch dicts)."""
    from megatron_neox.config import config_from_dict
    from megatron_neox.training import trainer

    batches, step = [], trainer.train_step

    def capture(engine, micro, *rest, **options):
        batches.append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return step(engine, micro, *rest, **options)

    trainer.train_step = capture
    try:
        r = trainer.train(config_from_dict(cfg_dict))
    finally:
        trainer.train_step = step
    return r.losses, batches


def _world(rank, world_size, tmp, gpt2_tokenizer, gpt2_prefix):
    out = {}
    ckpt = lambda name: os.path.join(tmp, name)  # noqa: E731
    # Same seed and data, 3 and 6 iterations; then the 3-iteration run extended to 6 on resume.
    out["three"] = _capturing_train(config_dict(tmp, train__iters=3, checkpoint__dir=ckpt("three")))
    out["six"] = _capturing_train(config_dict(tmp, train__iters=6, checkpoint__dir=ckpt("six")))
    out["extended"] = _capturing_train(config_dict(tmp, train__iters=6, checkpoint__dir=ckpt("three")))
    out["gpt2"] = _capturing_train(config_dict(
        tmp, train__iters=3, checkpoint__dir=ckpt("gpt2"), data__prefixes=[gpt2_prefix],
        tokenizer__path=gpt2_tokenizer, model__vocab_size=GPT2_VOCAB, data__eod_mask_loss=True))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from megatron_neox.data.corpus import iter_corpus, make_sample_corpus
    from megatron_neox.data.preprocess import PreprocessOptions, preprocess

    tmp = tmp_path_factory.mktemp("data_training")
    make_dataset(str(tmp / "data" / "rand"))
    make_sample_corpus(tmp / "corpus", size_mb=0.15, seed=2)
    # "!" is id 0 of a byte-level BPE: every document has some, so the loss mask must tell it from EOD.
    texts = [f"{t} Wow!" for t, _ in iter_corpus(tmp / "corpus" / "sample.jsonl.zst")]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = gpt2_style_tokenizer(texts, GPT2_VOCAB, tmp / "gpt2_style.json")
    preprocess(PreprocessOptions(inputs=[str(corpus)], tokenizer=str(tok), output_prefix=str(tmp / "gpt2"),
                                 append_eod=True, workers=0, progress=False), log=lambda *a: None)
    prefix = str(tmp / "gpt2_text_document")
    results = run_distributed(_world, 1, str(tmp), str(tok), prefix, timeout=600)[0]
    return {"tmp": tmp, "tokenizer": tok, "prefix": prefix, **results}


def _same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for ga, gb in zip(a, b) for x, y in zip(ga, gb) for k in x)


# -- prefix-stable order -------------------------------------------------------------------------


def test_runs_of_3_and_6_iterations_serve_the_same_first_3_batches(world):
    (losses3, batches3), (losses6, batches6) = world["three"], world["six"]
    assert len(batches3) == 3 and len(batches6) == 6
    assert _same_batches(batches3, batches6[:3])
    assert losses3 == losses6[:3]
    assert not _same_batches(batches6[:3], batches6[3:])  # later steps serve other samples


def test_extending_train_iters_on_resume_continues_the_longer_run_exactly(world):
    (losses3, _), (losses6, batches6), (extended, batches_ext) = world["three"], world["six"], world["extended"]
    assert len(extended) == 3  # resumed at step 3
    assert losses3 + extended == losses6
    assert _same_batches(batches_ext, batches6[3:])


# -- EOD by token: a GPT-2-style tokenizer -------------------------------------------------------


def test_append_eod_writes_the_tokenizers_eod_id(world):
    from megatron_neox.data.indexed import IndexedDataset
    from megatron_neox.tokenizer import load_tokenizer

    tok = load_tokenizer(world["tokenizer"])
    assert tok.eod_id == GPT2_VOCAB - 1 and tok.encoder_name == "tiktoken", tok.fast_reason
    ds = IndexedDataset(world["prefix"])
    ends = [int(ds.get_document(j)[-1]) for j in range(ds.num_documents)]
    assert ends == [GPT2_VOCAB - 1] * ds.num_documents


def test_eod_mask_loss_masks_the_eod_token_not_id_0(world):
    _, batches = world["gpt2"]
    micro = [mb for g in batches for mb in g]
    tokens = torch.cat([mb["tokens"] for mb in micro])
    mask = torch.cat([mb["loss_mask"] for mb in micro])
    eod = tokens == GPT2_VOCAB - 1
    assert eod.any() and (tokens == 0).any()  # both ids occur, so the mask must tell them apart
    assert torch.equal(mask == 0, eod)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", Path(REPO) / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_export_names_the_eod_token_id(world):
    out = world["tmp"] / "hf_gpt2"
    assert _tool("convert_to_hf").main(["--checkpoint", str(world["tmp"] / "gpt2"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == GPT2_VOCAB - 1
    assert generation["eos_token_id"] == generation["pad_token_id"] == GPT2_VOCAB - 1
    assert (out / "tokenizer.json").read_bytes() == Path(world["tokenizer"]).read_bytes()


def test_generation_stops_at_the_eod_token_not_at_id_0(world):
    """Rigged head: the final norm outputs a constant e_0 and the output rows are zero, so every
    logit is 0 and greedy decoding picks id 0 (a byte token here) -- which must not stop it. Then
    row EOD gets weight on e_0, greedy picks EOD and generation stops after it."""
    from megatron_neox.generate import generate_ids, generate_text, load_model
    from megatron_neox.tokenizer import load_tokenizer

    tok = load_tokenizer(world["tokenizer"])
    loaded = load_model(world["tmp"] / "gpt2")
    params = dict(loaded.model.named_parameters())
    final_norm = [k for k in params if k.split(".")[1:] == ["norm", "weight"]]  # "{L+1}.norm.weight"
    assert len(final_norm) == 1, list(params)
    norm_w, norm_b = params[final_norm[0]], params[final_norm[0][:-len("weight")] + "bias"]
    head = next(p for k, p in params.items() if k.endswith("final_linear.weight"))
    with torch.no_grad():
        norm_w.zero_()
        norm_b.zero_()
        norm_b[0] = 1.0
        head.zero_()
    assert generate_ids(loaded.model, tok.encode("Hello"), max_new_tokens=4, vocab_size=tok.vocab_size,
                        eod_id=tok.eod_id) == [0, 0, 0, 0]
    with torch.no_grad():
        head[GPT2_VOCAB - 1, 0] = 10.0
    assert generate_ids(loaded.model, tok.encode("Hello"), max_new_tokens=4, vocab_size=tok.vocab_size,
                        eod_id=tok.eod_id) == [GPT2_VOCAB - 1]
    assert generate_text(loaded, tok, "Hello", max_new_tokens=4) == ""
