"""Reading raw documents: `.jsonl`, `.jsonl.zst` (Pile shards) and `.txt` (one document per file).

Shared by preprocessing (tools/preprocess_data.py, which parses blocks in its workers) and
tokenizer training (tools/train_tokenizer.py, which reads sequentially with `iter_documents`), so
both accept the same inputs and reject bad lines with the same `file:line: reason` messages.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import zstandard

from megatron_neox.errors import ConfigError, DataError

SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
BLOCK_BYTES = 1 << 20
_READ_BYTES = 1 << 20  # raw reads of plain files
_ZST_READ_BYTES = 1 << 17  # compressed reads: text expands ~3-5x, so blocks stay near 1 MB
SKIP_HINT = "pass --skip-bad-lines to skip such lines and count them"
# A JSON "\udXXX" escape can produce a lone surrogate, which is not text (HF tokenizers rejects
# it and tiktoken silently replaces it): treat it as invalid input.
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class BadStream(Exception):
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
    then BadStream is raised at the line that was cut.
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
        raise BadStream(line_no, failure)
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
            raise DataError(f"{path}:{line}: {reason}\n({SKIP_HINT})")
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
    except BadStream as e:
        bad(e.line, e.reason)
