"""The checkpoint file format: what a directory of checkpoints holds and how it is checked.

    CKPT_DIR/global_stepN/   DeepSpeed's files: layer_XX-model_YY-model_states.pt (pipeline) or
                             mp_rank_YY_model_states.pt (client state at top level),
                             zero_pp_rank_D_mp_rank_YY_optim_states.pt
                             rng_state_R.pt      every rank's RNG states (exact resume with dropout)
                             complete.json       written last, after every rank's files are durable:
                                                 iteration, layout, model, the resolved config (what
                                                 ran: no 'auto' left), and every file with its size
    CKPT_DIR/latest          names the newest *complete* checkpoint (`write_latest`, durable)

The trainer writes these (training/checkpoint.py), the converters write and read them
(convert/checkpoint_io.py: weights-only checkpoints; convert/universal.py: universal ones) and
outputs.py refuses to overwrite them; so the format lives here, below all three. A corrupt
`latest`, a missing or truncated file (complete.json lists every file and its size) or changed
bytes (each .pt file's zip CRCs) are reported by name.
"""
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_neox.durable import write_text
from megatron_neox.errors import CheckpointError

CLIENT_KEY = "megatron_neox"  # our client state inside DeepSpeed's mp_rank_XX_model_states.pt
COMPLETE = "complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^global_step(\d+)$")  # DeepSpeed's tag for the checkpoint of step N


def tag_of(iteration: int) -> str:
    return f"global_step{iteration}"


def write_latest(ckpt_dir: os.PathLike, tag: str, name: str = LATEST) -> None:
    """Point `ckpt_dir/latest` (or `name`) at `tag`, durably: only once `tag` is complete."""
    write_text(Path(ckpt_dir) / name, tag, durable=True)


def write_meta(tag_dir: os.PathLike, meta: Dict[str, Any]) -> None:
    """Declare `tag_dir` complete: complete.json with `meta` and the manifest of its files, durable."""
    tag_dir = Path(tag_dir)
    write_text(tag_dir / COMPLETE, json.dumps({**meta, "files": file_manifest(tag_dir)}, indent=1), durable=True)


def complete_tags(ckpt_dir: os.PathLike) -> List[str]:
    """global_stepN directories that have their completion marker, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p.name))
    return [name for _, name in sorted(found)]


def has_checkpoint(ckpt_dir: os.PathLike) -> bool:
    """Anything to resume from: a `latest` file (even a damaged one) or a complete checkpoint."""
    return (Path(ckpt_dir) / "latest").exists() or bool(complete_tags(ckpt_dir))


def read_meta(tag_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: no {COMPLETE}: the checkpoint is partial (its save did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tag_dir / COMPLETE}: corrupt ({e})") from None


def file_manifest(tag_dir: Path) -> Dict[str, int]:
    """Every file of a finished save (relative path -> bytes), recorded in complete.json so that a
    missing or truncated file is named on load, before DeepSpeed asserts on it."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def verify_manifest(tag_dir: Path, meta: Dict[str, Any]) -> None:
    """The files complete.json lists are all there, each of its recorded size (checkpoints saved
    before the list existed have none: nothing to check)."""
    for name, size in (meta.get("files") or {}).items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {COMPLETE} when the checkpoint was saved)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} when saved: the file is truncated or was "
                                  "replaced")


def verify_files(tag_dir: Path) -> None:
    """Every .pt file must be a readable zip archive (torch.save's format); truncation removes the
    archive's trailing directory, which this detects without reading the tensors."""
    files = sorted(tag_dir.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no checkpoint files (*.pt)")
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{f}: unreadable checkpoint shard ({e}); the file is truncated or corrupt") from None


def verify_contents(path: Path) -> None:
    """A torch.save file's bytes are the ones written: every zip entry checked against the CRC-32
    that torch stored with it (torch.load never checks them, so changed bytes load as garbage)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint shard ({e}); the file is truncated or corrupt") from None
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad!r} fails its CRC-32 check: the file's contents changed after it "
                              "was saved (disk or copy corruption)")


def read_latest(ckpt_dir: os.PathLike) -> Optional[str]:
    """The tag that `ckpt_dir/latest` names; None when there is no `latest`; CheckpointError when
    it is unreadable or does not name a global_stepN tag."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.exists():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{latest}: unreadable ({e})") from None
    if not TAG_RE.match(tag):
        raise CheckpointError(f"{latest}: corrupt (expected 'global_stepN', found {tag[:40]!r})")
    return tag


def resolve_tag_dir(path: os.PathLike) -> Path:
    """`DIR/global_stepN` as given, or the tag that `DIR/latest` names (else DIR's newest complete tag)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint dir or its global_stepN/)")
    if (path / COMPLETE).exists() or TAG_RE.match(path.name):
        return path
    try:
        tag = read_latest(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; pass {path}/global_stepN explicitly") from None
    if tag is not None:
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / tag}: named by {path / 'latest'} but missing")
        return path / tag
    tags = complete_tags(path)
    if not tags:
        raise CheckpointError(f"{path}: no checkpoint here (no 'latest', no complete global_stepN/, no {COMPLETE})")
    return path / tags[-1]
