"""Tokenize raw documents into MMIDIDX datasets: `{prefix}_{key}_document.{bin,idx}`.

Inputs are `.jsonl`, `.jsonl.zst` (Pile shards) and `.txt` (one document per file). The pipeline:

    main process: read + decompress -> blocks of whole lines (~1 MB)  --bounded-->  workers
    workers:      split lines, parse JSON, validate, encode the block's documents as one batch
    main process: <--bounded-- token arrays, written in input order through IndexedDatasetBuilder

Memory stays bounded whatever the input size: at most `2 * workers + 2` blocks are in flight
(read, queued, being encoded or waiting to be written in order), and no file is read whole
(except a `.txt`, which is one document). Batching a block per task is what makes the workers
fast: one task costs one pickle round trip and one Python-level loop, not one per document.

Outputs are written under temporary names and renamed only when the whole run succeeded, so an
exception, Ctrl-C or SIGTERM leaves no `.idx` that looks complete.
"""
from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zstandard

from megatron_neox.data.blended import sanitize_component_name
from megatron_neox.data.indexed import IndexedDatasetBuilder, best_dtype
from megatron_neox.errors import ConfigError, DataError
from megatron_neox.tokenizer import domain_token, load_tokenizer

SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
BLOCK_BYTES = 1 << 20
_READ_BYTES = 1 << 20  # raw reads of plain files
_ZST_READ_BYTES = 1 << 17  # compressed reads: text expands ~3-5x, so blocks stay near 1 MB
_SKIP_HINT = "pass --skip-bad-lines to skip such lines and count them"
# A JSON "\udXXX" escape can produce a lone surrogate, which is not text (HF tokenizers rejects
# it and tiktoken silently replaces it): treat it as invalid input.
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_BAD_EXAMPLES = 10


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def input_kind(path: str | os.PathLike) -> str:
    name = str(path)
    if name.endswith(".jsonl.zst"):
        return "zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise ConfigError(f"{name}: unsupported input type; expected one of {', '.join(SUFFIXES)}")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named or matched by glob patterns, in the given order (each glob sorted), deduplicated."""
    if not patterns:
        raise ConfigError("no --input given")
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise ConfigError(f"--input {pattern}: the pattern matches no file")
        elif os.path.isfile(pattern):
            matched = [pattern]
        else:
            raise ConfigError(f"--input {pattern}: no such file")
        for p in matched:
            input_kind(p)
            files.append(Path(p))
    seen: set[str] = set()
    unique = []
    for p in files:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


class _BadStream(Exception):
    """A reader problem at a known line (truncated or corrupt compressed data)."""

    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


def _plain_chunks(f) -> Iterator[tuple[bytes, int]]:
    while chunk := f.read(_READ_BYTES):
        yield chunk, len(chunk)


def _zst_chunks(f) -> Iterator[tuple[bytes, int]]:
    """Decompressed data of every frame; raises ValueError on a stream that ends inside a frame.

    zstandard's stream_reader returns EOF quietly at a truncation, which would let a cut-off
    download pass for a complete shard; decompressobj exposes `eof`, so we can tell.
    """
    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    while raw := f.read(_ZST_READ_BYTES):
        data = raw
        while data:
            out = obj.decompress(data)
            in_frame = True
            if obj.eof:  # frame done: the rest of `data` belongs to the next frame
                data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
            if out:
                yield out, 0
        yield b"", len(raw)
    if in_frame:
        raise ValueError("truncated zstd stream: the file ends inside a frame (incomplete download or copy?)")


def iter_line_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes, int]]:
    """(number of the first line, block of whole lines, on-disk bytes consumed) for a jsonl file.

    On truncated or corrupt compressed data, the complete lines decoded so far are yielded and
    then _BadStream is raised at the line that was cut.
    """
    kind = input_kind(path)
    line_no, buf, disk, failure = 1, bytearray(), 0, None
    with open(path, "rb") as f:
        chunks = _zst_chunks(f) if kind == "zst" else _plain_chunks(f)
        try:
            for chunk, consumed in chunks:
                buf += chunk
                disk += consumed
                while len(buf) >= block_bytes:
                    cut = buf.rfind(b"\n", 0, block_bytes) + 1
                    if cut == 0:  # one line longer than a block: it goes whole
                        cut = buf.find(b"\n", block_bytes) + 1
                        if cut == 0:
                            break
                    block = bytes(buf[:cut])
                    del buf[:cut]  # O(1) for a bytearray's front
                    yield line_no, block, disk
                    line_no += block.count(b"\n")
                    disk = 0
        except (ValueError, zstandard.ZstdError) as e:
            failure = str(e) if isinstance(e, ValueError) else f"corrupt zstd data ({e})"
    if failure is not None:
        cut = buf.rfind(b"\n") + 1  # the last, partial line is lost
        if cut:
            yield line_no, bytes(buf[:cut]), disk
            line_no += buf.count(b"\n", 0, cut)
        raise _BadStream(line_no, failure)
    if buf or disk:
        yield line_no, bytes(buf), disk


