"""The files a run makes from its inputs before any shard (tokenized store, vocabulary selection and
counts, disk plan), each recorded as its producer wrote it.

A record, a hidden JSON file beside the product, keeps the file's sha256, size, inode and mtime, and its
identity: what of it matters to the jobs that read it. The recorded mtime is the product's own: the
time it was first made with that identity. With it,
- a product damaged afterwards (truncated, overwritten) is found as the workflow starts, by its stat
  and, where that changed, its bytes, before any job reads it or any output is deleted for it;
- a product rebuilt with the same identity keeps the mtime it had, so that nothing made from it looks
  outdated: finished shards are kept. Snakemake touches every output after its job, so the mtime is
  set back once the run is over (`settle`), or as the next one starts.
No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .provenance import file_sha256

DAMAGED_SUFFIX = ".damaged"


def record_path(path: str | os.PathLike) -> Path:
    """Where a product's record is kept: a hidden file beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.written.json")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The product's record; None when there is none, or it cannot be read."""
    try:
        record = json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_recorded_file(stat: os.stat_result, record: dict[str, Any] | None) -> bool:
    """Whether `record` describes the file `stat` is of: the same inode and size (its mtime aside, which
    Snakemake touches)."""
    return record is not None and [stat.st_size, stat.st_ino] == [record.get("size"), record.get("inode")]


def own_mtime_ns(path: Path) -> int:
    """A file's mtime; for a recorded product, the recorded one (Snakemake may have touched it since)."""
    stat, record = path.stat(), read_record(path)
    return record["mtime_ns"] if is_recorded_file(stat, record) else stat.st_mtime_ns


def newest_mtime_ns(paths: Sequence[str | os.PathLike]) -> int:
    """The newest own mtime among existing `paths` (0 for none)."""
    return max((own_mtime_ns(Path(path)) for path in paths if os.path.exists(path)), default=0)


def write_record(path: Path, sha256: str, identity: str, mtime_ns: int) -> None:
    """Record the product as it is now, with `mtime_ns` as its own mtime."""
    stat = path.stat()
    record = {"sha256": sha256, "identity": identity, "size": stat.st_size, "inode": stat.st_ino, "mtime_ns": mtime_ns}
    write_json_atomic(record_path(path), record)


def record_product(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], identity: str | None = None) -> None:
    """Record a product its producer has just moved into place; `identity` defaults to its sha256.

    Rebuilt with the identity it had, it keeps the mtime it had, unless one of its `inputs` is newer
    than that: what was made from it is then as up to date as before the rebuild.
    """
    path = Path(path)
    sha256 = file_sha256(path)
    identity = identity or sha256
    old = read_record(path)
    mtime_ns = path.stat().st_mtime_ns
    if old is not None and old.get("identity") == identity and old["mtime_ns"] >= newest_mtime_ns(inputs):
        mtime_ns = old["mtime_ns"]
        os.utime(path, ns=(mtime_ns, mtime_ns))
    write_record(path, sha256, identity, mtime_ns)


def inputs_identity(paths: Sequence[str | os.PathLike]) -> str:
    """The identity of a product that is a function of the products at `paths` alone: their names and recorded
    sha256s, in order (for a file whose own bytes are not reproducible, as the joined tokenized store's)."""
    described = [(Path(path).name, (read_record(path) or {}).get("sha256") or file_sha256(path)) for path in paths]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def settle(paths: Sequence[str | os.PathLike]) -> None:
    """Give each recorded product its recorded mtime back, where only the mtime differs: Snakemake touched
    it after its job. Run once the jobs are over, in the process that ran them."""
    for path in map(Path, paths):
        record = read_record(path)
        if path.is_file() and is_recorded_file(path.stat(), record):
            os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))


def damage(path: str | os.PathLike) -> str | None:
    """How a recorded product differs from what its producer wrote; None when it does not (or it is
    missing, or has no record). A product with its recorded bytes under another stat (copied, touched)
    gets its recorded mtime back, and its record the new inode."""
    path, record = Path(path), read_record(path)
    if record is None or not path.is_file():
        return None
    stat = path.stat()
    if is_recorded_file(stat, record) and stat.st_mtime_ns == record.get("mtime_ns"):
        return None
    if stat.st_size != record.get("size"):
        return f"{stat.st_size} bytes where {record.get('size')} were written"
    if file_sha256(path) != record.get("sha256"):
        return "its bytes differ from those written"
    os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))
    write_record(path, record["sha256"], record["identity"], record["mtime_ns"])
    return None


def set_aside(path: str | os.PathLike) -> Path:
    """Move a damaged product out of the way (kept for inspection), so that it is rebuilt; its new name."""
    path = Path(path)
    damaged = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, damaged)
    return damaged
