"""The tokenized store `results/{run}/tokenized.h5`: written once, read in row blocks.

Layout (N samples, S = seq_length):
  input_ids       int32 [N, S]  right padded with the pad id (eos when the tokenizer has none)
  loss_mask       uint8 [N, S]  1 on supervised (assistant) tokens, unshifted
  lengths         int32 [N]     attention_mask sum; the attention mask is 1 on exactly the first
                                `length` positions, so it is rebuilt rather than stored
  num_supervised  int32 [N]     loss_mask sum
  truncated       bool  [N]     whether the render was longer than S
  attrs           the TokenizedHeader fields; special_token_ids and source as JSON text

Only the row blocks are torch tensors, and only their readers import torch, so that reading the
header and statistics (as the disk plan does) stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .atomic import atomic_output
from .errors import CacheConfigError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
# Rows per HDF5 chunk: small enough that reading a few scattered rows stays cheap.
CHUNK_ROWS = 16
WRITE_ROWS = 256
JSON_ATTRS = ("special_token_ids", "source")


@dataclass(frozen=True)
class TokenizedSample:
    """One row as written: `length` leading positions are content (attention_mask 1)."""

    input_ids: np.ndarray  # [seq_length] int64
    loss_mask: np.ndarray  # [seq_length] uint8
    length: int
    truncated: bool

    @property
    def num_supervised(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(frozen=True)
class TokenBlock:
    """Rows of the store as the target forward takes them: torch.int64 [n, S], unshifted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


def token_rows(block: TokenBlock, rows: list[int]) -> TokenBlock:
    """The selected rows of a token block."""
    return TokenBlock(block.input_ids[rows], block.attention_mask[rows], block.loss_mask[rows])


@dataclass(frozen=True)
class TokenizedHeader:
    """What the store was built from; kept in its attrs."""

    seq_length: int
    target_vocab_size: int
    special_token_ids: tuple[int | None, ...]  # bos, eos, pad, unk
    pad_token_id: int  # the id padding uses
    tokenizer_hash: str
    chat_template_hash: str
    source: dict[str, Any]  # input_data, split, shuffle_seed
    mask_reasoning_content: bool
    mask_generation_prompt: bool


def synthetic_header(seq_length: int, target_vocab_size: int, **overrides: Any) -> TokenizedHeader:
    """A header for rows made without a tokenizer (benchmarks, tests): specials (1, 2, 2, None), pad 2,
    placeholder hashes and a `random` source."""
    fields: dict[str, Any] = dict(
        seq_length=seq_length,
        target_vocab_size=target_vocab_size,
        special_token_ids=(1, 2, 2, None),
        pad_token_id=2,
        tokenizer_hash="synthetic",
        chat_template_hash="synthetic",
        source={"input_data": "random", "split": None, "shuffle_seed": 42},
        mask_reasoning_content=False,
        mask_generation_prompt=False,
    )
    return TokenizedHeader(**{**fields, **overrides})


@dataclass(frozen=True)
class TokenizedInfo(TokenizedHeader):
    """The header plus the per-sample statistics."""

    num_samples: int
    lengths: np.ndarray
    num_supervised: np.ndarray
    truncated: np.ndarray


def write_tokenized(
    path: str | os.PathLike, header: TokenizedHeader, samples: Iterable[TokenizedSample], num_samples: int
) -> None:
    """Stream exactly `num_samples` samples into a new store at `path` (atomically)."""
    if num_samples < 1:
        raise CacheConfigError(f"{path}: no samples to tokenize; check input_data and split")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as store:
        write_header(store, header)
        writer = _RowWriter(store, num_samples, header.seq_length)
        for sample in samples:
            writer.add(sample)
        writer.finish()


def write_header(store: h5py.File, header: TokenizedHeader) -> None:
    store.attrs["format_version"] = FORMAT_VERSION
    for field in fields(TokenizedHeader):
        value = getattr(header, field.name)
        store.attrs[field.name] = json.dumps(value) if field.name in JSON_ATTRS else value


