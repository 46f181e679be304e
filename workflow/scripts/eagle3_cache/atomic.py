"""Write files so that a crash never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheConfigError


def temp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under before it is moved into place."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask."""
    # The umask can only be read by setting it, so it is put straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it, give it the normal new-file mode
    and `os.replace` it onto `path`.

    On any exception the temp file is removed and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # Writers that stage through a private temp file of their own (safetensors) leave it 0600.
        tmp.chmod(new_file_mode())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success give its files the normal
    new-file mode and rename it to `path`.

    On any exception the staging folder is removed and `path` is left untouched.
    """
    final = Path(path)
    staging = temp_path_for(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                file.chmod(new_file_mode())
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Make a file's bytes durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries added to or removed from a directory durable, in the order they were made."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (the layout Automodel's manifest uses)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` through a temp file."""
    # Imported here: the steps that need no torch (the disk plan) write through this module too.
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def read_json_file(path: str | os.PathLike, remedy: str) -> Any:
    """A JSON file's contents, or a CacheConfigError naming it and saying what to do (`remedy`)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheConfigError(f"{path}: not valid JSON ({error}); {remedy}") from error
