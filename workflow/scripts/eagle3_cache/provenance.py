"""What produced a cache: settings fingerprint, producer and package versions."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from . import CACHE_SEMANTICS_VERSION, __version__
from .layout import SHARD_SETTINGS, WEIGHTS_DIGEST

# The shard rule's params: its settings, the target's weights by content and the cache semantics version.
SHARD_SETTING_KEYS = (*SHARD_SETTINGS, WEIGHTS_DIGEST, "cache_semantics_version")
RECORDED_PACKAGES = ("torch", "transformers", "safetensors", "h5py", "datasets", "tokenizers", "numpy", "snakemake")


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the shard-shaping settings, so shards built under other settings are caught."""
    chosen = {key: settings[key] for key in SHARD_SETTING_KEYS}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def ids_fingerprint(token_ids: list[int]) -> str:
    """sha256 of an ordered id list (the draft vocabulary's column order matters)."""
    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()


def producer() -> dict[str, Any]:
    """This package's identity."""
    return {"name": "eagle3-cache", "version": __version__, "cache_semantics_version": CACHE_SEMANTICS_VERSION}


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape the numbers, and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


HASH_CHUNK_BYTES = 16 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