# ---------------------------------------------------------------------------------------------
# Parsing (shared by the workers and the sequential reader used for tokenizer training)
# ---------------------------------------------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass
class ParsedBlock:
    docs: list[tuple[int, tuple[str, ...], str | None]]  # (line, text per key, meta value)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def parse_jsonl_block(block: bytes, first_line: int, keys: Sequence[str], meta_field: str | None,
                      meta_required: bool = False) -> ParsedBlock:
    """Validate and decode every line of a block; `meta_field` names the `meta` entry to return
    with each document (None when absent, or a bad line when `meta_required`)."""
    out = ParsedBlock([])
    for i, raw in enumerate(block.split(b"\n")):
        if not raw or raw.isspace():
            continue  # blank lines (a trailing newline, a file's last line) carry no document
        line = first_line + i
        try:
            text_line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad.append((line, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        try:
            obj = json.loads(text_line)
        except json.JSONDecodeError as e:
            msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "Unterminated string starting at"
            out.bad.append((line, f"malformed JSON ({msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            out.bad.append((line, f"expected a JSON object, found {_JSON_TYPES.get(type(obj), type(obj).__name__)}"))
            continue
        texts, reason = [], None
        for key in keys:
            if key not in obj:
                found = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                reason = f"missing key {key!r} (keys found: {found}); choose the field with --jsonl-keys"
                break
            value = obj[key]
            if not isinstance(value, str):
                reason = f"{key!r} is {_JSON_TYPES.get(type(value), type(value).__name__)}, expected a string"
                break
            if b"\\u" in raw and _SURROGATE.search(value):
                reason = (f"{key!r} contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                          "which is not valid Unicode")
                break
            texts.append(value)
        meta_value = None
        if reason is None and meta_field is not None:
            meta = obj.get("meta")
            meta_value = meta.get(meta_field) if isinstance(meta, dict) else None
            if not isinstance(meta_value, str) or not meta_value:
                meta_value = None
                if meta_required:
                    reason = (f"missing meta.{meta_field} (a non-empty string is needed by "
                              "--split-by-meta / --domain-tokens)")
        if reason is not None:
            out.bad.append((line, reason))
            continue
        out.docs.append((line, tuple(texts), meta_value))
    return out


def parse_txt(data: bytes, n_keys: int) -> ParsedBlock:
    """A whole .txt file is one document (the same text for every key)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return ParsedBlock([], [(line, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})")])
    return ParsedBlock([(1, (text,) * n_keys, None)])


def is_empty(text: str) -> bool:
    return not text or text.isspace()


def iter_documents(inputs: Sequence[str], key: str = "text", skip_bad_lines: bool = False,
                   meta_field: str = "pile_set_name", bad_lines: list | None = None
                   ) -> Iterator[tuple[str, str | None]]:
    """(text, meta value or None) of every non-empty document, sequentially, with the same
    parsing and error rules as preprocessing. Used to train tokenizers."""
    for path in expand_inputs(inputs):
        for text, name in _iter_file_documents(path, key, skip_bad_lines, meta_field, bad_lines):
            if not is_empty(text):
                yield text, name


def _iter_file_documents(path, key, skip_bad_lines, meta_field, bad_lines):
    def bad(line, reason):
        if not skip_bad_lines:
            raise DataError(f"{path}:{line}: {reason}\n({_SKIP_HINT})")
        if bad_lines is not None:
            bad_lines.append(f"{path}:{line}: {reason}")

    if input_kind(path) == "txt":
        parsed = parse_txt(path.read_bytes(), 1)
        for line, reason in parsed.bad:
            bad(line, reason)
        yield from ((texts[0], None) for _, texts, _ in parsed.docs)
        return
    try:
        for first_line, block, _ in iter_line_blocks(path):
            # meta is optional here: a tokenizer can be trained on unlabelled jsonl.
            parsed = parse_jsonl_block(block, first_line, (key,), meta_field)
            for line, reason in parsed.bad:
                bad(line, reason)
            yield from ((texts[0], name) for _, texts, name in parsed.docs)
    except _BadStream as e:
        bad(e.line, e.reason)


# ---------------------------------------------------------------------------------------------
# Encoding tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodeSettings:
    """Everything a worker needs; picklable, so spawned workers rebuild their own tokenizer."""

    tokenizer: str
    encoder: str  # "tiktoken" or "hf": decided (and verified) once by the main process
    keys: tuple[str, ...]
    append_eod: bool
    domain_tokens: bool
    meta_field: str | None  # required in every document when set
    dtype: str


@dataclass
class Task:
    seq: int
    path: str
    first_line: int
    kind: str  # "jsonl" or "txt"
    data: bytes
    disk_bytes: int


@dataclass
class TaskResult:
    seq: int
    path: str
    input_bytes: int = 0
    disk_bytes: int = 0
    tokens: dict = field(default_factory=dict)  # key -> 1-D token array, documents back to back
    lengths: dict = field(default_factory=dict)  # key -> int64 tokens per document
    names: dict = field(default_factory=dict)  # key -> meta value per document (split/domain runs)
    empty: int = 0
    bad: list = field(default_factory=list)  # (line, reason)
    fatal: tuple | None = None  # (line, message): an error no --skip-bad-lines excuses


class Encoder:
    """Turns a task (a block of lines or a .txt file) into token arrays, one per key."""

    def __init__(self, settings: EncodeSettings, tokenizer=None):
        self.s = settings
        self.tokenizer = tokenizer or load_tokenizer(settings.tokenizer, encoder=settings.encoder, verify=False)
        self.eod = self.tokenizer.eod_id if settings.append_eod else None
        self.dtype = np.dtype(settings.dtype)
        self._domain_ids: dict[str, int | None] = {}

    def domain_id(self, name: str) -> int | None:
        if name not in self._domain_ids:
            self._domain_ids[name] = self.tokenizer.token_to_id(domain_token(name))
        return self._domain_ids[name]

    def __call__(self, task: Task) -> TaskResult:
        s = self.s
        if task.kind == "txt":
            parsed = parse_txt(task.data, len(s.keys))
        else:
            parsed = parse_jsonl_block(task.data, task.first_line, s.keys, s.meta_field,
                                       meta_required=s.meta_field is not None)
        result = TaskResult(task.seq, task.path, len(task.data), task.disk_bytes, bad=parsed.bad)
        for k, key in enumerate(s.keys):
            docs = [(line, texts[k], name) for line, texts, name in parsed.docs if not is_empty(texts[k])]
            result.empty += len(parsed.docs) - len(docs)  # per key: one key's text may be empty, another's not
            prefix_ids = []
            if s.domain_tokens:
                for line, _, name in docs:
                    tid = self.domain_id(name)
                    if tid is None:
                        result.fatal = (line, (
                            f"{task.path}:{line}: the tokenizer {s.tokenizer} has no token {domain_token(name)!r} "
                            f"for meta.pile_set_name {name!r}; retrain it with tools/train_tokenizer.py "
                            "--domain-tokens on data that includes this component"))
                        return result
                    prefix_ids.append(tid)
            encoded = self.tokenizer.encode_batch([text for _, text, _ in docs])
            flat: list[int] = []
            lengths = np.empty(len(docs), dtype=np.int64)
            extra = (1 if s.domain_tokens else 0) + (1 if self.eod is not None else 0)
            for i, ids in enumerate(encoded):
                if s.domain_tokens:
                    flat.append(prefix_ids[i])
                flat += ids
                if self.eod is not None:
                    flat.append(self.eod)
                lengths[i] = len(ids) + extra
            result.tokens[key] = np.array(flat, dtype=self.dtype)
            result.lengths[key] = lengths
            if s.meta_field is not None:
                result.names[key] = [name for _, _, name in docs]
        return result


def _exit_when_orphaned(parent_pid: int) -> None:
    """Watchdog thread: if the main process dies hard (SIGKILL, OOM killer), exit at once. The
    main thread may be blocked forever reading a task message the dead parent only half wrote,
    and a normal exit would wait for the result queue's feeder thread."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(settings: EncodeSettings, tasks, results, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        encoder = Encoder(settings)
    except BaseException as e:  # noqa: BLE001 - reported to the main process
        results.put(("init-error", -1, f"{type(e).__name__}: {e}"))
        return
    while (task := tasks.get()) is not None:
        try:
            results.put(("ok", task.seq, encoder(task)))
        except BaseException:  # noqa: BLE001
            results.put(("error", task.seq, traceback.format_exc()))


class _InlineRunner:
    """workers=0: encode in the main process (tests, debugging)."""

    def __init__(self, settings: EncodeSettings, tokenizer=None):
        self.encoder = Encoder(settings, tokenizer)
        self.done: list[TaskResult] = []

    def submit(self, task: Task) -> None:
        self.done.append(self.encoder(task))

    def get(self) -> TaskResult:
        return self.done.pop(0)

    def close(self, ok: bool) -> None:
        pass


class _ProcessPool:
    """N spawned workers fed through a task queue; results come back in completion order.

    Spawned, not forked: the parent has already run HF tokenizers (whose thread pool does not
    survive a fork) and may run tqdm's monitor thread.
    """

    def __init__(self, settings: EncodeSettings, workers: int):
        ctx = mp.get_context("spawn")
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(settings, self.tasks, self.results, os.getpid()),
                                  daemon=True, name=f"preprocess-worker-{i}") for i in range(workers)]
        for p in self.procs:
            p.start()

    def submit(self, task: Task) -> None:
        self.tasks.put(task)

    def get(self) -> TaskResult:
        while True:
            try:
                status, seq, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"preprocessing worker {dead[0].name} died (exit code {dead[0].exitcode}); "
                                       "out of memory?") from None
                continue
            if status == "ok":
                return payload
            if status == "init-error":
                raise DataError(f"a preprocessing worker could not start: {payload}")
            raise RuntimeError(f"preprocessing worker failed on task {seq}:\n{payload}")

    def close(self, ok: bool) -> None:
        if ok:
            for _ in self.procs:
                self.tasks.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)
        for q in (self.tasks, self.results):
            q.cancel_join_thread()  # do not block exit on items nobody will read
            q.close()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class PreprocessOptions:
    inputs: Sequence[str]
    tokenizer: str
    output_prefix: str
    keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1  # 0 = encode in this process
    domain_tokens: bool = False
    split_by_meta: str | None = None  # a meta field, e.g. "pile_set_name": one dataset per value
    skip_bad_lines: bool = False
    encoder: str = "auto"  # auto | tiktoken | hf (see megatron_neox.tokenizer)
    block_bytes: int = BLOCK_BYTES
    progress: bool = True


@dataclass
class OutputStats:
    prefix: str
    docs: int = 0
    tokens: int = 0


@dataclass
class PreprocessSummary:
    files: int
    encoder: str
    dtype: str
    outputs: dict = field(default_factory=dict)  # (meta value or None, key) -> OutputStats
    docs: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)
    seconds: float = 0.0


