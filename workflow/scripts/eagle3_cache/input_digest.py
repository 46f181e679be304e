"""sha256 of the local inputs (a data file or folder, a model folder) by their bytes, so that a file
rewritten in place is noticed where a folder's timestamp is not.

Each file's hash is kept beside its size, mtime and inode (`HASHES_FILE`), so only files that changed
are read again: a dry run over an unchanged 16 GB checkpoint reads no weight bytes. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .layout import DEMO_MODEL, RESULTS_DIR, WEIGHT_SUFFIXES
from .provenance import file_sha256

HASHES_FILE = Path(RESULTS_DIR, ".input_sha256.json")

# Weight files and weight indexes; the rest of a model folder (config, tokenizer, chat template) is
# what tokenization reads.
CHECKPOINT_WEIGHT_SUFFIXES = (*WEIGHT_SUFFIXES, ".pt", ".gguf")


def is_weight_file(path: Path) -> bool:
    """Whether a model folder's file holds weights, or indexes them."""
    return path.suffix in CHECKPOINT_WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def checkpoint_weight_files(model_dir: Path) -> list[Path]:
    """A checkpoint folder's weight files and weight indexes, by name."""
    return sorted((p for p in model_dir.iterdir() if p.is_file() and is_weight_file(p)), key=lambda p: p.name)


def visible_files(root: Path) -> list[Path]:
    """The regular files under a folder, by relative path, leaving out hidden ones (`.git`, `.cache`)."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files.extend(Path(folder, name) for name in names if not name.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class FileHashes:
    """Files' sha256, re-read only when a file's size, mtime or inode differ from when it was hashed."""

    def __init__(self, store: Path = HASHES_FILE):
        self.store = store
        self.known: dict[str, list] = self._load()
        self.changed = False

    def _load(self) -> dict[str, list]:
        try:
            known = json.loads(self.store.read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def sha256s(self, paths: Sequence[Path]) -> list[str]:
        """Each file's sha256, from the store where the file is unchanged since it was hashed; the others
        are read side by side (sha256 runs outside the GIL), one thread per core."""
        keys = [stat_key(path) for path in paths]
        names = [str(path.resolve()) for path in paths]
        stale = [i for i, name in enumerate(names) if not self.knows(name, keys[i])]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for i, digest in zip(stale, pool.map(file_sha256, [paths[i] for i in stale]), strict=True):
                self.known[names[i]] = [*keys[i], digest]
        self.changed |= bool(stale)
        return [self.known[name][3] for name in names]

    def knows(self, name: str, key: list[int]) -> bool:
        entry = self.known.get(name)
        return isinstance(entry, list) and entry[:3] == key

    def save(self) -> None:
        """Write the store through a temp file (concurrent writers lose entries, never corrupt it)."""
        if not self.changed:
            return
        self.store.parent.mkdir(parents=True, exist_ok=True)
        temp = self.store.with_name(f"{self.store.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(self.known))
        os.replace(temp, self.store)
        self.changed = False


def stat_key(path: Path) -> list[int]:
    """What says a file is unchanged since it was hashed: its size, mtime and inode."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def tree_sha256(hashes: FileHashes, root: Path, files: Sequence[Path]) -> str:
    """sha256 over the files' paths relative to `root` and their contents' sha256."""
    listing = [
        [path.relative_to(root).as_posix(), digest] for path, digest in zip(files, hashes.sha256s(files), strict=True)
    ]
    hashes.save()
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def data_sha256(input_data: str, hashes: FileHashes) -> str:
    """sha256 of a local data file, or of every visible file of a data folder."""
    path = Path(input_data)
    if path.is_dir():
        return tree_sha256(hashes, path, visible_files(path))
    return tree_sha256(hashes, path.parent, [path])


def model_files_sha256(model_dir: str, hashes: FileHashes) -> str:
    """sha256 of what tokenization reads from a model folder: every visible file but the weights."""
    root = Path(model_dir)
    return tree_sha256(hashes, root, [p for p in visible_files(root) if not is_weight_file(p)])


def weights_sha256(model_dir: str, hashes: FileHashes) -> str:
    """sha256 of a model folder's weight files and indexes."""
    root = Path(model_dir)
    return tree_sha256(hashes, root, checkpoint_weight_files(root))


def users_model_dir(target_model: str) -> str | None:
    """`target_model` when it is the user's own model folder: not a hub id, and not the demo model, which a
    rule makes (Snakemake tracks that one as a rule's output)."""
    return target_model if target_model != DEMO_MODEL and Path(target_model).is_dir() else None


def target_weights_sha256(target_model: str, hashes: FileHashes) -> str | None:
    """The weights digest the shard rules get: of the user's model folder, None otherwise."""
    model_dir = users_model_dir(target_model)
    return model_dir and weights_sha256(model_dir, hashes)
