"""SpecForge 0.2.0's offline EAGLE-3 files: one `torch.save` file per sample, and what SpecForge reads beside them.

A cache directory holds `shard-NNNNNN/` directories of `sample-NNNNNNNNN.ckpt` files, `vocab_mapping.pt`
(the file SpecForge's `model.vocab_mapping_path` names) and our `manifest.json`. Each sample file is a
plain dict in torch's default zipfile serialization (SpecForge memory-maps it):

    input_ids         [L]         int64  the tokens, unshifted
    loss_mask         [L]         int64  1 at supervised (assistant) tokens, unshifted
    hidden_state      [1, L, H]   bf16   the target's final decoder output after its final norm
    aux_hidden_state  [1, L, 3H]  bf16   the three aux layers' outputs, concatenated in layer order

L is the sample's real length: nothing is padded, and SpecForge shifts at read time. File names carry
zero-padded global sample indices, because SpecForge's reader walks the directory recursively and
orders the files by their absolute paths as strings.

This module writes and reads single files (samples, the vocabulary mapping, a target's weight index);
`specforge_shard` writes a shard's directory, `specforge_cache` the manifest and the cache checker.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import torch_save_atomic, write_json_atomic
from .errors import CacheConfigError
from .shard_format import safetensors_entries
from .specforge_sizes import sample_shapes

SPECFORGE_VERSION = "0.2.0"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SAMPLE_DIGITS = 9
STORED_DTYPE = torch.bfloat16
# What the files hold of the target's prediction (a `CacheSpec.target_repr`): SpecForge applies lm_head itself.
TARGET_REPR = "hidden_state"
HIDDEN_KEYS = ("hidden_state", "aux_hidden_state")


# --- Writing sample files ----------------------------------------------------------------------


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


def sample_tensors(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, hidden_state: torch.Tensor, aux_hidden_state: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One sample's file content from its `[L]` tokens and mask and `[L, H]`, `[L, 3H]` hidden states.

    Each tensor is copied into storage of its own: `torch.save` writes a view's whole underlying storage.
    """
    return {
        "input_ids": input_ids.to(torch.int64).clone(memory_format=torch.contiguous_format),
        "loss_mask": loss_mask.to(torch.int64).clone(memory_format=torch.contiguous_format),
        "hidden_state": hidden_state.unsqueeze(0).clone(memory_format=torch.contiguous_format),
        "aux_hidden_state": aux_hidden_state.unsqueeze(0).clone(memory_format=torch.contiguous_format),
    }


def serialized(sample: Mapping[str, torch.Tensor]) -> bytes:
    """`torch.save` bytes of a sample (zipfile serialization; the same tensors give the same bytes)."""
    buffer = io.BytesIO()
    torch.save(dict(sample), buffer)
    return buffer.getvalue()


# --- Reading and checking sample files ---------------------------------------------------------


