"""Tokenize raw documents into MMIDIDX datasets: `{prefix}_{key}_document.{bin,idx}`.

Inputs are read by `megatron_neox.data.readers` (`.jsonl`, `.jsonl.zst`, `.txt`). The pipeline:

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
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_neox.data.blended import sanitize_component_name
from megatron_neox.data.indexed import IndexedDatasetBuilder, best_dtype
from megatron_neox.data.readers import (
    BLOCK_BYTES,
    SKIP_HINT,
    BadStream,
    expand_inputs,
    input_kind,
    is_empty,
    iter_documents,
    iter_line_blocks,
    parse_jsonl_block,
    parse_txt,
)
from megatron_neox.errors import ConfigError, DataError
from megatron_neox.tokenizer import domain_token, load_tokenizer

MAX_BAD_EXAMPLES = 10


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
    bos: bool = True  # start each document with the tokenizer's BOS, when its template has one


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
        self.bos = self.tokenizer.bos_ids if settings.bos else []
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
            # A document is [BOS] [domain token] text [EOD]: BOS first, as HF's encode puts it.
            extra = len(self.bos) + (1 if s.domain_tokens else 0) + (1 if self.eod is not None else 0)
            for i, ids in enumerate(encoded):
                flat += self.bos
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
    bos: bool = True  # the tokenizer's own BOS before each document (Llama families; see Tokenizer.bos_ids)
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
        except BadStream as e:
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
                raise DataError(f"{where}\n({SKIP_HINT})")
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
                                  opts.domain_tokens, meta_field, dtype.name, opts.bos)
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
        log(f"each document: {document_layout(tokenizer, opts)}")

        bar = stack.enter_context(_progress(sum(os.path.getsize(p) for p in files), opts.progress))
        writer = _Writer(opts, summary, dtype, stack, bar)
        _run_ordered(_tasks(files, opts.block_bytes), runner, writer, max_inflight=2 * max(opts.workers, 1) + 2)
        writer.finalize()
        ok = True
    summary.seconds = time.time() - t0
    return summary


def document_layout(tokenizer, opts: PreprocessOptions) -> str:
    """How each document is laid out in the output, e.g. "<s> text </s>"."""
    parts = [tokenizer.id_to_token(i) for i in (tokenizer.bos_ids if opts.bos else [])]
    parts += ["<|domain:NAME|>"] if opts.domain_tokens else []
    parts += ["text"] + ([tokenizer.eod_token] if opts.append_eod else [])
    return " ".join(parts)


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