DOMAIN_FIELD = "pile_set_name"  # domain tokens come from the Pile's component label


def output_prefix_for(prefix: str, key: str, component: str | None = None) -> str:
    """`{prefix}_{key}_document`, or `{prefix}_{component}_{key}_document` with --split-by-meta."""
    if component is None:
        return f"{prefix}_{key}_document"
    return f"{prefix}_{sanitize_component_name(component)}_{key}_document"


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM (SLURM preemption, `kill`) into KeyboardInterrupt so the builders' cleanup
    runs; the default action would kill us with temporary files left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _tasks(files: Sequence[Path], block_bytes: int) -> Iterator[Task | TaskResult]:
    """Tasks in input order; a reader failure becomes a TaskResult carrying one bad line, so it
    is reported in order with the rest (the lines before it were read and are still valid)."""
    seq = 0
    for path in files:
        if input_kind(path) == "txt":
            data = path.read_bytes()
            yield Task(seq, str(path), 1, "txt", data, len(data))
            seq += 1
            continue
        try:
            for first_line, block, disk in iter_line_blocks(path, block_bytes):
                yield Task(seq, str(path), first_line, "jsonl", block, disk)
                seq += 1
        except _BadStream as e:
            yield TaskResult(seq, str(path), bad=[(e.line, e.reason)])
            seq += 1