class _RowWriter:
    """Creates the datasets and fills them WRITE_ROWS rows at a time, so RAM stays bounded."""

    def __init__(self, store: h5py.File, num_samples: int, seq_length: int) -> None:
        chunks = (min(CHUNK_ROWS, num_samples), seq_length)
        self.num_samples = num_samples
        self.input_ids = store.create_dataset(
            "input_ids", (num_samples, seq_length), np.int32, chunks=chunks, compression="gzip"
        )
        self.loss_mask = store.create_dataset(
            "loss_mask", (num_samples, seq_length), np.uint8, chunks=chunks, compression="gzip"
        )
        self.lengths = store.create_dataset("lengths", (num_samples,), np.int32)
        self.num_supervised = store.create_dataset("num_supervised", (num_samples,), np.int32)
        self.truncated = store.create_dataset("truncated", (num_samples,), bool)
        self.pending: list[TokenizedSample] = []
        self.written = 0

    def add(self, sample: TokenizedSample) -> None:
        if self.written + len(self.pending) >= self.num_samples:
            raise ValueError(f"more samples than the {self.num_samples} announced")
        self.pending.append(sample)
        if len(self.pending) == WRITE_ROWS:
            self.flush()

    def flush(self) -> None:
        rows = slice(self.written, self.written + len(self.pending))
        self.input_ids[rows] = np.stack([s.input_ids for s in self.pending])
        self.loss_mask[rows] = np.stack([s.loss_mask for s in self.pending])
        self.lengths[rows] = [s.length for s in self.pending]
        self.num_supervised[rows] = [s.num_supervised for s in self.pending]
        self.truncated[rows] = [s.truncated for s in self.pending]
        self.written = rows.stop
        self.pending = []

    def finish(self) -> None:
        if self.pending:
            self.flush()
        if self.written != self.num_samples:
            raise ValueError(f"got {self.written} samples, {self.num_samples} were announced")


def read_tokenized_info(path: str | os.PathLike) -> TokenizedInfo:
    """The header and per-sample statistics (not the token rows)."""
    with open_store(path) as store:
        attrs = {field.name: decode_attr(field.name, store.attrs[field.name]) for field in fields(TokenizedHeader)}
        return TokenizedInfo(
            **attrs,
            num_samples=store["input_ids"].shape[0],
            lengths=store["lengths"][:].astype(np.int64),
            num_supervised=store["num_supervised"][:].astype(np.int64),
            truncated=store["truncated"][:],
        )


def decode_attr(name: str, value: Any) -> Any:
    if name in JSON_ATTRS:
        decoded = json.loads(value)
        return tuple(decoded) if name == "special_token_ids" else decoded
    return value.item() if isinstance(value, np.generic) else value


def read_token_block(path: str | os.PathLike, start: int, stop: int) -> TokenBlock:
    """Rows [start, stop)."""
    with open_store(path) as store:
        num_samples = store["input_ids"].shape[0]
        if not 0 <= start <= stop <= num_samples:
            raise IndexError(f"{path}: rows [{start}, {stop}) outside [0, {num_samples})")
        return block_from_store(store, slice(start, stop))


def read_token_rows(path: str | os.PathLike, indices: Sequence[int]) -> TokenBlock:
    """The rows at `indices`, in that order (repeats allowed)."""
    import torch

    wanted = np.asarray(indices, dtype=np.int64)
    # HDF5 reads a selection only in increasing order, without repeats.
    distinct, positions = np.unique(wanted, return_inverse=True)
    with open_store(path) as store:
        num_samples = store["input_ids"].shape[0]
        if distinct.size and (distinct[0] < 0 or distinct[-1] >= num_samples):
            raise IndexError(f"{path}: rows {indices} outside [0, {num_samples})")
        block = block_from_store(store, distinct)
    order = torch.from_numpy(positions)
    return TokenBlock(block.input_ids[order], block.attention_mask[order], block.loss_mask[order])


def iter_token_blocks(path: str | os.PathLike, block_rows: int) -> Iterator[TokenBlock]:
    """All rows, `block_rows` at a time, with the file held open."""
    with open_store(path) as store:
        num_samples = store["input_ids"].shape[0]
        for start in range(0, num_samples, block_rows):
            yield block_from_store(store, slice(start, min(start + block_rows, num_samples)))


def block_from_store(store: h5py.File, rows: slice | np.ndarray) -> TokenBlock:
    import torch

    input_ids = torch.from_numpy(store["input_ids"][rows].astype(np.int64))
    lengths = torch.from_numpy(store["lengths"][rows].astype(np.int64))
    positions = torch.arange(input_ids.shape[1])
    return TokenBlock(
        input_ids=input_ids,
        attention_mask=(positions < lengths[:, None]).long(),
        loss_mask=torch.from_numpy(store["loss_mask"][rows].astype(np.int64)),
    )


def open_store(path: str | os.PathLike) -> h5py.File:
    """The store opened for reading, after checking it is one this code can read."""
    try:
        store = h5py.File(path, "r")
    except OSError as error:
        raise CacheConfigError(f"{path}: cannot open the tokenized store ({error}); rerun the tokenize rule") from error
    if store.attrs.get("format_version") != FORMAT_VERSION:
        store.close()
        raise CacheConfigError(
            f"{path}: not a tokenized store of format {FORMAT_VERSION}; delete it and rerun the tokenize rule"
        )
    return store
