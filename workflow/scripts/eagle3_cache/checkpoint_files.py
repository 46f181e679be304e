"""A local checkpoint's files checked before any job, without torch: every safetensors file whole, an output
head (or a config that ties it to the embedding), an embedding row for every token id, a chat template.

Read from the safetensors headers (a few KB each, never the weights), config.json and the tokenizer's
files, so the Snakefile runs them on every run as it is read (see `preflight.check_run`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import read_json_file
from .errors import CacheConfigError

HEADER_LENGTH_BYTES = 8
INDEX_SUFFIX = ".safetensors.index.json"
# Where transformers finds a chat template beside a tokenizer: the tokenizer's config, or a file of its own.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FOLDER = "additional_chat_templates"
HEAD_SUFFIX = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class StoredTensor:
    file: str
    shape: tuple[int, ...]


def checked_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint's safetensors files, by name, once each file is found whole and every
    file an index names is there."""
    for index in sorted(model_dir.glob(f"*{INDEX_SUFFIX}")):
        weight_map = read_json(index).get("weight_map") or {}
        missing = sorted({name for name in weight_map.values() if not (model_dir / name).is_file()})
        if missing:
            raise CacheConfigError(
                f"{index}: names {', '.join(missing)}, which the directory lacks; "
                "copy the checkpoint's weight files whole"
            )
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, shape in whole_file_tensors(path).items():
            tensors[name] = StoredTensor(path.name, shape)
    return tensors


def whole_file_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of one safetensors file's tensors, or an error if its header is unreadable or its data
    section shorter than the header's offsets say (a copy cut short)."""
    size = path.stat().st_size
    again = "copy the file again from the checkpoint"
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == HEADER_LENGTH_BYTES else (None,)
        if length is None or HEADER_LENGTH_BYTES + length > size:
            raise CacheConfigError(f"{path}: {size} bytes, too short for its safetensors header; {again}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CacheConfigError(f"{path}: its safetensors header is not valid JSON ({error}); {again}") from error
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    needed = HEADER_LENGTH_BYTES + length + max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if size < needed:
        raise CacheConfigError(f"{path}: {size} bytes, its header describes {needed} (cut short); {again}")
    return {name: tuple(entry["shape"]) for name, entry in entries.items()}


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model's config with its `text_config` (a multimodal model's decoder) laid over it."""
    return {**config, **(config.get("text_config") or {})}


def check_checkpoint_files(model_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuse a local checkpoint whose files would load into a model other than the one they describe."""
    tensors = checked_tensors(model_dir)
    if tensors:
        embedding = stored_tensor(tensors, EMBEDDING_SUFFIXES)
        check_output_head(model_dir, config, tensors, embedding)
        if embedding is not None:
            check_token_ids_fit(model_dir, *embedding)
    check_chat_template(model_dir)


def stored_tensor(tensors: Mapping[str, StoredTensor], suffixes: tuple[str, ...]) -> tuple[str, StoredTensor] | None:
    """The first tensor whose name ends with one of `suffixes`, with its name."""
    return next(((name, t) for name, t in tensors.items() if name.endswith(suffixes)), None)


def check_output_head(
    model_dir: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, StoredTensor],
    embedding: tuple[str, StoredTensor] | None,
) -> None:
    """An untied model needs its head's weights: without them transformers draws a random head, and every
    cached distribution would be noise. A tied one's stored head, if any, has the embedding's shape."""
    head = stored_tensor(tensors, (HEAD_SUFFIX,))
    tied = text_config(config).get("tie_word_embeddings")
    if head is None and tied is False:
        raise CacheConfigError(
            f"{model_dir / 'config.json'}: tie_word_embeddings is false, but no weight file of target_model has "
            f"{HEAD_SUFFIX}, so the model would load with a random output head; copy the checkpoint's weights "
            "whole, or set tie_word_embeddings: true if the model ties its head to its input embedding"
        )
    if head is not None and embedding is not None and tied and head[1].shape != embedding[1].shape:
        raise CacheConfigError(
            f"{model_dir / head[1].file}: {head[0]} is {list(head[1].shape)}, but config.json ties it to "
            f"{embedding[0]}, which is {list(embedding[1].shape)}; restore the checkpoint's config.json or weights"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, or an error naming it."""
    return read_json_file(path, "restore it from the checkpoint")


def tokenizer_max_id(model_dir: Path) -> int | None:
    """The largest token id tokenizer.json defines (its vocabulary and added tokens); None without one."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = read_json(path)
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1] if vocab else []
    ids += [token["id"] for token in tokenizer.get("added_tokens") or []]
    return max(ids, default=None)


def check_token_ids_fit(model_dir: Path, name: str, embedding: StoredTensor) -> None:
    """Every id the tokenizer can produce has a row in the embedding (an id past it fails mid-shard)."""
    max_id, rows = tokenizer_max_id(model_dir), embedding.shape[0]
    if max_id is not None and max_id >= rows:
        raise CacheConfigError(
            f"{model_dir / 'tokenizer.json'}: token ids go up to {max_id}, but {name} in {embedding.file} has "
            f"{rows} rows; the tokenizer belongs to another model: copy the checkpoint's own tokenizer files"
        )


def check_chat_template(model_dir: Path) -> None:
    """The conversations are rendered with the tokenizer's chat template, so it must have one."""
    config_file = model_dir / "tokenizer_config.json"
    tokenizer_config = read_json(config_file) if config_file.is_file() else {}
    if tokenizer_config.get("chat_template") or (model_dir / CHAT_TEMPLATE_FOLDER).is_dir():
        return
    if any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return
    raise CacheConfigError(
        f"target_model '{model_dir}' has no chat template (none in tokenizer_config.json, no "
        f"{' or '.join(CHAT_TEMPLATE_FILES)}), which the conversations are rendered with; use an instruct/chat "
        "model's tokenizer, or add its template"
    )


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest sequence the model's positions cover: max_position_embeddings, or what its rope scaling
    stretches the original context to, whichever is longer; None when the config states neither."""
    decoder = text_config(config)
    declared = decoder.get("max_position_embeddings")
    scaling = decoder.get("rope_scaling") or decoder.get("rope_parameters") or {}
    factor = scaling.get("factor") if isinstance(scaling, Mapping) else None
    original = scaling.get("original_max_position_embeddings", declared) if isinstance(scaling, Mapping) else None
    stretched = int(factor * original) if isinstance(factor, int | float) and isinstance(original, int) else None
    lengths = [length for length in (declared, stretched) if isinstance(length, int)]
    return max(lengths, default=None)


def check_seq_length(config: Mapping[str, Any], seq_length: int) -> None:
    """seq_length within the model's context: past it, positions the model never learned fill the cache."""
    context = context_length(config)
    if context is not None and seq_length > context:
        raise CacheConfigError(
            f"seq_length {seq_length} is longer than the target's context of {context} positions "
            f"(max_position_embeddings, with its rope scaling, in its config.json); set seq_length to at most {context}"
        )
