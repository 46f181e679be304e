"""Load conversation rows and normalise them to OpenAI `messages`, as Automodel's ChatDataset does.

Sources: a Hugging Face dataset id, a local JSON/JSONL file, or a local Parquet file or directory.
Hub and Parquet data are shuffled with `shuffle_seed` over the whole base split before any
`[a:b]` slice is taken; JSON/JSONL keep file order.

Messages name a row as its input does: `chats.jsonl, line 12` (1-based, blank lines counted),
`chats.json, item 3` (1-based), or `org/chats, row 7` (0-based, after shuffling and slicing, as
`dataset[7]` would give it). `datasets` is imported only for hub and Parquet data, so a JSON file's
rows are read and checked before the tokenize job pays for its heavy imports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CacheConfigError
from .hub import check_hub_access
from .layout import JSON_LINES_SUFFIXES, PARQUET_SUFFIX, is_json_file
from .preflight import check_input_data, parse_split

if TYPE_CHECKING:
    from datasets import Dataset

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


@dataclass(frozen=True)
class Conversation:
    """One sample: its position in the cache, its OpenAI-style messages, its tool schemas, and how
    messages name it (`chats.jsonl, line 12`)."""

    index: int
    messages: list[dict[str, Any]]
    where: str
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Rows(Sequence):
    """A dataset's rows in cache order, and `where(i)`: how messages name row i."""

    items: Sequence[Mapping[str, Any]]
    where: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | slice) -> Any:
        return self.items[index]

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.items)

    def window(self, start: int, stop: int) -> Rows:
        """Rows [start, stop), still named as in the whole dataset."""
        selected = range(start, stop)
        items = self.items.select(selected) if hasattr(self.items, "select") else self.items[start:stop]
        return Rows(items, lambda index: self.where(start + index))


@dataclass(frozen=True)
class Part:
    """Rows [first_row, first_row + num_rows) of a dataset, tokenized by one job (data_parts.py); in a JSON
    Lines file, the bytes [byte_start, byte_stop) from line `first_line` hold them."""

    first_row: int
    num_rows: int
    byte_start: int | None = None
    byte_stop: int | None = None
    first_line: int | None = None


def checked(rows: Rows, input_data: str) -> Rows:
    """`rows` (of `input_data`), every one checked to make a conversation, so that a bad row stops the job
    before any work."""
    if not rows:
        raise CacheConfigError(f"input_data {input_data!r} holds no rows; check the file (or split)")
    for _ in iter_conversations(rows):
        pass
    return rows


def load_rows(
    input_data: str,
    split: str | None,
    shuffle_seed: int | None,
    data_revision: str | None = None,
    part: Part | None = None,
) -> Rows:
    """The dataset rows in cache order (see the module docstring for each source's order), or those of
    `part`; a hub dataset at `data_revision` (its default branch for None)."""
    rows = whole_or_part_rows(input_data, split, shuffle_seed, data_revision, part)
    if part is None:
        return rows
    if part.byte_start is None:
        rows = rows.window(part.first_row, min(part.first_row + part.num_rows, len(rows)))
    if len(rows) != part.num_rows:
        raise CacheConfigError(
            f"input_data {input_data!r}: its rows from {part.first_row} are not the {part.num_rows} its "
            "tokenization index found (the data changed while the run went on); run the workflow again"
        )
    return rows


def whole_or_part_rows(
    input_data: str, split: str | None, shuffle_seed: int | None, data_revision: str | None, part: Part | None
) -> Rows:
    """The whole dataset's rows, or only the part's where the file can be read in part (JSON Lines)."""
    check_input_data(input_data, split)
    if is_json_file(input_data):
        if split is not None or shuffle_seed is not None:
            log.info("%s is a local JSON file: split and shuffle_seed are recorded but not applied", input_data)
        return read_json_rows(Path(input_data), part)
    base_split, window = parse_split(split)
    dataset = load_base_split(input_data, base_split, data_revision)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    if window is not None:
        dataset = dataset.select(range(*window.indices(len(dataset))))
    order = "after shuffling and slicing" if shuffle_seed is not None or window is not None else "in dataset order"
    return Rows(dataset, lambda index: f"{input_data}, row {index} (0-based, {order})")


