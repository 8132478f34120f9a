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

from _tokenizers import (
    gpt2_style_tokenizer,
    hard_texts,
    llama2_style_tokenizer,
    llama3_style_tokenizer,
    neox20b_tokenizer,
    whitespace_stress_documents,
)

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


# -- the Llama families' tokenizers --------------------------------------------------------------

LLAMA2_BYTE_IDS = range(3, 259)  # <0x00>..<0xFF> follow <unk>, <s>, </s> in Llama-2's vocabulary


@pytest.fixture(scope="module")
def family_tokenizers(corpus, tmp_path_factory):
    """name -> tokenizer.json of each kind, trained on the sample corpus."""
    out = tmp_path_factory.mktemp("families")
    texts = corpus_texts(corpus)
    return {"llama3": llama3_style_tokenizer(texts, 1000, out / "llama3.json"),
            "llama2": llama2_style_tokenizer(texts, 1000, out / "llama2.json"),
            "llama2_metaspace": llama2_style_tokenizer(texts, 1000, out / "llama2_metaspace.json", legacy=False)}


def test_llama3_style_tokenizer_takes_the_fast_path_with_hf_ids(family_tokenizers, corpus):
    path = family_tokenizers["llama3"]
    tok = load_tokenizer(path)
    assert tok.encoder_name == "tiktoken", tok.fast_reason
    assert "its own split regex" in tok.describe_encoder()
    ref = hf_reference(path)
    texts = [*hard_texts(), *whitespace_stress_documents(100, seed=5), *corpus_texts(corpus)[:200]]
    got = tok.encode_batch(texts)
    for text, ids in zip(texts, got):
        assert ids == ref(text), repr(text[:60])
    # Llama-3's regex splits digits in threes (GPT-2's keeps the whole run): the fast path uses the file's regex.
    assert [tok.decode([i]) for i in tok.encode("1234567")][:3] != ["1234567"]
    assert all(len(tok.decode([i])) <= 3 for i in tok.encode("1234567"))


@pytest.mark.parametrize("name", ["llama2", "llama2_metaspace"])
def test_llama2_style_tokenizer_falls_back_to_hf_with_the_reason(family_tokenizers, corpus, name):
    path = family_tokenizers[name]
    tok = load_tokenizer(path)
    assert tok.encoder_name == "hf"
    assert "SentencePiece-style BPE" in tok.fast_reason and "byte fallback" in tok.fast_reason
    assert tok.fast_reason in tok.describe_encoder()
    ref = hf_reference(path)
    texts = [*hard_texts(), *corpus_texts(corpus)[:100]]
    assert tok.encode_batch(texts) == [ref(t) for t in texts]
    # Characters outside its 100-character alphabet take the byte fallback and come back intact.
    rare = "rare: \U0001F9EC \u16A0 日本"
    ids = tok.encode(rare)
    assert sum(i in LLAMA2_BYTE_IDS for i in ids) >= 4 + 3
    assert tok.decode(ids) == rare
    with pytest.raises(ConfigError, match="SentencePiece-style"):
        load_tokenizer(path, encoder="tiktoken")


@pytest.mark.parametrize("name, eod, bos", [
    ("llama3", "<|end_of_text|>", "<|begin_of_text|>"),
    ("llama2", "</s>", "<s>"),
    ("llama2_metaspace", "</s>", "<s>"),
])
def test_family_tokenizer_without_endoftext_uses_its_own_eod_and_bos(family_tokenizers, name, eod, bos):
    tok = load_tokenizer(family_tokenizers[name])
    assert tok.token_to_id(EOD_TOKEN) is None
    assert tok.eod_token == eod and tok.eod_id == tok.token_to_id(eod)
    assert tok.bos_ids == [tok.token_to_id(bos)]
    assert tok.pad_id == tok.eod_id  # no <|padding|>: padding is masked out anyway
    # What HF's own encode adds in front of a text is what bos_ids says.
    hf = HFTokenizer.from_file(str(family_tokenizers[name]))
    assert hf.encode("Hi there").ids[: len(tok.bos_ids)] == tok.bos_ids


def test_eod_is_endoftext_first_and_never_a_learned_text_token(tmp_path, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.eod_token == EOD_TOKEN and tok.bos_ids == []
    # "</s>" as a plain (not special) added token is text, not a document end.
    spec = json.loads(Path(tokenizer_path).read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOD_TOKEN]
    spec["model"]["vocab"].pop(EOD_TOKEN)
    path = tmp_path / "no_eod.json"
    path.write_text(json.dumps(spec))
    hf = HFTokenizer.from_file(str(path))
    hf.add_tokens(["</s>"])
    hf.save(str(path))
    with pytest.raises(DataError, match=r"no_eod.json: tokenizer has none of the end-of-document tokens"):
        load_tokenizer(path).eod_id


@pytest.mark.parametrize("name", ["llama3", "llama2"])
def test_preprocess_writes_bos_text_eod_per_document_as_hf_encodes(family_tokenizers, corpus, tmp_path, name):
    """Each document is HF's encode(text) with the family's special tokens ([BOS] text) plus its EOD;
    --no-bos leaves the BOS out; a domain token goes after the BOS."""
    from megatron_neox.data.indexed import IndexedDataset
    from megatron_neox.data.preprocess import PreprocessOptions, preprocess

    path = family_tokenizers[name]
    tok = load_tokenizer(path)
    hf = HFTokenizer.from_file(str(path))
    hf.encode_special_tokens = True
    docs = [{"text": t, "meta": {"pile_set_name": "BioS"}} for t in [*hard_texts(), *corpus_texts(corpus)[:20]]
            if t.strip()]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))

    def run(prefix, tokenizer=path, **kw):
        preprocess(PreprocessOptions(inputs=[str(src)], tokenizer=str(tokenizer), output_prefix=str(tmp_path / prefix),
                                     append_eod=True, workers=0, progress=False, **kw), log=lambda *a: None)
        ds = IndexedDataset(str(tmp_path / f"{prefix}_text_document"))
        return [ds.get_document(j).tolist() for j in range(ds.num_documents)]

    with_bos = run("bos")
    assert with_bos == [hf.encode(d["text"]).ids + [tok.eod_id] for d in docs]
    assert all(ids[0] == tok.bos_ids[0] for ids in with_bos)
    assert run("nobos", bos=False) == [ids[1:] for ids in with_bos]
    hf.add_special_tokens([domain_token("BioS")])
    hf.save(str(tmp_path / "with_domain.json"))
    domain = hf.token_to_id(domain_token("BioS"))
    assert run("domain", tmp_path / "with_domain.json", domain_tokens=True) == [
        [ids[0], domain, *ids[1:]] for ids in with_bos]
