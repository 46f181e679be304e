"""Write files so that a crash never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch


def temp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under before it is moved into place."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and `os.replace` it onto `path`.

    On any exception the temp file is removed and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (the layout Automodel's manifest uses)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` through a temp file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