def load_base_split(input_data: str, base_split: str | None, data_revision: str | None = None) -> Dataset:
    """A whole split of a Parquet file or folder (default "train") or of a hub dataset (at `data_revision`)."""
    path = Path(input_data)
    if path.is_file() and path.suffix.lower() == PARQUET_SUFFIX:
        return load_hf_dataset("parquet", base_split or "train", data_files=str(path))
    if path.is_dir():
        return load_hf_dataset(str(path), base_split or "train")
    check_hub_access("input_data", input_data, revision=data_revision, repo_type="dataset")
    return load_hf_dataset(input_data, base_split, revision=data_revision)


def load_hf_dataset(path: str, split: str, data_files: str | None = None, revision: str | None = None) -> Dataset:
    """`datasets.load_dataset` with its failures turned into a message naming the input."""
    from datasets import VerificationMode, load_dataset

    try:
        return load_dataset(
            path, split=split, data_files=data_files, revision=revision, verification_mode=VerificationMode.NO_CHECKS
        )
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise CacheConfigError(
            f"input_data {data_files or path!r}, split {split!r}: could not load the dataset ({error}). "
            "Check the dataset id or path and the split name."
        ) from error


def read_json_rows(path: Path, part: Part | None = None) -> Rows:
    """Rows of a JSON Lines file (only the part's, given one), a JSON list, or a single JSON object, in file
    order."""
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        return read_json_lines(path, part)
    raw = path.read_bytes()
    document = parse_json(utf8_text(raw, path), str(path))
    if not isinstance(document, list):
        return Rows([document], lambda index: str(path))
    return Rows(document, lambda index: f"{path}, item {index + 1}")


def read_json_lines(path: Path, part: Part | None = None) -> Rows:
    """Rows of a JSON Lines file (the part's bytes only, given one), one a non-blank line, each named by
    its 1-based line number."""
    items, line_numbers = [], []
    for number, _, raw in numbered_lines(path, part):
        text = utf8_text(raw, path, number).rstrip("\r\n")
        if text.strip():
            items.append(parse_json(text, f"{path}, line {number}"))
            line_numbers.append(number)
    return Rows(items, lambda index: f"{path}, line {line_numbers[index]}")


def numbered_lines(path: Path, part: Part | None = None) -> Iterator[tuple[int, int, bytes]]:
    """A JSON Lines file's lines (the part's only, given one): each line's 1-based number, the byte offset
    of its end, and its bytes, line 1 without the byte order mark that may open the file (json.loads
    refuses it)."""
    start, stop, first = (0, None, 1) if part is None else (part.byte_start, part.byte_stop, part.first_line)
    with path.open("rb") as handle:
        handle.seek(start)
        end = start
        for number, raw in enumerate(handle, start=first):
            if stop is not None and end >= stop:
                return
            end += len(raw)
            yield number, end, raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw


def is_blank_line(raw: bytes) -> bool:
    """Whether a JSON Lines line holds no row (as `read_json_lines` decides, without parsing it)."""
    return not raw.decode("utf-8", "replace").strip()


def utf8_text(raw: bytes, path: Path, line: int | None = None) -> str:
    """`raw` (line `line` of `path`, or the whole file) decoded as UTF-8, or an error naming the line of the
    first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line or raw.count(b"\n", 0, error.start) + 1
        raise CacheConfigError(
            f"{path}, line {line}: not valid UTF-8 (byte {raw[error.start]:#04x}); save the file as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8 <file> > <new file>"
        ) from error


def parse_json(text: str, where: str) -> Any:
    """`text` parsed, or an error naming `where` and the place in it (a line within a whole document)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = f"line {error.lineno}, column {error.colno}" if "\n" in text else f"column {error.colno}"
        raise CacheConfigError(f"{where}: invalid JSON ({error.msg} at {at}); fix or remove it") from error


def iter_conversations(rows: Rows) -> Iterator[Conversation]:
    """Each row as a normalised Conversation, in row order."""
    for index, row in enumerate(rows):
        yield conversation_from_row(row, index, rows.where(index))


