"""Tokenizer training, the runtime wrapper, and the tiktoken fast path's exactness."""
import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers

from megatron_neox.config import pad_vocab_size
from megatron_neox.data.corpus import iter_corpus, make_sample_corpus
from megatron_neox.data.readers import iter_documents
from megatron_neox.errors import ConfigError, DataError
from megatron_neox.tokenizer import (
    EOD_TOKEN,
    SELF_CHECK_TEXT,
    byte_level_alphabet,
    domain_token,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

from _tokenizers import gpt2_style_tokenizer, neox20b_tokenizer, whitespace_stress_documents

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_sample_corpus(out, size_mb=0.4, seed=7)
    return out / "sample.jsonl.zst"


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    hf, _ = train_bpe(iter_documents([str(corpus)]), vocab_size=2048, domain_tokens=True)
    save_tokenizer(hf, path)
    return path


def hf_reference(path):
    """HF tokenizers with our semantics: special-token text is plain text, nothing added."""
    hf = HFTokenizer.from_file(str(path))
    hf.encode_special_tokens = True
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def corpus_texts(corpus):
    return [text for text, _ in iter_corpus(corpus)]


def save_spec(tmp_path, hf, name="tok.json"):
    path = tmp_path / name
    hf.save(str(path))
    return path


def test_trained_tokenizer_layout(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.eod_id == 0 and tok.pad_id == 1
    assert tok.token_to_id("<|padding|>") == 1
    # 2048 BPE ids, then one special per component of the corpus.
    assert tok.vocab_size == 2048 + 2
    assert tok.token_to_id(domain_token("BioS")) >= 2048
    assert tok.token_to_id(domain_token("Github")) >= 2048
    spec = json.loads(Path(tokenizer_path).read_text())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["decoder"]["type"] == "ByteLevel"


def test_decode_inverts_encode_on_any_text(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.decode(tok.encode(SELF_CHECK_TEXT)) == SELF_CHECK_TEXT
    assert tok.decode([tok.eod_id]) == EOD_TOKEN  # special tokens are not dropped by decode


def test_fast_path_ids_equal_hf_for_every_document(corpus, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.encoder_name == "tiktoken", tok.fast_reason
    ref = hf_reference(tokenizer_path)
    texts = corpus_texts(corpus)
    assert len(texts) > 100
    got = tok.encode_batch(texts)
    for i, text in enumerate(texts):
        assert got[i] == ref(text), f"document {i}"


def test_hf_path_ids_equal_hf_for_every_document(corpus, tokenizer_path):
    tok = load_tokenizer(tokenizer_path, encoder="hf")
    assert tok.encoder_name == "hf"
    ref = hf_reference(tokenizer_path)
    texts = corpus_texts(corpus)
    assert tok.encode_batch(texts) == [ref(t) for t in texts]
    assert tok.encode(texts[0]) == ref(texts[0])


def test_special_token_text_stays_text(tokenizer_path):
    for encoder in ("tiktoken", "hf"):
        tok = load_tokenizer(tokenizer_path, encoder=encoder)
        ids = tok.encode("a <|endoftext|> b <|domain:BioS|>")
        assert tok.eod_id not in ids and tok.token_to_id(domain_token("BioS")) not in ids
        assert tok.decode(ids) == "a <|endoftext|> b <|domain:BioS|>"


def test_added_plain_token_falls_back_to_hf(tmp_path, tokenizer_path):
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.add_tokens(["hello world"])  # HF matches it in the text before the BPE; tiktoken cannot
    path = save_spec(tmp_path, hf)
    tok = load_tokenizer(path)
    assert tok.encoder_name == "hf"
    assert "'hello world' is not a run of 2 or more spaces" in tok.fast_reason
    assert "fast path off" in tok.describe_encoder()
    text = "say hello world twice: hello world\n"
    assert tok.encode(text) == hf_reference(path)(text)
    with pytest.raises(ConfigError, match="cannot reproduce"):
        load_tokenizer(path, encoder="tiktoken")


@pytest.mark.parametrize("runs, flags, reason", [
    ((4,), {}, "runs of [4] spaces, not every length from 2 up"),
    ((2, 3, 4), {"lstrip": True}, "lstrip/rstrip/single_word"),
])
def test_whitespace_tokens_the_fast_path_cannot_match_fall_back(tmp_path, tokenizer_path, runs, flags, reason):
    from tokenizers import AddedToken

    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.add_tokens([AddedToken(" " * n, normalized=True, **flags) for n in runs])
    path = save_spec(tmp_path, hf)
    tok = load_tokenizer(path)
    assert tok.encoder_name == "hf" and reason in tok.fast_reason
    text = "def f():\n        return  1\n"
    assert tok.encode(text) == hf_reference(path)(text)


def test_whitespace_tokens_and_nfc_keep_the_fast_path_exact(tmp_path, tokenizer_path):
    """Our own BPE given GPT-NeoX-20B's pre-BPE steps (NFC + runs of 2..24 spaces as added tokens)."""
    from tokenizers import AddedToken

    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.normalizer = normalizers.NFC()
    hf.add_tokens([AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)])
    path = save_spec(tmp_path, hf)
    tok = load_tokenizer(path)
    assert tok.encoder_name == "tiktoken", tok.fast_reason
    assert "NFC + 23 whitespace tokens" in tok.describe_encoder()
    ref = hf_reference(path)
    texts = whitespace_stress_documents(200, seed=3)
    assert tok.encode_batch(texts) == [ref(t) for t in texts]


def test_normalizer_falls_back_to_hf(tmp_path, tokenizer_path):
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.normalizer = normalizers.Lowercase()
    path = save_spec(tmp_path, hf)
    tok = load_tokenizer(path)
    assert tok.encoder_name == "hf" and "normalizer" in tok.fast_reason
    assert tok.encode("Hello World") == hf_reference(path)("Hello World")


def _abc_tokenizer(merges, extra_vocab):
    """Byte-level BPE over the 256 bytes plus a few merges of a, b, c."""
    vocab = {c: b for b, c in byte_level_alphabet().items()}
    vocab.update(extra_vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return hf


def test_merges_out_of_id_order_fall_back(tmp_path):
    hf = _abc_tokenizer([("a", "b"), ("b", "c")], {"ab": 257, "bc": 256})
    tok = load_tokenizer(save_spec(tmp_path, hf))
    assert tok.encoder_name == "hf" and "not in id order" in tok.fast_reason


def test_self_check_catches_a_merge_tiktoken_would_take(tmp_path):
    # HF merges b+c first and then has no (a, bc) merge: "abc" -> [a, bc]. tiktoken would merge
    # a+bc because "abc" is in its table. The ids follow merge order, so only the check sees it.
    hf = _abc_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")], {"bc": 256, "ab": 257, "abc": 258})
    path = save_spec(tmp_path, hf)
    assert hf_reference(path)("abc") == [ord("a"), 256]
    tok = load_tokenizer(path)
    assert tok.encoder_name == "hf" and "self-check differs" in tok.fast_reason
    assert tok.encode("abc") == [ord("a"), 256]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    bad.write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_pad_vocab_size_follows_megatron():
    assert pad_vocab_size(50277) == 50304
    assert pad_vocab_size(50277, tp=2) == 50432
    assert pad_vocab_size(50304) == 50304


def test_train_tokenizer_tool(tmp_path, capsys):
    import train_tokenizer

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"document {i} about {w}", "meta": {"pile_set_name": p}}
            for i, (w, p) in enumerate([("cats", "Pile-CC"), ("dogs", "FreeLaw")] * 50)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "extra.txt").write_text("plain text file, one document")
    out = tmp_path / "t.json"
    rc = train_tokenizer.main(["--input", str(data), str(tmp_path / "*.txt"), "--vocab-size", "300",
                               "--out", str(out), "--domain-tokens"])
    assert rc == 0
    tok = load_tokenizer(out)
    # This tiny input runs out of pairs before 300: domain tokens follow the BPE vocab, sorted.
    bpe = tok.vocab_size - 2
    assert tok.token_to_id(domain_token("FreeLaw")) == bpe and tok.token_to_id(domain_token("Pile-CC")) == bpe + 1
    printed = capsys.readouterr().out
    assert f"<|domain:FreeLaw|>={bpe}" in printed and "smaller than the requested 300" in printed
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    rc = train_tokenizer.main(["--input", str(tmp_path / "broken.jsonl"), "--vocab-size", "300", "--out", str(out)])
    assert rc == 2
    assert "broken.jsonl:2: malformed JSON" in capsys.readouterr().err


# -- the tokenizers people use: GPT-NeoX-20B's (tests/data) and GPT-2-style ----------------------


@pytest.fixture(scope="module")
def neox20b(tmp_path_factory):
    return neox20b_tokenizer(tmp_path_factory.mktemp("neox20b"))


def test_neox20b_fast_path_ids_equal_hf_for_every_document(neox20b, corpus):
    tok = load_tokenizer(neox20b)
    assert tok.encoder_name == "tiktoken", tok.fast_reason
    assert tok.describe_encoder().startswith("tiktoken fast path with NFC + 23 whitespace tokens")
    assert (tok.eod_id, tok.pad_id, tok.vocab_size) == (0, 1, 50277)
    ref = hf_reference(neox20b)
    texts = whitespace_stress_documents(400) + corpus_texts(corpus)[:300] + SELF_CHECK_TEXT.splitlines()
    got = tok.encode_batch(texts)
    for i, text in enumerate(texts):
        assert got[i] == ref(text), f"document {i}: {text[:80]!r}"
        assert tok.encode(text) == got[i]


def test_neox20b_whitespace_runs_and_nfd_text_take_hf_tokens(neox20b):
    """The cases the fast path had to learn, pinned to HF's ids: 30 spaces are the 24-space token
    (50254) then the 6-space one (50272), and the word after them loses its leading space; 25
    spaces leave one space to the word; NFD text encodes as its NFC form."""
    tok = load_tokenizer(neox20b)
    ref = hf_reference(neox20b)
    x, y, space_y = tok.encode("x")[0], tok.encode("y")[0], tok.encode(" y")[0]
    assert tok.encode("x" + " " * 30 + "y") == ref("x" + " " * 30 + "y") == [x, 50254, 50272, y]
    assert tok.encode("x" + " " * 25 + "y") == ref("x" + " " * 25 + "y") == [x, 50254, space_y]
    assert tok.encode("Cafe\u0301") == ref("Cafe\u0301") == tok.encode("Caf\u00e9")
    assert tok.encode("<|endoftext|>") == ref("<|endoftext|>") and 0 not in tok.encode("<|endoftext|>")


def test_gpt2_style_tokenizer_with_eod_last_takes_the_fast_path(tmp_path, corpus):
    texts = corpus_texts(corpus)
    path = gpt2_style_tokenizer(texts[:200], 600, tmp_path / "gpt2_style.json")
    tok = load_tokenizer(path)
    assert tok.encoder_name == "tiktoken", tok.fast_reason
    assert tok.eod_id == tok.vocab_size - 1 == 599
    assert tok.pad_id == tok.eod_id  # no <|padding|>: padding is EOD (masked out anyway)
    ref = hf_reference(path)
    assert tok.encode_batch(texts) == [ref(t) for t in texts]
    assert tok.eod_id not in tok.encode("a <|endoftext|> b")


def test_vocabulary_check_is_remembered_per_file_and_versions(tmp_path, monkeypatch, tokenizer_path):
    from megatron_neox.tokenizer import Tokenizer, vocab_check_cache_dir

    monkeypatch.setenv("MEGATRON_NEOX_CACHE", str(tmp_path / "cache"))
    checked = []
    vocab_texts = Tokenizer._vocab_texts
    monkeypatch.setattr(Tokenizer, "_vocab_texts", staticmethod(lambda spec: checked.append(1) or vocab_texts(spec)))
    assert load_tokenizer(tokenizer_path).encoder_name == "tiktoken"
    assert load_tokenizer(tokenizer_path).encoder_name == "tiktoken"
    assert len(checked) == 1 and len(list(vocab_check_cache_dir().iterdir())) == 1
    other = HFTokenizer.from_file(str(tokenizer_path))
    other.add_special_tokens(["<|domain:New|>"])  # another file: checked again
    assert load_tokenizer(save_spec(tmp_path, other)).encoder_name == "tiktoken"
    assert len(checked) == 2
    bad = _abc_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")], {"bc": 256, "ab": 257, "abc": 258})
    assert load_tokenizer(save_spec(tmp_path, bad, "bad.json")).encoder_name == "hf"  # a failure is not remembered
    assert len(list(vocab_check_cache_dir().iterdir())) == 2
