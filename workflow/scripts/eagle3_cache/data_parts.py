"""The tokenization index: a dataset's rows in cache order, cut into parts of `tokenize_part_size`
conversations, each tokenized by a job of its own.

The index fixes the sample count and order before any part runs, so that every part knows its rows: for
a JSON Lines file, the bytes and first line number of each part, found by one scan of the file's lines
(no JSON is parsed); for a JSON document, Parquet or a hub dataset, the part's row range, which the part's
job selects after the same load, shuffle and slice. No torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .data import Part, is_blank_line, load_rows, numbered_lines
from .errors import CacheConfigError
from .layout import JSON_LINES_SUFFIXES


def conversation_index(
    input_data: str,
    split: str | None,
    shuffle_seed: int | None,
    data_revision: str | None,
    part_size: int,
) -> dict[str, Any]:
    """The index: the sample count, the part size, and each part."""
    if Path(input_data).suffix.lower() in JSON_LINES_SUFFIXES:
        parts = json_lines_parts(Path(input_data), part_size)
    else:
        parts = row_range_parts(len(load_rows(input_data, split, shuffle_seed, data_revision)), part_size)
    num_samples = sum(part.num_rows for part in parts)
    if num_samples == 0:
        raise CacheConfigError(f"input_data {input_data!r} holds no rows; check the file (or split)")
    return {
        "num_samples": num_samples,
        "part_size": part_size,
        "parts": [{k: v for k, v in dataclasses.asdict(part).items() if v is not None} for part in parts],
    }


def json_lines_parts(path: Path, part_size: int) -> list[Part]:
    """Parts of a JSON Lines file: each its rows' bytes (from its first row's line to its last's end)."""
    parts: list[dict[str, int]] = []
    rows = line_start = 0
    for number, line_end, raw in numbered_lines(path):
        if not is_blank_line(raw):
            if not parts or parts[-1]["num_rows"] == part_size:
                parts.append({"first_row": rows, "num_rows": 0, "byte_start": line_start, "first_line": number})
            parts[-1]["num_rows"] += 1
            parts[-1]["byte_stop"] = line_end
            rows += 1
        line_start = line_end
    return [Part(**part) for part in parts]


def row_range_parts(num_rows: int, part_size: int) -> list[Part]:
    """Parts of `num_rows` rows in order, `part_size` each but the last."""
    return [Part(start, min(part_size, num_rows - start)) for start in range(0, num_rows, part_size)]


def read_parts(path: str | os.PathLike) -> list[Part]:
    """The parts an index file lists."""
    return [Part(**part) for part in read_index(path)["parts"]]


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CacheConfigError(
            f"{path}: cannot read the tokenization index ({error}); delete it and run again"
        ) from error
