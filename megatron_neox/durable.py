"""Atomic file writes: the one helper every writer of the library, the tools and the benchmarks uses.

A file is written under a temporary name beside its final one and renamed into place, so a reader
(another rank, a resumed run, a user) sees either the old file or the whole new one, never half
of it. With `durable=True` the file is also fsynced before the rename and its directory after it,
so the new file survives a power loss (checkpoints, `latest`); caches and reports skip the two
fsyncs. A write that fails removes its temporary file.

Temporary names are `NAME.tmp-PID-XXXXXXXX` (pid and a random tag): several writers may share a
directory, and `data.indexed.remove_stale_temporaries` recognises the ones a killed writer left.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, List, Union

PathLike = Union[str, os.PathLike]


def temporary_name(path: PathLike) -> Path:
    """Where `path` is written before it is renamed into place."""
    return Path(f"{os.fspath(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new file in directory `path` durable (POSIX: the entry lives in the dir)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def commit(tmp: PathLike, path: PathLike, durable: bool = False) -> None:
    """Rename the finished temporary file `tmp` to `path` (fsyncing both first when `durable`)."""
    if durable:
        _fsync_file(Path(tmp))
    os.replace(tmp, path)
    if durable:
        fsync_dir(Path(path).resolve().parent)


@contextmanager
def atomic_paths(*paths: PathLike, durable: bool = False) -> Iterator[List[Path]]:
    """Temporary names for `paths`, for writers that take a file name (`fig.savefig`, `hf.save`);
    on success they are renamed into place in the order given (a data file before the index that
    points into it), on failure removed."""
    tmps = [temporary_name(p) for p in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths):
            commit(tmp, path, durable)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", durable: bool = False, **open_kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` that only ever shows a complete file under `path`."""
    with atomic_paths(path, durable=durable) as (tmp,):
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_text(path: PathLike, text: str, durable: bool = False) -> None:
    with atomic_write(path, "w", durable=durable, encoding="utf-8") as f:
        f.write(text)


def write_json(path: PathLike, obj: Any, durable: bool = False, **dump_kwargs: Any) -> None:
    write_text(path, json.dumps(obj, **dump_kwargs), durable=durable)
