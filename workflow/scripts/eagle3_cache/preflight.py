"""Checks of a run's settings that need no work, so that a mistake stops the run before anything is computed.

Torch-free and cheap (a model's config.json and a directory listing), so the Snakefile runs them on
every run while it is read (startup.checked_config) and `snakemake -n` stays fast. The jobs check again what
only they can see: the data's rows, a hub model's config, the devices of the machine they run on.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint_files import check_checkpoint_files, check_seq_length, read_json, text_config
from .errors import CacheConfigError
from .layout import (
    DEMO_MODEL,
    JSON_SUFFIXES,
    LOCAL_DATA_SUFFIXES,
    MODEL_CONFIG_FILE,
    PARQUET_SUFFIX,
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    is_json_file,
    is_local_data,
    names_local_path,
)

_SLICED_SPLIT = re.compile(r"^(\w+)\[(\d*):(\d*)\]$")
# EAGLE-3 reads the hidden states of three target layers: low, middle and high.
AUX_LAYER_COUNT = 3


def check_run(settings: Mapping[str, Any]) -> None:
    """Refuse settings that name a missing or unusable model or data, or layers, ids and positions the model
    lacks."""
    config = local_model_config(settings["target_model"], settings["revision"])
    if config is not None:
        check_checkpoint_files(Path(settings["target_model"]), config)
        check_model_config(config, settings)
    check_input_data(settings["input_data"], settings["split"])
    check_data_revision(settings["input_data"], settings["data_revision"])


def ignored_settings_note(settings: Mapping[str, Any]) -> str | None:
    """A note when the run sets a split that its data does not apply (a local JSON file is read whole)."""
    if is_json_file(settings["input_data"]) and settings["split"] is not None:
        return (
            f"split {settings['split']!r} does not apply to the local JSON file {settings['input_data']!r}, which "
            "is read whole, in file order; it is only recorded in the manifest"
        )
    return None


# --- The target model ---------------------------------------------------------------------------


def local_model_config(target_model: str, revision: str | None) -> dict[str, Any] | None:
    """A local target directory's config.json, once the directory is checked to hold a whole model;
    None for a hub id (the first job that loads it checks it) and for the demo model before its rule made it."""
    path = Path(target_model)
    if not names_local_path(target_model) or (target_model == DEMO_MODEL and not path.exists()):
        return None
    named = f"target_model {target_model!r}"
    if not path.is_dir():
        raise CacheConfigError(f"{named}: no such directory; give a local model directory or a hub id (org/name)")
    if revision is not None:
        raise CacheConfigError(
            f"{named} is a local directory, which has no revisions: remove `revision: {revision}` "
            "(it applies to hub ids)"
        )
    config_file = path / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise CacheConfigError(
            f"{named} is not a model directory: it has no {MODEL_CONFIG_FILE}; point target_model at the folder "
            "that save_pretrained or `hf download --local-dir` wrote"
        )
    if not any(file.suffix in WEIGHT_SUFFIXES for file in path.iterdir()):
        raise CacheConfigError(
            f"{named} has no weights (no {' or '.join('*' + s for s in WEIGHT_SUFFIXES)} file in it); "
            "copy them in, or point target_model at the complete checkpoint"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CacheConfigError(
            f"{named} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer into it too"
        )
    return read_json(config_file)


def check_model_config(config: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """aux_layer_ids within the target's depth, draft_vocab_size within its vocabulary and seq_length within
    its context, as its config (a config.json's content, or `PretrainedConfig.to_dict()`) states them; what
    it does not state is left to the shard job, which checks the loaded model."""
    decoder = text_config(config)
    depth = decoder.get("num_hidden_layers")
    if isinstance(depth, int):
        resolved_aux_layer_ids(settings["aux_layer_ids"], depth)
    vocab_size = decoder.get("vocab_size")
    if isinstance(vocab_size, int):
        check_draft_vocab_size(settings["draft_vocab_size"], vocab_size)
    check_seq_length(config, settings["seq_length"])


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high layer recipe."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def validate_aux_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """Exactly AUX_LAYER_COUNT distinct in-range layer ids, or an error that says what to set."""
    ids = list(aux_layer_ids)
    in_range = all(0 <= i < num_layers for i in ids)
    if len(ids) != AUX_LAYER_COUNT or len(set(ids)) != AUX_LAYER_COUNT or not in_range:
        raise CacheConfigError(
            f"aux_layer_ids must be {AUX_LAYER_COUNT} distinct layer ids in [0, {num_layers - 1}] for this "
            f"{num_layers}-layer target; got {ids}. Set `aux_layer_ids` in the run's config "
            "(it must match the draft's num_aux_hidden_states)."
        )
    return ids


def resolved_aux_layer_ids(aux_layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    """The configured ids, or the default recipe for this depth, validated."""
    return validate_aux_layer_ids(
        default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids, num_layers
    )


def check_draft_vocab_size(draft_vocab_size: int | None, vocab_size: int) -> None:
    """A draft vocabulary no larger than the target's: a larger one would silently be the whole vocabulary."""
    if draft_vocab_size is not None and draft_vocab_size > vocab_size:
        raise CacheConfigError(
            f"draft_vocab_size {draft_vocab_size} is larger than the target's vocabulary of {vocab_size} tokens: "
            f"set it to at most {vocab_size}, or to null for the whole vocabulary"
        )


# --- The input data -----------------------------------------------------------------------------


def check_data_revision(input_data: str, data_revision: str | None) -> None:
    """A revision names a commit of a hub dataset; a local file has none (it is tracked by its content)."""
    if data_revision is not None and is_local_data(input_data):
        raise CacheConfigError(
            f"input_data {input_data!r} is local, which has no revisions: remove `data_revision: {data_revision}` "
            "(a local file is tracked by its content)"
        )


def check_input_data(input_data: str, split: str | None) -> None:
    """A local JSON or Parquet file, a folder of Parquet files, or a hub dataset id with a split."""
    named = f"input_data {input_data!r}"
    path = Path(input_data)
    if not is_local_data(input_data):
        if split is None:
            raise CacheConfigError(
                f"{named} is no local file, so it names a hub dataset, which needs `split` (e.g. train or "
                f"train[:1000]); for a local file, give its path with its suffix ({', '.join(LOCAL_DATA_SUFFIXES)})"
            )
        parse_split(split)
        return
    if not path.exists():
        raise CacheConfigError(f"{named}: no such file or directory{similar_data_files(path)}")
    if path.is_dir():
        if not any(path.rglob(f"*{PARQUET_SUFFIX}")):
            raise CacheConfigError(
                f"{named} is a directory without {PARQUET_SUFFIX} files; give a data file or a folder of Parquet files"
            )
    elif path.suffix.lower() not in LOCAL_DATA_SUFFIXES:
        raise CacheConfigError(
            f"{named} is neither JSON ({', '.join(JSON_SUFFIXES)}) nor Parquet ({PARQUET_SUFFIX}); "
            "convert it, or rename it if it is one of them"
        )
    if not is_json_file(input_data):
        parse_split(split)


def similar_data_files(path: Path) -> str:
    """`" (did you mean data/chats.jsonl?)"` when data files with that name and a data suffix exist, else ""."""
    if not path.parent.is_dir():
        return ""
    pattern = glob.escape(str(path)) + ".*"
    similar = sorted(name for name in glob.glob(pattern) if Path(name).suffix.lower() in LOCAL_DATA_SUFFIXES)
    return f" (did you mean {' or '.join(similar)}?)" if similar else ""


def parse_split(split: str | None) -> tuple[str | None, slice | None]:
    """`"train[10:20]"` -> `("train", slice(10, 20))`; `"train"` -> `("train", None)`."""
    if split is None or "[" not in split:
        return split, None
    match = _SLICED_SPLIT.match(split)
    if match is None:
        # datasets would take e.g. "train[:10%]" itself, slicing before our shuffle.
        raise CacheConfigError(f"split {split!r}: only `name[start:stop]` with non-negative row numbers is supported")
    start, stop = (int(bound) if bound else None for bound in match.group(2, 3))
    return match.group(1), slice(start, stop)


# --- The device ---------------------------------------------------------------------------------


def cuda_device_count() -> int | None:
    """CUDA devices this process sees, asked of the NVIDIA driver as torch asks it (CUDA_VISIBLE_DEVICES
    applies): 0 without a driver; None when unknown (a ROCm machine, whose torch calls its GPUs cuda)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None if Path("/dev/kfd").exists() else 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def check_device(device: str, cuda_devices: Callable[[], int | None] = cuda_device_count) -> None:
    """Refuse `device: cuda` where `cuda_devices()` finds no CUDA device (None: unknown, accepted); it is
    asked only for `device: cuda`."""
    if device == "cuda" and cuda_devices() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        raise CacheConfigError(
            f"device is 'cuda' but no CUDA device is visible here{where}; set `device: auto` (the CPU when "
            "there is no GPU) or `device: cpu`, or run on a machine with a GPU"
        )
