"""The tokenized store `results/{run}/tokenized.h5`: written once, read in row blocks.

Layout (N samples, S = seq_length):
  input_ids       int32 [N, S]  right padded with the pad id (eos when the tokenizer has none)
  loss_mask       uint8 [N, S]  1 on supervised (assistant) tokens, unshifted
  lengths         int32 [N]     attention_mask sum; the attention mask is 1 on exactly the first
                                `length` positions, so it is rebuilt rather than stored
  num_supervised  int32 [N]     loss_mask sum
  truncated       bool  [N]     whether the render was longer than S
  supervised_counts int64 [V]   how often each id in [0, V) sits at a loss-masked position (V = target_vocab_size)
  attrs           the TokenizedHeader fields; special_token_ids and source as JSON text; `unsupervised`, the
                  first NAMED_UNSUPERVISED samples without a supervised token, named with why (JSON)

Tokenization writes one store per part of the data (data_parts.py); the run's store joins them: its
input_ids and loss_mask are HDF5 virtual datasets over the parts' (named relative to it), its small
arrays are copied and its counts summed. Readers see one store either way.

Only the row blocks are torch tensors, and only their readers import torch, so that reading the
header and statistics (as the disk plan does) stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .atomic import atomic_output
from .errors import CacheConfigError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
# Rows per HDF5 chunk: small enough that reading a few scattered rows stays cheap.
CHUNK_ROWS = 16
WRITE_ROWS = 256
JSON_ATTRS = ("special_token_ids", "source")
# The row arrays a joined store reads from its parts; the per-sample statistics are copied.
ROW_ARRAYS = {"input_ids": np.int32, "loss_mask": np.uint8}
SAMPLE_ARRAYS = ("lengths", "num_supervised", "truncated")
# Samples without supervision named in a store; the rest are counted.
NAMED_UNSUPERVISED = 10


@dataclass(frozen=True)
class TokenizedSample:
    """One row as written: `length` leading positions are content (attention_mask 1)."""

    input_ids: np.ndarray  # [seq_length] int64
    loss_mask: np.ndarray  # [seq_length] uint8
    length: int
    truncated: bool
    where: str = ""  # how messages name the sample

    @property
    def num_supervised(self) -> int:
        return int(self.loss_mask.sum())

    def unsupervised_note(self) -> str:
        """`chats.jsonl, line 3 (why nothing of it is supervised)`."""
        why = "cut at seq_length before its first assistant token" if self.truncated else "nothing supervised"
        return f"{self.where} ({why})"


@dataclass(frozen=True)
class TokenBlock:
    """Rows of the store as the target forward takes them: torch.int64 [n, S], unshifted (numpy int64 arrays
    for the jobs that import no torch)."""

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
    unsupervised: tuple[str, ...]  # the first NAMED_UNSUPERVISED samples without supervision, named

    @property
    def header(self) -> TokenizedHeader:
        return TokenizedHeader(**{field.name: getattr(self, field.name) for field in fields(TokenizedHeader)})


def write_tokenized(
    path: str | os.PathLike, header: TokenizedHeader, samples: Iterable[TokenizedSample], num_samples: int
) -> None:
    """Stream exactly `num_samples` samples into a new store at `path` (atomically)."""
    if num_samples < 1:
        raise CacheConfigError(f"{path}: no samples to tokenize; check input_data and split")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as store:
        write_header(store, header)
        writer = _RowWriter(store, num_samples, header.seq_length, header.target_vocab_size)
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

    def __init__(self, store: h5py.File, num_samples: int, seq_length: int, vocab_size: int) -> None:
        chunks = (min(CHUNK_ROWS, num_samples), seq_length)
        self.store = store
        self.num_samples = num_samples
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.unsupervised: list[str] = []
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
        input_ids = np.stack([s.input_ids for s in self.pending])
        loss_mask = np.stack([s.loss_mask for s in self.pending])
        self.input_ids[rows] = input_ids
        self.loss_mask[rows] = loss_mask
        self.counts += supervised_counts(input_ids, loss_mask, len(self.counts))
        unsupervised = [s.unsupervised_note() for s in self.pending if s.num_supervised == 0]
        self.unsupervised += unsupervised[: NAMED_UNSUPERVISED - len(self.unsupervised)]
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
        self.store.create_dataset("supervised_counts", data=self.counts)
        self.store.attrs["unsupervised"] = json.dumps(self.unsupervised)


def supervised_counts(input_ids: np.ndarray, loss_mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each id sits at a loss-masked position; ids outside [0, vocab_size)
    are not counted, as in Automodel."""
    supervised = input_ids[loss_mask.astype(bool)]
    supervised = supervised[(supervised >= 0) & (supervised < vocab_size)]
    return np.bincount(supervised, minlength=vocab_size).astype(np.int64)