def read_sample_file(path: str | os.PathLike, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A sample file as SpecForge loads it: memory-mapped, so only what is touched is read; or from `data`,
    its bytes already read."""
    try:
        if data is None:
            sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            sample = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CacheConfigError(
            f"{path}: not a readable torch.save zip file ({error}). Delete its shard directory and rerun the workflow."
        ) from error
    if not isinstance(sample, dict):
        raise CacheConfigError(f"{path}: holds a {type(sample).__name__}, not a dict of tensors. Rebuild its shard.")
    return sample


def sample_problems(sample: Mapping[str, Any], *, num_tokens: int, hidden_size: int) -> list[str]:
    """How a loaded sample differs from what SpecForge reads: keys, dtypes, shapes, a 0/1 loss mask."""
    dtypes = {"input_ids": torch.int64, "loss_mask": torch.int64, "hidden_state": STORED_DTYPE}
    shapes = sample_shapes(num_tokens, hidden_size)
    expected = {key: (dtypes.get(key, STORED_DTYPE), shape) for key, shape in shapes.items()}
    problems = [f"missing key {key!r}" for key in expected if key not in sample]
    problems += [f"unexpected key {key!r}" for key in sample if key not in expected]
    for key, (dtype, shape) in expected.items():
        value = sample.get(key)
        if isinstance(value, torch.Tensor) and (value.dtype, tuple(value.shape)) != (dtype, shape):
            problems.append(f"{key}: stored {value.dtype} {list(value.shape)}, expected {dtype} {list(shape)}")
        elif key in sample and not isinstance(value, torch.Tensor):
            problems.append(f"{key}: a {type(value).__name__}, not a tensor")
    loss_mask = sample.get("loss_mask")
    if isinstance(loss_mask, torch.Tensor) and not ((loss_mask == 0) | (loss_mask == 1)).all():
        problems.append("loss_mask holds values other than 0 and 1")
    return problems


def nonfinite_values(sample: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many NaN or infinite values each hidden state holds."""
    return {key: int((~torch.isfinite(sample[key])).sum()) for key in HIDDEN_KEYS}


# --- The vocabulary mapping --------------------------------------------------------------------


def vocab_mapping(selected_token_ids: torch.Tensor, target_vocab_size: int) -> dict[str, torch.Tensor]:
    """SpecForge's `{"d2t": int64[Vd], "t2d": bool[V]}` for our draft vocabulary.

    SpecForge reads the draft's logit columns as the target ids `t2d` selects in ascending order
    (`target[..., t2d]`) and requires `nonzero(t2d) == d2t + arange(Vd)`, so draft id i is the i-th
    smallest of our selected ids: the same set as `vocab_selection.pt`, sorted by id.
    """
    ids = torch.sort(selected_token_ids.to(torch.int64)).values
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= target_vocab_size or torch.unique(ids).numel() != ids.numel():
        raise CacheConfigError(
            f"the draft vocabulary must be distinct ids in [0, {target_vocab_size}); rerun the select_vocab rule."
        )
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {"d2t": ids - torch.arange(ids.numel()), "t2d": t2d}


def write_vocab_mapping(path: str | os.PathLike, selected_token_ids: torch.Tensor, target_vocab_size: int) -> None:
    """`vocab_mapping.pt`, written from our vocabulary selection."""
    torch_save_atomic(path, vocab_mapping(selected_token_ids, target_vocab_size))


def vocab_mapping_problems(path: Path, selected_token_ids: Sequence[int], target_vocab_size: int) -> list[str]:
    """How a vocabulary mapping file differs from the one our selection gives."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        return [f"unreadable ({error})"]
    expected = vocab_mapping(torch.tensor(list(selected_token_ids)), target_vocab_size)
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        return [f"holds {sorted(saved) if isinstance(saved, dict) else type(saved).__name__}, expected d2t and t2d"]
    return [
        f"{key} differs from the manifest's selected_token_ids (stored {saved[key].dtype} {list(saved[key].shape)})"
        for key, want in expected.items()
        if saved[key].dtype != want.dtype or not torch.equal(saved[key], want)
    ]


# --- What SpecForge reads from the target directory --------------------------------------------


def lm_head_key(model: nn.Module) -> str:
    """The checkpoint key of the weight lm_head multiplies; for a tied model, the input embedding's key."""
    weight = model.get_output_embeddings().weight
    return next(name for name, parameter in model.named_parameters() if parameter is weight)


def write_weight_index(model_dir: str | os.PathLike) -> Path:
    """`model.safetensors.index.json` for a checkpoint saved as one `model.safetensors`.

    SpecForge's TargetHead finds lm_head_key only through an index; transformers still loads the
    single file (it looks for it before an index).
    """
    model_dir = Path(model_dir)
    entries = safetensors_entries(model_dir / SINGLE_WEIGHTS_FILE)
    index = {
        "metadata": {"total_size": max((entry["data_offsets"][1] for entry in entries.values()), default=0)},
        "weight_map": {name: SINGLE_WEIGHTS_FILE for name in sorted(entries)},
    }
    path = model_dir / WEIGHT_INDEX_FILE
    write_json_atomic(path, index)
    return path


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
