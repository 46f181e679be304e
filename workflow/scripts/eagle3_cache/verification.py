"""Verification of one committed shard, in one read: size, header, keys, shapes, dtypes, digest and the numeric scan.

The `verify_shard` rule runs it, one CPU job per shard, on the file as it is on disk (a specforge
shard directory: `specforge_verification`). The file is
read once, front to back, its holes (padding) skipped: every byte read goes through the digest
(`sparse_digest`), and each field's rows go through
`scan.ShardScan` as they pass, a bounded block at a time. A shard that fails is taken out of the
cache (the manifest retired first), so the next run rebuilds it; one that passes gets a record in
`verified/`, which is all the report reads of it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache_dir import shard_layout_problems
from .layout import MANIFEST_FILE, samples_in_shard, shard_index
from .manifest import read_shard_record, retire_commit
from .scan import ShardScan
from .scan_summary import ScanSummary
from .shard_layout import TOKEN_FIELDS, FieldSpec, ShardLayout, safetensors_header
from .shard_stat import files_sha256, stat_sha256
from .sparse_digest import SparseReader
from .token_store import TokenBlock, read_token_block, read_tokenized_info
from .vocab_selection import read_vocab_selection

log = logging.getLogger(__name__)

# How much of one field the verification holds in memory at once.
READ_BUDGET_BYTES = 64 << 20
# How a field's bytes are read, by safetensors dtype: bool bytes as uint8 (a damaged byte may be neither 0
# nor 1), bf16 as its bits (numpy has no bf16; `float32_of_bf16` widens them exactly).
NUMPY_DTYPES = {
    "I64": np.int64,
    "I32": np.int32,
    "BOOL": np.uint8,
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
}


@dataclass(frozen=True)
class ShardVerification:
    """What verifying one shard found; its JSON is the shard's record in `verified/`.

    `problems` are the file's (size, header, digest); the numeric scan's are in `scan`.
    """

    shard: int
    file: str
    bytes: int
    digest: str  # sparse_digest's
    problems: list[str]
    scan: dict[str, Any]
    seconds: float
    # The files as the read found them (`shard_stat`), which the commit point compares: their stat as
    # the read began, and their bytes (None when a problem left them unread).
    stat_sha256: str | None
    content_sha256: str | None

    @property
    def failures(self) -> list[str]:
        """Everything that takes the shard out of the cache."""
        return self.problems + ScanSummary.from_json(self.scan).problems()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def field_blocks(
    reader: SparseReader, offset: int, spec: FieldSpec, lengths: np.ndarray | None, scan: ShardScan
) -> Iterator[tuple[int, np.ndarray]]:
    """`(first row, [rows, width, ...] values)` of one field, which starts at byte `offset`, read in row order
    and digested on the way.

    A computed field (`lengths` given: the writer wrote each row's first `lengths[i]` positions) is read up
    to its block's longest row; the rest of each row, padding, is not read where it is a hole and only
    checked for zeros where it holds data. Token fields (`lengths` None) are read whole.
    """
    rows = max(1, READ_BUDGET_BYTES // spec.sample_bytes)
    num_samples, seq_length = scan.content.shape
    for start in range(0, num_samples, rows):
        count = min(rows, num_samples - start)
        width = seq_length if lengths is None else max(1, int(lengths[start : start + count].max()))
        row_bytes = width * spec.position_bytes
        buffer = bytearray(count * row_bytes)
        for i in range(count):
            row_start = offset + (start + i) * spec.sample_bytes
            try:
                reader.read_into(memoryview(buffer)[i * row_bytes : (i + 1) * row_bytes], row_start)
            except EOFError as error:
                raise EOFError(f"{spec.name}: row {start + i}: {error}") from error
            if width < seq_length:
                record_nonzero_padding(reader, row_start, row_start + row_bytes, spec, scan, start + i)
        values = np.frombuffer(buffer, dtype=NUMPY_DTYPES[spec.dtype]).reshape(count, width, *spec.sample_shape[1:])
        yield start, float32_of_bf16(values) if spec.dtype == "BF16" else values


def float32_of_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 values (their 16 bits) as float32, exactly: bf16 is float32's upper half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def record_nonzero_padding(
    reader: SparseReader, row_start: int, padding_start: int, spec: FieldSpec, scan: ShardScan, row: int
) -> None:
    """Count the positions of a row's padding (from `padding_start`) that hold a nonzero byte: only its data is
    read, holes being zeros."""
    positions: set[int] = set()
    for part_start, part in reader.data_parts(padding_start, row_start + spec.sample_bytes):
        nonzero = np.flatnonzero(np.frombuffer(part, dtype=np.uint8))
        positions.update(((part_start - row_start + nonzero) // spec.position_bytes).tolist())
    if positions:
        scan.summary.record("padding", spec.name, len(positions), scan.first_sample + row)


def read_and_scan(path: Path, layout: ShardLayout, num_samples: int, scan: ShardScan) -> tuple[str, list[str]]:
    """The file's digest (sparse_digest) and its header's problems, reading its data once; each field's rows are
    scanned as they pass.

    Our writer lays the fields out in layout order, so a header equal to the layout's, byte for
    byte, fixes every field's offset. A header that differs is described instead, and the data
    left unread. Padding the writer left as holes is not read: it is zeros.
    """
    header, _ = safetensors_header(layout, num_samples)
    lengths = scan.content.sum(axis=1)
    with open(path, "rb", buffering=0) as handle:
        reader = SparseReader(handle.fileno())
        stored_header = bytearray(len(header))
        reader.read_into(stored_header, 0)
        if stored_header != header:
            problems = [problem.problem for problem in shard_layout_problems(path, layout, num_samples)]
            return "", problems or ["header bytes differ from its layout's (data offsets or metadata)"]
        offset = len(header)
        for spec in layout.fields():
            field_lengths = None if spec.name in TOKEN_FIELDS else lengths
            for start, values in field_blocks(reader, offset, spec, field_lengths, scan):
                scan.add(spec.name, np.arange(start, start + values.shape[0]), values)
            offset += num_samples * spec.sample_bytes
    return reader.hexdigest(), []


def verify_shard(
    path: Path, layout: ShardLayout, *, first_sample: int, tokens: TokenBlock, recorded_digest: str
) -> ShardVerification:
    """Everything wrong with a committed shard: against its layout, its tokenized rows, the digest recorded at write."""
    started, stat = time.perf_counter(), stat_sha256(path)
    num_samples = tokens.input_ids.shape[0]
    scan = ShardScan(first_sample, tokens, layout.draft_vocab_size, layout.dtype)
    size, expected_size = path.stat().st_size, layout.shard_bytes(num_samples)
    digest, problems = "", []
    if size != expected_size:
        problems.append(f"{size} bytes, its layout takes {expected_size} (truncated or overwritten?)")
    else:
        digest, problems = read_and_scan(path, layout, num_samples, scan)
    if not problems and digest != recorded_digest:
        problems.append("digest differs from the one recorded when it was written (changed on disk)")
    seconds = time.perf_counter() - started
    content = files_sha256([(path.name, digest)]) if digest else None
    return ShardVerification(
        shard_index(path), path.name, size, digest, problems, scan.summary.to_json(), seconds, stat, content
    )


def verify_committed_shard(
    shard_path: Path, *, stats_path: Path, selection_path: Path, tokenized_path: Path, settings: Mapping[str, Any]
) -> ShardVerification:
    """What the `verify_shard` job checks: the shard against the settings, its stats and its tokenized rows."""
    stats = read_shard_record(stats_path)
    selected, _ = read_vocab_selection(selection_path)
    layout = ShardLayout(
        seq_length=settings["seq_length"],
        aux_hidden_dim=stats["aux_hidden_dim"],
        draft_vocab_size=len(selected),
        dtype=settings["dtype"],
        target_probs_topk=settings["target_probs_topk"],
    )
    index, shard_size = shard_index(shard_path), settings["shard_size"]
    first = index * shard_size
    count = samples_in_shard(index, read_tokenized_info(tokenized_path).num_samples, shard_size)
    tokens = read_token_block(tokenized_path, first, first + count, numpy=True)
    return verify_shard(shard_path, layout, first_sample=first, tokens=tokens, recorded_digest=stats["digest"])


def take_out_of_cache(shard_path: Path, problems: Sequence[str]) -> str:
    """Retire the manifest, delete a shard (a file, or a specforge directory) that failed verification, and say so."""
    retire_commit(shard_path.parent, f"{shard_path.name} failed verification")
    if shard_path.is_dir():
        shutil.rmtree(shard_path)
    else:
        shard_path.unlink(missing_ok=True)
    message = (
        f"{shard_path}: failed verification: {'; '.join(problems)}. It was deleted and {MANIFEST_FILE} retired, "
        "so trainers refuse the cache until it is whole; run the workflow again to rebuild the shard."
    )
    log.error(message)
    return message