def _sample_texts(files: Sequence[Path], key: str, budget: int = 256 << 10) -> list[str]:
    """The first ~256 KB of text of the first input, to check the fast path on the input's own
    scripts and whitespace (the load-time check covers the vocabulary)."""
    texts, size = [], 0
    try:
        for text, _ in iter_documents([str(files[0])], key=key, skip_bad_lines=True):
            texts.append(text[:65536])
            size += len(texts[-1])
            if size >= budget:
                break
    except (DataError, OSError):
        pass  # unreadable input: the main pass reports it with its line
    return texts


class _Writer:
    """Consumes results in input order: reports or counts bad lines, feeds the builders, keeps
    the counts and the progress bar. Builders are entered on `stack`, so an exception anywhere
    discards every output."""

    def __init__(self, opts: PreprocessOptions, summary: PreprocessSummary, dtype, stack: contextlib.ExitStack, bar):
        self.opts, self.summary, self.dtype, self.stack, self.bar = opts, summary, dtype, stack, bar
        self.builders: dict = {}
        self.t0 = time.time()
        if opts.split_by_meta is None:
            for key in tuple(opts.keys):  # made up front: a run whose documents are all empty still writes them
                self.builder_for(None, key)

    def builder_for(self, component: str | None, key: str):
        if (component, key) not in self.builders:
            prefix = output_prefix_for(self.opts.output_prefix, key, component)
            for (other, _), out in self.summary.outputs.items():
                if out.prefix == prefix:
                    raise DataError(f"meta.{self.opts.split_by_meta} values {other!r} and {component!r} both map "
                                    f"to the output {prefix}; rename one of them in the input")
            self.builders[component, key] = self.stack.enter_context(IndexedDatasetBuilder(prefix, self.dtype))
            self.summary.outputs[component, key] = OutputStats(prefix)
        return self.builders[component, key]

    def __call__(self, result: TaskResult) -> None:
        s = self.summary
        fatal_line, fatal = result.fatal or (None, None)
        for line, reason in result.bad:
            if fatal is not None and line > fatal_line:
                break  # the fatal error comes first in the file
            where = f"{result.path}:{line}: {reason}"
            if not self.opts.skip_bad_lines:
                raise DataError(f"{where}\n({_SKIP_HINT})")
            s.bad_lines += 1
            if len(s.bad_examples) < MAX_BAD_EXAMPLES:
                s.bad_examples.append(where)
        if fatal is not None:
            raise DataError(fatal)
        s.empty += result.empty
        s.input_bytes += result.input_bytes
        for key, tokens in result.tokens.items():
            lengths = result.lengths[key]
            ends = np.cumsum(lengths).tolist()
            starts = [0] + ends[:-1]
            components = result.names[key] if self.opts.split_by_meta else [None] * len(ends)
            for a, b, component in zip(starts, ends, components):
                self.builder_for(component, key).add_document(tokens[a:b])
                out = s.outputs[component, key]
                out.docs += 1
                out.tokens += b - a
            s.docs += len(ends)
            s.tokens += int(tokens.size)
        _update_progress(self.bar, s, result.disk_bytes, self.t0)

    def finalize(self) -> None:
        for builder in self.builders.values():
            builder.finalize()


