"""The specforge format's names and fixed facts, without torch: file names, the staging directory, the vocabulary
mapping, and what SpecForge needs of a local target directory.

The manifest and report jobs check a specforge cache with these alone; `specforge_format` writes and reads
the files themselves.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CacheConfigError
from .torch_save import load_torch_save

SPECFORGE_VERSION = "0.2.0"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SAMPLE_DIGITS = 9
HIDDEN_KEYS = ("hidden_state", "aux_hidden_state")


def sample_file_name(index: int) -> str:
    """`sample-000004242.ckpt` for global sample 4242: zero-padded, so that string order is sample order."""
    if not 0 <= index < 10**SAMPLE_DIGITS:
        raise CacheConfigError(
            f"sample index {index} does not fit the {SAMPLE_DIGITS}-digit file names of the specforge format; "
            f"split the dataset into runs of fewer than {10**SAMPLE_DIGITS} samples."
        )
    return f"sample-{index:0{SAMPLE_DIGITS}d}.ckpt"


def staging_root(cache_dir: str | os.PathLike) -> Path:
    """`<cache dir>.staging`, where shard directories are built: beside the tree SpecForge walks."""
    cache_dir = Path(cache_dir)
    return cache_dir.with_name(cache_dir.name + ".staging")


def staging_dir_for(shard_dir: str | os.PathLike) -> Path:
    """Where one shard directory is built before it is renamed into place."""
    shard_dir = Path(shard_dir)
    return staging_root(shard_dir.parent) / shard_dir.name


def vocab_mapping(selected_token_ids: Sequence[int] | np.ndarray, target_vocab_size: int) -> dict[str, np.ndarray]:
    """SpecForge's `{"d2t": int64[Vd], "t2d": bool[V]}` for our draft vocabulary.

    SpecForge reads the draft's logit columns as the target ids `t2d` selects in ascending order
    (`target[..., t2d]`) and requires `nonzero(t2d) == d2t + arange(Vd)`, so draft id i is the i-th
    smallest of our selected ids: the same set as `vocab_selection.pt`, sorted by id.
    """
    ids = np.sort(np.asarray(selected_token_ids, dtype=np.int64))
    if ids.size == 0 or ids[0] < 0 or ids[-1] >= target_vocab_size or np.unique(ids).size != ids.size:
        raise CacheConfigError(
            f"the draft vocabulary must be distinct ids in [0, {target_vocab_size}); rerun the select_vocab rule."
        )
    t2d = np.zeros(target_vocab_size, dtype=bool)
    t2d[ids] = True
    return {"d2t": ids - np.arange(ids.size), "t2d": t2d}


def vocab_mapping_problems(path: Path, selected_token_ids: Sequence[int], target_vocab_size: int) -> list[str]:
    """How a vocabulary mapping file differs from the one our selection gives."""
    try:
        saved = load_torch_save(path)
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        return [f"unreadable ({error})"]
    expected = vocab_mapping(selected_token_ids, target_vocab_size)
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        return [f"holds {sorted(saved) if isinstance(saved, dict) else type(saved).__name__}, expected d2t and t2d"]
    return [
        f"{key} differs from the manifest's selected_token_ids (stored {saved[key].dtype} {list(saved[key].shape)})"
        for key, want in expected.items()
        if saved[key].dtype != want.dtype or not np.array_equal(saved[key], want)
    ]


def target_dir_problems(model_dir: str | os.PathLike, key: str) -> list[str]:
    """What SpecForge's TargetHead would reject in a local target directory: config, index, lm_head_key."""
    model_dir = Path(model_dir)
    problems = [] if (model_dir / "config.json").is_file() else [f"{model_dir}: no config.json"]
    indexes = sorted(model_dir.glob("*.index.json"))
    if len(indexes) != 1:
        problems.append(
            f"{model_dir}: {len(indexes)} *.index.json files, SpecForge needs exactly one "
            "(for a single model.safetensors, write one with eagle3_cache.specforge_format.write_weight_index)"
        )
    elif key not in json.loads(indexes[0].read_text()).get("weight_map", {}):
        problems.append(f"{indexes[0]}: no {key!r} in its weight_map, which SpecForge's lm_head_key must name")
    return problems
