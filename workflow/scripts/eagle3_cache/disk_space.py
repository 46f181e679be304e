"""The filesystem a cache goes on: its free space, block size and sparse-file support, and what is already there."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import temp_path_for

# The sparse-file probe: a file this many blocks long with one block written.
PROBE_BLOCKS = 16


@dataclass(frozen=True)
class Filesystem:
    """The filesystem a cache directory lies on, as measured at its nearest existing directory."""

    path: str
    free_bytes: int
    block_size: int
    sparse_files: bool

    def takes(self, apparent_bytes: int, allocated_bytes: int) -> int:
        """The bytes a file takes here: its blocks touched when holes stay holes, else its size."""
        return allocated_bytes if self.sparse_files else apparent_bytes


def nearest_existing_directory(path: str | os.PathLike) -> Path:
    """`path`, or its closest parent that exists (the cache directory does not before its first file)."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.is_dir())


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem holding `path` (or its closest existing parent)."""
    directory = nearest_existing_directory(path).resolve()
    return next(p for p in (directory, *directory.parents) if os.path.ismount(p))


def keeps_holes(directory: Path, block_size: int) -> bool:
    """Whether a file here keeps its never-written blocks as holes: a probe with one block written of many."""
    # Named as a temp file, so that the manifest job removes one a killed plan job left in the cache directory.
    before = directory.stat()
    handle, name = tempfile.mkstemp(prefix=".sparse-probe-", suffix=temp_path_for("probe").suffix, dir=directory)
    try:
        os.ftruncate(handle, PROBE_BLOCKS * block_size)
        os.pwrite(handle, b"\1", PROBE_BLOCKS // 2 * block_size)
        os.fsync(handle)
        return os.fstat(handle).st_blocks * 512 < PROBE_BLOCKS * block_size
    finally:
        os.close(handle)
        os.unlink(name)
        # The cache directory's mtime says when a cache file came or went (the manifest rule's input):
        # the probe leaves it as it found it.
        os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))


def measure_filesystem(cache_dir: str | os.PathLike) -> Filesystem:
    """Free space, block size and sparse-file support where the cache directory is (or will be)."""
    directory = nearest_existing_directory(cache_dir)
    block_size = os.statvfs(directory).f_frsize
    return Filesystem(str(directory), shutil.disk_usage(directory).free, block_size, keeps_holes(directory, block_size))


def path_blocks_bytes(path: Path) -> int:
    """The bytes a file takes on disk, or the files in a directory (a specforge shard) together."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_blocks * 512 for p in files)


def taken_bytes(cache_dir: Path, names: list[str]) -> dict[str, int]:
    """The bytes the cache files (or shard directories) of these names already in `cache_dir` take on disk."""
    paths = {name: cache_dir / name for name in names}
    return {name: path_blocks_bytes(path) for name, path in paths.items() if path.exists()}