def _run_ordered(items: Iterator[Task | TaskResult], runner, write, max_inflight: int) -> None:
    """Feed tasks to the runner and hand results to `write` in input order, with at most
    `max_inflight` tasks between reading and writing (this is what bounds memory)."""
    pending: dict[int, TaskResult] = {}
    submitted = written = 0

    def collect_one() -> None:
        nonlocal written
        r = runner.get()
        pending[r.seq] = r
        while written in pending:
            write(pending.pop(written))
            written += 1

    for item in items:
        while submitted - written >= max_inflight:
            collect_one()
        if isinstance(item, TaskResult):  # a reader error: it waits for its turn like a result
            pending[item.seq] = item
        else:
            runner.submit(item)
        submitted += 1
        while written in pending:
            write(pending.pop(written))
            written += 1
    while written < submitted:
        collect_one()


def preprocess(opts: PreprocessOptions, log=print) -> PreprocessSummary:
    """Run the whole pipeline; returns counts. Raises DataError on bad input (file:line: reason)."""
    t0 = time.time()
    keys = tuple(opts.keys)
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"--jsonl-keys must name distinct keys, got {list(keys)}")
    if opts.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {opts.workers}")
    if opts.split_by_meta not in (None, DOMAIN_FIELD):
        raise ConfigError(f"--split-by-meta {opts.split_by_meta}: only meta.{DOMAIN_FIELD} is supported")
    files = expand_inputs(opts.inputs)
    meta_field = DOMAIN_FIELD if (opts.split_by_meta or opts.domain_tokens) else None
    if meta_field is not None:
        txt = [p for p in files if input_kind(p) == "txt"]
        if txt:
            raise ConfigError(f"{txt[0]}: a .txt input has no meta.{meta_field}, which --split-by-meta / "
                              "--domain-tokens need; give jsonl inputs")
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--output-prefix {opts.output_prefix}: directory {out_dir} does not exist")

    tokenizer = load_tokenizer(opts.tokenizer, encoder=opts.encoder, verify=False)
    if opts.append_eod:
        tokenizer.eod_id  # noqa: B018 - fail now, with the tokenizer named, if it has no EOD
    dtype = best_dtype(tokenizer.vocab_size)

    def start_runner():
        settings = EncodeSettings(opts.tokenizer, tokenizer.encoder_name, keys, opts.append_eod,
                                  opts.domain_tokens, meta_field, dtype.name)
        if opts.workers == 0:
            return _InlineRunner(settings, tokenizer)
        return _ProcessPool(settings, opts.workers)

    ok = False
    runner = None
    with contextlib.ExitStack() as stack, _sigterm_raises():
        stack.callback(lambda: runner is not None and runner.close(ok))
        # Workers spawn (slow: imports, tokenizer load) while this process verifies the fast
        # path; in the rare case it fails they are replaced by HF workers before any task.
        runner = start_runner()
        if tokenizer.encoder_name == "tiktoken" and tokenizer.verify_fast_path(_sample_texts(files, keys[0])):
            runner.close(False)
            runner = None
            if opts.encoder == "tiktoken":
                raise ConfigError(f"{opts.tokenizer}: the tiktoken fast path cannot reproduce this tokenizer: "
                                  f"{tokenizer.fast_reason}")
            runner = start_runner()
        summary = PreprocessSummary(len(files), tokenizer.describe_encoder(), dtype.name)
        log(f"encoder: {summary.encoder}")

        bar = stack.enter_context(_progress(sum(os.path.getsize(p) for p in files), opts.progress))
        writer = _Writer(opts, summary, dtype, stack, bar)
        _run_ordered(_tasks(files, opts.block_bytes), runner, writer, max_inflight=2 * max(opts.workers, 1) + 2)
        writer.finalize()
        ok = True
    summary.seconds = time.time() - t0
    return summary


