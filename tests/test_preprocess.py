"""The sample corpus and tools/preprocess_data.py: exact ids, bad input, interruption, outputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer as HFTokenizer

from megatron_neox.data import preprocess as pp
from megatron_neox.data.corpus import (
    ATTRIBUTES, BIOS, GITHUB, GITHUB_PIECE_BYTES, code_pieces, iter_corpus, make_sample_corpus, stdlib_python_files,
)
from megatron_neox.data.indexed import IndexedDataset
from megatron_neox.data.preprocess import PreprocessOptions, preprocess
from megatron_neox.data.readers import iter_documents
from megatron_neox.errors import DataError
from megatron_neox.tokenizer import domain_token, save_tokenizer, train_bpe

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_sample_corpus(out, size_mb=0.4, seed=11)
    return out / "sample.jsonl.zst"


def _train(corpus, path, domain_tokens):
    hf, _ = train_bpe(iter_documents([str(corpus)]), vocab_size=2048, domain_tokens=domain_tokens)
    save_tokenizer(hf, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    return _train(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.json", domain_tokens=True)


def reference(tokenizer_path):
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.encode_special_tokens = True
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def run(inputs, tokenizer, prefix, **kw):
    kw.setdefault("workers", 0)
    opts = PreprocessOptions(inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), output_prefix=str(prefix),
                             progress=False, **kw)
    return preprocess(opts, log=lambda *a: None)


def documents(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds.get_document(j).tolist() for j in range(ds.num_documents)]


def write_jsonl(path, lines):
    """`lines`: dicts (dumped) or raw bytes (written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
    return path


# -- the sample corpus ---------------------------------------------------------------------------


def test_sample_corpus_mixes_component_bytes_evenly_in_every_5_percent_window(tmp_path):
    """Each contiguous 5% of documents (e.g. the valid split of a "949,50,1" split) holds each
    component's share of the text (UTF-8 bytes, what the tokens follow) within 0.5x-2x of its overall
    share. Document counts would not do: whole stdlib files (up to 100 KB) interleaved by count left
    the demo's valid split 0.1% Github by bytes. Measured (1 MB, seed 3): windows 0.32-0.56 Github
    against 0.50 overall, valid split 0.50."""
    make_sample_corpus(tmp_path, size_mb=1.0, seed=3)
    docs = list(iter_corpus(tmp_path / "sample.jsonl.zst"))
    size = np.array([len(t.encode()) for t, _ in docs], dtype=np.int64)
    github = np.where([name == GITHUB for _, name in docs], size, 0)
    n = len(docs)
    window = np.ones(-(-n // 20), dtype=np.int64)
    share = github.sum() / size.sum()
    assert 0.3 < share < 0.7 and n >= 1000  # both components present in force
    per_window = np.convolve(size, window, mode="valid")  # bytes per window start
    github_share = np.convolve(github, window, mode="valid") / per_window
    for got, overall in ((github_share, share), (1 - github_share, 1 - share)):
        assert 0.5 * overall <= got.min() and got.max() <= 2 * overall, (got.min(), got.max(), overall)
    valid = slice(int(0.949 * n), int(0.999 * n))  # the demo's valid split
    assert 0.5 * share <= github[valid].sum() / size[valid].sum() <= 2 * share


def test_sample_corpus_is_deterministic_per_seed(tmp_path):
    def contents(out, seed):
        make_sample_corpus(out, size_mb=0.3, seed=seed)
        return list(iter_corpus(out / "sample.jsonl.zst")), (out / "bios_facts.jsonl").read_text()

    a, b, c = contents(tmp_path / "a", 5), contents(tmp_path / "b", 5), contents(tmp_path / "c", 6)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert sorted(os.listdir(tmp_path / "a")) == ["bios_facts.jsonl", "sample.jsonl.zst"]  # no temp files


def test_sample_corpus_components_and_facts_match_bios(corpus):
    docs = list(iter_corpus(corpus))
    names = {n for _, n in docs}
    assert names == {GITHUB, BIOS}
    total = sum(len(t.encode()) for t, _ in docs)
    assert 0.3e6 < total <= 0.4e6  # the cap holds and is nearly filled

    # Every Github document is a piece of a stdlib file, of bounded size, and no third-party package
    # is among them.
    stdlib_files = stdlib_python_files()
    assert not any(part in ("site-packages", "dist-packages") for p in stdlib_files for part in p.parts)
    stdlib_pieces = set()
    for p in stdlib_files:
        try:
            stdlib_pieces.update(code_pieces(p.read_bytes().decode()))
        except UnicodeDecodeError:
            pass
    github = [t for t, n in docs if n == GITHUB]
    assert github and all(t in stdlib_pieces for t in github)
    assert max(len(t.encode()) for t in github) < 2 * GITHUB_PIECE_BYTES

    facts = [json.loads(line) for line in (corpus.parent / "bios_facts.jsonl").read_text().splitlines()]
    assert facts and all(set(f) == {"name", *ATTRIBUTES, "bios"} for f in facts)
    assert len({f["name"] for f in facts}) == len(facts)  # full names are unique
    by_name = {f["name"]: f for f in facts}
    seen = {name: 0 for name in by_name}
    for text, name in docs:
        if name != BIOS:
            continue
        people = [n for n in by_name if n in text]
        assert len(people) == 1, text
        person = by_name[people[0]]
        seen[people[0]] += 1
        for attr in ATTRIBUTES:
            assert person[attr] in text, (attr, text)
    assert all(seen[n] == by_name[n]["bios"] >= 1 for n in by_name)


def test_make_sample_corpus_tool(tmp_path, capsys):
    import make_sample_corpus as tool

    assert tool.main(["--out", str(tmp_path), "--size-mb", "0.2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "sample.jsonl.zst" in out and "Github" in out and "BioS" in out and "bios_facts.jsonl" in out


# -- exact ids ----------------------------------------------------------------------------------


def test_ids_equal_hf_plus_eod_for_every_document(corpus, tokenizer_path, tmp_path):
    s = run([corpus], tokenizer_path, tmp_path / "out", append_eod=True, block_bytes=64 << 10)
    assert s.encoder.startswith("tiktoken")
    ref = reference(tokenizer_path)
    texts = [t for t, _ in iter_corpus(corpus)]
    got = documents(tmp_path / "out_text_document")
    assert len(got) == len(texts) == s.docs
    for i, text in enumerate(texts):
        assert got[i] == ref(text) + [0], f"document {i}"
    assert s.tokens == sum(map(len, got))
    assert IndexedDataset(str(tmp_path / "out_text_document")).dtype == np.uint16


def test_hf_fallback_ids_equal_hf(corpus, tokenizer_path, tmp_path):
    s = run([corpus], tokenizer_path, tmp_path / "out", append_eod=True, encoder="hf")
    assert s.encoder.startswith("HF tokenizers")
    ref = reference(tokenizer_path)
    assert documents(tmp_path / "out_text_document") == [ref(t) + [0] for t, _ in iter_corpus(corpus)]


def test_worker_processes_give_the_same_output(corpus, tokenizer_path, tmp_path):
    run([corpus], tokenizer_path, tmp_path / "one", append_eod=True)
    s = run([corpus], tokenizer_path, tmp_path / "two", append_eod=True, workers=2, block_bytes=32 << 10)
    assert s.docs > 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one_text_document{ext}").read_bytes() == (tmp_path / f"two_text_document{ext}").read_bytes()


def test_domain_tokens_prepended(corpus, tokenizer_path, tmp_path):
    run([corpus], tokenizer_path, tmp_path / "out", append_eod=True, domain_tokens=True)
    ref = reference(tokenizer_path)
    ids = {n: HFTokenizer.from_file(str(tokenizer_path)).token_to_id(domain_token(n)) for n in (GITHUB, BIOS)}
    expected = [[ids[n]] + ref(t) + [0] for t, n in iter_corpus(corpus)]
    assert documents(tmp_path / "out_text_document") == expected


def test_domain_token_missing_from_tokenizer(corpus, tmp_path):
    plain = _train(corpus, tmp_path / "plain.json", domain_tokens=False)
    with pytest.raises(DataError, match=r"sample\.jsonl\.zst:1: the tokenizer .*plain\.json has no token "
                                        r"'<\|domain:(Github|BioS)\|>' for meta.pile_set_name"):
        run([corpus], plain, tmp_path / "out", domain_tokens=True)
    assert not list(tmp_path.glob("out*"))


# -- inputs -------------------------------------------------------------------------------------


def test_txt_and_glob_inputs(tokenizer_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "b.txt").write_text("second file\nwith two lines\n")
    (d / "a.txt").write_text("first file: café 日本")
    write_jsonl(d / "c.jsonl", [{"text": "from jsonl"}])
    s = run([str(d / "*.txt"), d / "c.jsonl"], tokenizer_path, tmp_path / "out", append_eod=True)
    ref = reference(tokenizer_path)
    assert s.files == 3
    assert documents(tmp_path / "out_text_document") == [
        ref("first file: café 日本") + [0], ref("second file\nwith two lines\n") + [0], ref("from jsonl") + [0]]
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match=r"nothing\*\.jsonl: the pattern matches no file"):
        run([str(d / "nothing*.jsonl")], tokenizer_path, tmp_path / "out")


def test_empty_documents_counted_and_skipped(tokenizer_path, tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": ""}, {"text": " \n\t"}, {"text": "b"}])
    s = run([f], tokenizer_path, tmp_path / "out")
    assert (s.docs, s.empty) == (2, 2)
    assert len(documents(tmp_path / "out_text_document")) == 2


GOOD = [{"text": f"good line {i}"} for i in range(4)]
BAD_LINES = [
    (b'{"text": "unterminated\n', r"malformed JSON \(Unterminated string starting at column 10\)"),
    (b'{"body": "no text"}\n', r"missing key 'text' \(keys found: 'body'\)"),
    (b'{"text": 42}\n', r"'text' is a number, expected a string"),
    (b'{"text": null}\n', r"'text' is null, expected a string"),
    (b'["text"]\n', r"expected a JSON object, found an array"),
    (b'{"text": "caf\xe9"}\n', r"invalid UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": "a \\ud800 b"}\n', r"'text' contains a lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES, ids=[m.split(" ")[0].strip("\\'(") for _, m in BAD_LINES])
def test_bad_line_stops_with_file_and_line(tokenizer_path, tmp_path, bad, message):
    f = write_jsonl(tmp_path / "in.jsonl", [*GOOD, bad, *GOOD])
    # Tiny blocks: line numbers must survive the split into many tasks.
    with pytest.raises(DataError, match=rf"^{f}:5: {message}") as e:
        run([f], tokenizer_path, tmp_path / "out", block_bytes=40)
    assert "--skip-bad-lines" in str(e.value)
    assert not list(tmp_path.glob("out*"))


def test_truncated_zst_stops_with_file_and_line(tokenizer_path, tmp_path):
    lines = b"".join(json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(2000))
    data = zstandard.ZstdCompressor().compress(lines)
    f = tmp_path / "cut.jsonl.zst"
    f.write_bytes(data[:-500])  # zstd emits whole 128 KB blocks: cut inside the last one
    with pytest.raises(DataError, match=rf"^{f}:\d+: truncated zstd stream") as e:
        run([f], tokenizer_path, tmp_path / "out")
    line = int(str(e.value).split(":")[1])
    assert 1 < line < 2000
    assert not list(tmp_path.glob("out*"))
    # With --skip-bad-lines the complete lines before the cut are kept, the cut one is counted.
    s = run([f], tokenizer_path, tmp_path / "out", skip_bad_lines=True)
    assert s.bad_lines == 1 and s.docs == line - 1
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd at all")
    with pytest.raises(DataError, match=rf"^{garbage}:1: corrupt zstd data"):
        run([garbage], tokenizer_path, tmp_path / "out2")


def test_invalid_utf8_txt_names_its_line(tokenizer_path, tmp_path):
    f = tmp_path / "doc.txt"
    f.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError, match=rf"^{f}:2: invalid UTF-8 \(byte 0xff at column 10\)"):
        run([f], tokenizer_path, tmp_path / "out")


def test_skip_bad_lines_counts_and_lists(tokenizer_path, tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], *(b for b, _ in BAD_LINES), GOOD[1]])
    s = run([f], tokenizer_path, tmp_path / "out", skip_bad_lines=True, block_bytes=40)
    assert s.bad_lines == len(BAD_LINES) and s.docs == 2
    assert s.bad_examples[0].startswith(f"{f}:2: malformed JSON")
    assert s.bad_examples[-1].startswith(f"{f}:{len(BAD_LINES) + 1}: ")
    assert "bad lines skipped: 7" in pp.format_summary(s)
    assert len(documents(tmp_path / "out_text_document")) == 2


# -- outputs ------------------------------------------------------------------------------------


def test_split_by_meta_writes_one_dataset_per_component(corpus, tokenizer_path, tmp_path):
    from megatron_neox.data.blended import sanitize_component_name

    s = run([corpus], tokenizer_path, tmp_path / "pile", append_eod=True, split_by_meta="pile_set_name")
    ref = reference(tokenizer_path)
    for name in (GITHUB, BIOS):
        prefix = tmp_path / f"pile_{sanitize_component_name(name)}_text_document"
        want = [ref(t) + [0] for t, n in iter_corpus(corpus) if n == name]
        assert documents(prefix) == want
        assert s.outputs[name, "text"].docs == len(want)
    assert not (tmp_path / "pile_text_document.idx").exists()


def test_multiple_jsonl_keys(tokenizer_path, tmp_path):
    f = write_jsonl(tmp_path / "k.jsonl", [{"text": "body one", "title": "t1"}, {"text": "body two", "title": ""}])
    s = run([f], tokenizer_path, tmp_path / "out", keys=("text", "title"))
    ref = reference(tokenizer_path)
    assert documents(tmp_path / "out_text_document") == [ref("body one"), ref("body two")]
    assert documents(tmp_path / "out_title_document") == [ref("t1")]
    assert s.empty == 1


def test_exception_mid_run_leaves_no_output(corpus, tokenizer_path, tmp_path, monkeypatch):
    calls = []
    real = pp._Writer.__call__

    def failing(self, result):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        real(self, result)

    monkeypatch.setattr(pp._Writer, "__call__", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        run([corpus], tokenizer_path, tmp_path / "out", block_bytes=16 << 10)
    assert os.listdir(tmp_path) == []  # neither final nor temporary files


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_leaves_no_valid_looking_index(tokenizer_path, tmp_path, sig):
    # ~15 MB of input keeps the run busy for seconds, long enough to be killed mid-way.
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"document number {i} " * 400} for i in range(2000)])
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(big), "--tokenizer",
           str(tokenizer_path), "--output-prefix", str(out / "p"), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(".bin.tmp" in n for n in os.listdir(out)):  # writing has started
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    left = os.listdir(out)
    assert not any(n.endswith(".idx") or n.endswith(".bin") for n in left)
    if sig == signal.SIGTERM:  # a catchable signal also cleans up the temporary files
        assert proc.returncode == 130 and b"interrupted" in err
        assert left == []


def test_pipeline_is_bounded_and_ordered():
    """Results may come back in any order; writes happen in input order, and no more than
    max_inflight tasks are ever outstanding (the memory bound)."""

    class ShuffledRunner:
        def __init__(self):
            self.queue, self.max_outstanding = [], 0

        def submit(self, task):
            self.queue.append(task)
            self.max_outstanding = max(self.max_outstanding, len(self.queue))

        def get(self):
            task = self.queue.pop(-1)  # newest first: the worst order for the writer
            return pp.TaskResult(task.seq, task.path)

    runner, written = ShuffledRunner(), []
    tasks = (pp.Task(i, "f", i, "jsonl", b"", 0) for i in range(100))
    pp._run_ordered(tasks, runner, lambda r: written.append(r.seq), max_inflight=4)
    assert written == list(range(100))
    assert runner.max_outstanding <= 4


def test_tool_reports_errors_with_exit_code_2(tokenizer_path, tmp_path, capsys):
    import preprocess_data

    rc = preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer_path),
                               "--output-prefix", str(tmp_path / "o"), "--workers", "0"])
    assert rc == 2 and "missing.jsonl: no such file" in capsys.readouterr().err
    f = write_jsonl(tmp_path / "ok.jsonl", GOOD)
    rc = preprocess_data.main(["--input", str(f), "--tokenizer", str(tokenizer_path), "--output-prefix",
                               str(tmp_path / "o"), "--workers", "0", "--append-eod", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 docs" in out and "empty documents skipped: 0; bad lines skipped: 0" in out


def test_tool_uses_the_fast_path_for_the_gpt_neox_20b_tokenizer(tmp_path, capsys):
    """The acceptance run: tools/preprocess_data.py with GPT-NeoX-20B's tokenizer (the repo's copy)
    reports the fast path, and every document's ids are HF `Tokenizer.encode`'s plus EOD (id 0),
    through spawned workers, on text with NFD, 1-40-space runs, tabs, CRLF, emoji and literal
    special-token text."""
    import preprocess_data
    from _tokenizers import neox20b_tokenizer, whitespace_stress_documents

    tok = neox20b_tokenizer(tmp_path)
    texts = whitespace_stress_documents(300, seed=5)
    f = write_jsonl(tmp_path / "stress.jsonl", [{"text": t} for t in texts])
    rc = preprocess_data.main(["--input", str(f), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "o"),
                               "--workers", "2", "--append-eod", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "encoder: tiktoken fast path with NFC + 23 whitespace tokens" in out, out
    ref = reference(tok)
    assert documents(tmp_path / "o_text_document") == [ref(t) + [0] for t in texts]


def test_code_pieces_rejoin_and_cut_at_top_level_statements():
    text = "import os\n\n\ndef f():\n    return 1\n\n\nclass C:\n    x = 2\n"
    pieces = code_pieces(text, limit=30)
    assert "".join(pieces) == text
    assert pieces == ["import os\n\n\n", "def f():\n    return 1\n\n\n", "class C:\n    x = 2\n"]
