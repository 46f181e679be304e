"""Load conversation rows and normalise them to OpenAI `messages`, as Automodel's ChatDataset does.

Sources: a Hugging Face dataset id, a local JSON/JSONL file, or a local Parquet file or directory.
Hub and Parquet data are shuffled with `shuffle_seed` over the whole base split before any
`[a:b]` slice is taken; JSON/JSONL keep file order.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, VerificationMode, load_dataset

from .errors import CacheConfigError
from .layout import JSON_LINES_SUFFIXES, JSON_SUFFIXES, LOCAL_DATA_SUFFIXES, PARQUET_SUFFIX

log = logging.getLogger(__name__)

ACCEPTED_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

_SLICED_SPLIT = re.compile(r"^(\w+)\[(\d*):(\d*)\]$")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class Conversation:
    """One sample: its position in the dataset, its OpenAI-style messages and its tool schemas."""

    index: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


def load_rows(input_data: str, split: str | None, shuffle_seed: int | None) -> Sequence[Mapping[str, Any]]:
    """The dataset rows in cache order (see the module docstring for each source's order)."""
    path = Path(input_data)
    if path.is_file() and path.suffix.lower() in JSON_SUFFIXES:
        if split is not None or shuffle_seed is not None:
            log.info("%s is a local JSON file: split and shuffle_seed are recorded but not applied", path)
        return read_json_rows(path)
    base_split, window = parse_split(split)
    dataset = load_base_split(input_data, base_split)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    if window is not None:
        dataset = dataset.select(range(*window.indices(len(dataset))))
    return dataset


def load_base_split(input_data: str, base_split: str | None) -> Dataset:
    """A whole split of a Parquet file or folder (default "train") or of a hub dataset."""
    path = Path(input_data)
    if path.is_file() and path.suffix.lower() == PARQUET_SUFFIX:
        return load_hf_dataset("parquet", base_split or "train", data_files=str(path))
    if path.is_dir():
        if not any(path.rglob(f"*{PARQUET_SUFFIX}")):
            raise CacheConfigError(f"input_data {input_data!r} is a directory without .parquet files")
        return load_hf_dataset(str(path), base_split or "train")
    if path.exists():
        raise CacheConfigError(f"input_data {input_data!r} is neither JSON ({', '.join(JSON_SUFFIXES)}) nor Parquet")
    if not _HUB_ID.match(input_data) or path.suffix.lower() in LOCAL_DATA_SUFFIXES:
        raise CacheConfigError(f"input_data {input_data!r}: no such file or directory")
    if base_split is None:
        raise CacheConfigError(f"input_data {input_data!r} is a hub dataset: set `split` (e.g. train)")
    return load_hf_dataset(input_data, base_split)


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


def load_hf_dataset(path: str, split: str, data_files: str | None = None) -> Dataset:
    """`datasets.load_dataset` with its failures turned into a message naming the input."""
    try:
        return load_dataset(path, split=split, data_files=data_files, verification_mode=VerificationMode.NO_CHECKS)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise CacheConfigError(
            f"input_data {data_files or path!r}, split {split!r}: could not load the dataset ({error}). "
            "Check the dataset id or path and the split name."
        ) from error


def read_json_rows(path: Path) -> list[Mapping[str, Any]]:
    """Rows of a JSON Lines file, a JSON list, or a single JSON object, in file order."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        return [
            parse_json(line, f"{path}, line {number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    document = parse_json(text, str(path))
    return document if isinstance(document, list) else [document]


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CacheConfigError(f"{where}: invalid JSON ({error}); fix or remove it") from error


def iter_conversations(rows: Iterable[Mapping[str, Any]]) -> Iterator[Conversation]:
    """Each row as a normalised Conversation, in row order."""
    for index, row in enumerate(rows):
        yield conversation_from_row(row, index)


def conversation_from_row(row: Mapping[str, Any], index: int) -> Conversation:
    """A row's OpenAI `messages` or ShareGPT `conversations`, normalised and checked."""
    if not isinstance(row, Mapping):
        raise CacheConfigError(f"sample {index}: expected an object with `messages`, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = [normalize_message(message, index) for message in turns(row, "messages", index)]
    elif row.get("conversations") is not None:
        messages = [sharegpt_message(turn, index) for turn in turns(row, "conversations", index)]
    else:
        raise CacheConfigError(
            f"sample {index}: no `messages` (OpenAI) or `conversations` (ShareGPT) list; its keys are {sorted(row)}"
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise CacheConfigError(
            f"sample {index} has no assistant turn, so no token of it would be supervised; "
            "remove it from the data or fix its roles"
        )
    return Conversation(index=index, messages=messages, tools=row_tools(row, index))


def turns(row: Mapping[str, Any], key: str, index: int) -> list[Mapping[str, Any]]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(turn, Mapping) for turn in value):
        raise CacheConfigError(f"sample {index}: `{key}` must be a list of objects")
    return value


def normalize_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The message with its role checked and its content flattened to text; other keys are kept."""
    role = message.get("role")
    if role not in ACCEPTED_ROLES:
        raise CacheConfigError(f"sample {index}: unknown role {role!r}; accepted roles are {', '.join(ACCEPTED_ROLES)}")
    normalized = dict(message)
    normalized["content"] = content_text(message.get("content"))
    if role == "assistant" and "reasoning_content" in message:
        normalized["reasoning_content"] = reasoning_text(message["reasoning_content"], index)
    return normalized


def sharegpt_message(turn: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A ShareGPT `{from, value}` turn as an OpenAI message."""
    source_role = turn.get("from", turn.get("role"))
    role = SHAREGPT_ROLES.get(source_role)
    if role is None:
        raise CacheConfigError(
            f"sample {index}: unknown ShareGPT role {source_role!r}; accepted roles are {', '.join(SHAREGPT_ROLES)}"
        )
    return {"role": role, "content": content_text(turn.get("value", turn.get("content", "")))}


def content_text(content: Any) -> str:
    """Message content as text: list-of-parts content keeps its text parts, joined with spaces."""
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return "" if content is None else str(content)


def reasoning_text(reasoning: Any, index: int) -> str:
    if reasoning is None:
        return ""
    if not isinstance(reasoning, str):
        raise CacheConfigError(f"sample {index}: `reasoning_content` must be a string, got {type(reasoning).__name__}")
    return reasoning


def row_tools(row: Mapping[str, Any], index: int) -> list[dict[str, Any]] | None:
    """The row's tool schemas for the chat template (JSON Lines often store them as a JSON string)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = parse_json(tools, f"sample {index}, `tools`")
    if tools is not None and not isinstance(tools, list):
        raise CacheConfigError(f"sample {index}: `tools` must be a list, got {type(tools).__name__}")
    return tools or None