def _progress(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    # Batch logs (SLURM) get a line every 30 s instead of a redraw storm.
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                mininterval=0.5 if interactive else 30.0, desc="preprocess", dynamic_ncols=True)


def _update_progress(bar, summary: PreprocessSummary, disk_bytes: int, t0: float) -> None:
    if bar.disable:
        return
    dt = max(time.time() - t0, 1e-9)
    bar.set_postfix_str(f"{summary.docs / dt:,.0f} docs/s, {summary.input_bytes / dt / 1e6:.1f} MB/s, "
                        f"{summary.tokens / dt / 1e6:.2f}M tok/s", refresh=False)
    bar.update(disk_bytes)


def format_summary(s: PreprocessSummary) -> str:
    lines = []
    for (component, key), out in s.outputs.items():
        lines.append(f"  {out.prefix}.{{bin,idx}}: {out.docs:,} docs, {out.tokens:,} tokens")
    dt = max(s.seconds, 1e-9)
    lines.append(f"{s.docs:,} docs, {s.tokens:,} tokens ({s.dtype}) from {s.files} file(s), "
                 f"{s.input_bytes / 1e6:.1f} MB in {s.seconds:.1f} s: {s.docs / dt:,.0f} docs/s, "
                 f"{s.input_bytes / dt / 1e6:.1f} MB/s, {s.tokens / dt:,.0f} tokens/s")
    lines.append(f"empty documents skipped: {s.empty:,}; bad lines skipped: {s.bad_lines:,}")
    for ex in s.bad_examples:
        lines.append(f"  bad: {ex}")
    if s.bad_lines > len(s.bad_examples):
        lines.append(f"  ... and {s.bad_lines - len(s.bad_examples)} more")
    lines.append(f"encoder: {s.encoder}")
    return "\n".join(lines)
