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
`specforge_layout` holds the names and checks that need no torch, `specforge_shard` writes a shard's
directory, `specforge_cache` the manifest.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import torch_save_atomic, write_json_atomic
from .cache_dir import safetensors_entries
from .errors import CacheConfigError
from .specforge_layout import HIDDEN_KEYS, SINGLE_WEIGHTS_FILE, WEIGHT_INDEX_FILE, vocab_mapping
from .specforge_sizes import sample_shapes

STORED_DTYPE = torch.bfloat16
# What the files hold of the target's prediction (a `CacheSpec.target_repr`): SpecForge applies lm_head itself.
TARGET_REPR = "hidden_state"


# --- Writing sample files ----------------------------------------------------------------------


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


def write_vocab_mapping(
    path: str | os.PathLike, selected_token_ids: Sequence[int] | np.ndarray, target_vocab_size: int
) -> None:
    """`vocab_mapping.pt`, written from our vocabulary selection."""
    mapping = vocab_mapping(selected_token_ids, target_vocab_size)
    torch_save_atomic(path, {key: torch.from_numpy(values) for key, values in mapping.items()})


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