def join_stores(path: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> TokenizedInfo:
    """The store at `path` (atomically) that reads the `parts`' rows in order, without copying them; its info."""
    infos = [read_tokenized_info(part) for part in parts]
    for part, info in zip(parts, infos, strict=True):
        if info.header != infos[0].header:
            raise CacheConfigError(
                f"{part}: tokenized with other settings or another tokenizer than {parts[0]}; delete the "
                "parts and run the workflow again"
            )
    num_samples = sum(info.num_samples for info in infos)
    seq_length = infos[0].seq_length
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as store:
        write_header(store, infos[0].header)
        for name, dtype in ROW_ARRAYS.items():
            layout = h5py.VirtualLayout((num_samples, seq_length), dtype)
            start = 0
            for part, info in zip(parts, infos, strict=True):
                source = os.path.relpath(part, Path(path).parent)
                layout[start : start + info.num_samples] = h5py.VirtualSource(
                    source, name, shape=(info.num_samples, seq_length)
                )
                start += info.num_samples
            store.create_virtual_dataset(name, layout)
        for name in SAMPLE_ARRAYS:
            store.create_dataset(name, data=np.concatenate([getattr(info, name) for info in infos]))
        store.create_dataset("supervised_counts", data=sum(read_supervised_counts(part) for part in parts))
        named = [note for info in infos for note in info.unsupervised][:NAMED_UNSUPERVISED]
        store.attrs["unsupervised"] = json.dumps(named)
    return read_tokenized_info(path)


def read_supervised_counts(path: str | os.PathLike) -> np.ndarray:
    """The store's supervised_counts (see the module docstring)."""
    with open_store(path) as store:
        return store["supervised_counts"][:]


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
            unsupervised=tuple(json.loads(store.attrs["unsupervised"])),
        )


def decode_attr(name: str, value: Any) -> Any:
    if name in JSON_ATTRS:
        decoded = json.loads(value)
        return tuple(decoded) if name == "special_token_ids" else decoded
    return value.item() if isinstance(value, np.generic) else value


def read_token_block(path: str | os.PathLike, start: int, stop: int, numpy: bool = False) -> TokenBlock:
    """Rows [start, stop); as numpy arrays with `numpy` (for jobs that import no torch)."""
    with open_store(path) as store:
        num_samples = store["input_ids"].shape[0]
        if not 0 <= start <= stop <= num_samples:
            raise IndexError(f"{path}: rows [{start}, {stop}) outside [0, {num_samples})")
        return arrays_from_store(store, slice(start, stop)) if numpy else block_from_store(store, slice(start, stop))


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


def arrays_from_store(store: h5py.File, rows: slice | np.ndarray) -> TokenBlock:
    """The rows as int64 numpy arrays, the attention mask rebuilt from the lengths."""
    input_ids = store["input_ids"][rows].astype(np.int64)
    lengths = store["lengths"][rows].astype(np.int64)
    return TokenBlock(
        input_ids=input_ids,
        attention_mask=(np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64),
        loss_mask=store["loss_mask"][rows].astype(np.int64),
    )


def block_from_store(store: h5py.File, rows: slice | np.ndarray) -> TokenBlock:
    """The rows as int64 torch tensors."""
    import torch

    arrays = arrays_from_store(store, rows)
    return TokenBlock(
        *(torch.from_numpy(getattr(arrays, name)) for name in ("input_ids", "attention_mask", "loss_mask"))
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
    if missing := missing_parts(store, Path(path).parent):
        store.close()
        raise CacheConfigError(
            f"{path}: its part {missing[0]} is missing (HDF5 would read zeros for it); run the workflow again, "
            "which tokenizes that part again"
        )
    return store


def missing_parts(store: h5py.File, folder: Path) -> list[str]:
    """The part files a joined store reads its rows from (relative to `folder`, its own) that do not exist."""
    dataset = store["input_ids"]
    sources = dataset.virtual_sources() if dataset.is_virtual else []
    return [source.file_name for source in sources if not (folder / source.file_name).is_file()]
