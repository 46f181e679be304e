"""What a shard is on disk, for the commit point: its files' names, sizes, inodes and mtimes, and the
digest of their bytes (sparse_digest).

A verification record keeps both, taken as the verification read the shard. The commit point
compares the files' stat with the record, which reads nothing; a shard whose files differ (replaced
or rewritten by hand, even keeping its timestamps; or copied, with new inodes) is hashed again, and
committed only if its bytes are the ones verified. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .atomic import write_json_atomic
from .sparse_digest import file_digest


def shard_files(path: Path) -> list[Path]:
    """A shard's files: itself, or every file of a shard directory by name (Snakemake's hidden timestamp
    file left out: Snakemake touches it)."""
    if path.is_dir():
        files = (Path(entry.path) for entry in os.scandir(path) if entry.is_file() and not entry.name.startswith("."))
        return sorted(files, key=lambda p: p.name)
    return [path]


def stat_sha256(path: Path) -> str | None:
    """sha256 over the shard's files' names, sizes, inodes and mtimes; None when it is missing."""
    try:
        described = [[file.name, *stat_of(file)] for file in shard_files(path)]
    except FileNotFoundError:
        return None
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def stat_of(file: Path) -> tuple[int, int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_ino, stat.st_mtime_ns


def files_sha256(named_digests: Iterable[tuple[str, str]]) -> str:
    """One digest of a shard's files from each file's name and sha256, in name order."""
    return hashlib.sha256(json.dumps(sorted(named_digests)).encode()).hexdigest()


def content_sha256(path: Path) -> str | None:
    """`files_sha256` of the shard's files as they are now, each read; None when it is missing."""
    try:
        return files_sha256((file.name, file_digest(file)) for file in shard_files(path))
    except FileNotFoundError:
        return None


def unverified_shards(cache_dir: Path, record_paths: Sequence[Path]) -> list[str]:
    """The shards (by name) whose bytes are not the ones their verification record describes.

    A shard whose files' stat still matches its record is taken as verified without a read; one whose
    stat differs is hashed: same bytes, and its record is brought up to date; other bytes (or none),
    and its record is deleted, so that the next run verifies it again.
    """
    unverified = []
    for record_path in record_paths:
        try:
            record = json.loads(record_path.read_text())
        except ValueError:  # damaged: verified again, like a changed shard
            record_path.unlink()
            unverified.append(f"{record_path.name} (an unreadable verification record)")
            continue
        shard = cache_dir / record["file"]
        stat = stat_sha256(shard)
        if stat is not None and stat == record.get("stat_sha256"):
            continue
        if stat is not None and content_sha256(shard) == record.get("content_sha256"):
            write_json_atomic(record_path, {**record, "stat_sha256": stat})
            continue
        record_path.unlink()
        unverified.append(record["file"])
    return unverified