def conversation_from_row(row: Mapping[str, Any], index: int, where: str) -> Conversation:
    """A row's OpenAI `messages` or ShareGPT `conversations`, normalised and checked; `where` names it in errors."""
    if not isinstance(row, Mapping):
        raise CacheConfigError(f"{where}: expected an object with `messages`, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = [
            normalize_message(message, f"{where}: messages[{i}]")
            for i, message in enumerate(turns(row, "messages", where))
        ]
    elif row.get("conversations") is not None:
        messages = [
            sharegpt_message(turn, f"{where}: conversations[{i}]")
            for i, turn in enumerate(turns(row, "conversations", where))
        ]
    else:
        raise CacheConfigError(
            f"{where}: no `messages` (OpenAI) or `conversations` (ShareGPT) list; its keys are {sorted(row)}"
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise CacheConfigError(
            f"{where} has no assistant turn, so no token of it would be supervised; "
            "remove it from the data or fix its roles"
        )
    return Conversation(index=index, messages=messages, where=where, tools=row_tools(row, where))


def turns(row: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(turn, Mapping) for turn in value):
        raise CacheConfigError(f"{where}: `{key}` must be a list of objects")
    return value


def normalize_message(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The message with its role checked and its content flattened to text; other keys are kept.

    `where` names the message (`chats.jsonl, line 3: messages[1]`)."""
    role = message.get("role")
    if role not in ACCEPTED_ROLES:
        raise CacheConfigError(f"{where}: unknown role {role!r}; accepted roles are {', '.join(ACCEPTED_ROLES)}")
    normalized = dict(message)
    normalized["content"] = content_text(message.get("content"), f"{where}.content")
    if role == "assistant" and "reasoning_content" in message:
        normalized["reasoning_content"] = reasoning_text(message["reasoning_content"], f"{where}.reasoning_content")
    return normalized


def sharegpt_message(turn: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A ShareGPT `{from, value}` turn as an OpenAI message."""
    source_role = turn.get("from", turn.get("role"))
    role = SHAREGPT_ROLES.get(source_role)
    if role is None:
        raise CacheConfigError(
            f"{where}: unknown ShareGPT role {source_role!r}; accepted roles are {', '.join(SHAREGPT_ROLES)}"
        )
    key = "value" if "value" in turn else "content"
    if key not in turn:
        raise CacheConfigError(f"{where}: a ShareGPT turn needs `value` (its text); its keys are {sorted(turn)}")
    return {"role": role, "content": content_text(turn[key], f"{where}.{key}")}


def content_text(content: Any, where: str) -> str:
    """Message content as text: a string, None (empty), or a list of parts whose text parts are kept, joined
    with spaces; anything else is refused rather than stringified into the training text."""
    if content is None or isinstance(content, str):
        return unicode_text(content or "", where)
    if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
        return unicode_text(" ".join(part["text"] for part in content if isinstance(part.get("text"), str)), where)
    raise CacheConfigError(
        f'{where} is {shown(content)}; give a string, or a list of parts like {{"type": "text", "text": "..."}}'
    )


def shown(value: Any) -> str:
    """`a dict ({'text': 'hello'})`: a value's type and the start of its repr, for a message."""
    name, text = type(value).__name__, repr(value)
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name} ({text if len(text) <= 60 else text[:57] + '...'})"


def reasoning_text(reasoning: Any, where: str) -> str:
    if reasoning is None:
        return ""
    if not isinstance(reasoning, str):
        raise CacheConfigError(f"{where} must be a string, got {shown(reasoning)}")
    return unicode_text(reasoning, where)


def unicode_text(text: str, where: str) -> str:
    """`text`, refused if no tokenizer can encode it: JSON's escapes allow an unpaired surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = repr(error.object[error.start : error.end])
        raise CacheConfigError(
            f"{where} holds text that is not valid Unicode (the unpaired surrogate {bad} at character "
            f"{error.start}, which JSON allows and no tokenizer encodes); fix or remove the sample"
        ) from error
    return text


def row_tools(row: Mapping[str, Any], where: str) -> list[dict[str, Any]] | None:
    """The row's tool schemas for the chat template (JSON Lines often store them as a JSON string)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = parse_json(tools, f"{where}: tools")
    if tools is not None and not isinstance(tools, list):
        raise CacheConfigError(f"{where}: `tools` must be a list, got {shown(tools)}")
    return tools or None
