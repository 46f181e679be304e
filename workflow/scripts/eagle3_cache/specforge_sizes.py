"""What the specforge format's files take, without torch: each `torch.save` zip file laid out record by record.

torch's zipfile writer puts the pickle, a few metadata records and one record per tensor storage into
an uncompressed zip. Each record is a local header (its name under the archive's name, and padding
that starts the data on a 64-byte boundary), the data, and a data descriptor; then come a central
directory entry per record and the zip64 and classic end records. Everything there is fixed but the
pickle's length, which grows with the widths of the integers it holds (each storage's element count,
each tensor's shape and strides). The constants below are torch 2.x's; `tests/test_disk_plan.py`
checks the sizes against files torch writes. Files past 4 GiB, which get zip64 fields in their
headers, are not covered.

It imports no torch, so that the plan job can size a specforge cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .layout import VOCAB_MAPPING_FILE

ALIGNMENT = 64
LOCAL_HEADER_BYTES = 30
PADDING_FIELD_BYTES = 4  # the extra field's id and length, before the alignment padding
DATA_DESCRIPTOR_BYTES = 16
CENTRAL_HEADER_BYTES = 46
END_RECORDS_BYTES = 22 + 56 + 20  # end of central directory, zip64 end record, zip64 locator
# The records before and after the tensor data, with their contents' sizes.
RECORDS_BEFORE_DATA = ((".format_version", 1), (".storage_alignment", 2), ("byteorder", 6))
RECORDS_AFTER_DATA = (("version", 2), (".data/serialization_id", 40))
# The pickle less its integers beyond the smallest encoding, for a sample dict and for the vocabulary mapping.
SAMPLE_PICKLE_BASE_BYTES = 414
MAPPING_PICKLE_BASE_BYTES = 242
# torch.save names the archive after the file it writes, less its last suffix: a buffer's is `archive`, and
# the mapping is written through `vocab_mapping.pt.tmp` (`atomic.torch_save_atomic`).
SAMPLE_ARCHIVE = "archive"
MAPPING_ARCHIVE = VOCAB_MAPPING_FILE

Sizes = np.ndarray | int


def bytes_per_token(hidden_size: int) -> dict[str, int]:
    """What each key of a sample file takes per token (int64 ids and mask, bf16 hidden states)."""
    return {"input_ids": 8, "loss_mask": 8, "hidden_state": 2 * hidden_size, "aux_hidden_state": 6 * hidden_size}


def sample_shapes(length: Sizes, hidden_size: int) -> dict[str, tuple[Sizes, ...]]:
    """Each key's shape in a sample file of `length` tokens."""
    return {
        "input_ids": (length,),
        "loss_mask": (length,),
        "hidden_state": (1, length, hidden_size),
        "aux_hidden_state": (1, length, 3 * hidden_size),
    }


def pickled_int_bytes(value: Sizes) -> Sizes:
    """A non-negative integer's bytes in a protocol-2 pickle: BININT1, BININT2 or BININT."""
    return np.where(np.asarray(value) < 1 << 8, 2, np.where(np.asarray(value) < 1 << 16, 3, 5))


def contiguous_strides(shape: Sequence[Sizes]) -> list[Sizes]:
    """The strides of a contiguous tensor of this shape."""
    return [math.prod(shape[i + 1 :]) for i in range(len(shape))]


def pickle_bytes(base: int, shapes: Sequence[Sequence[Sizes]]) -> Sizes:
    """The pickle of tensors of these shapes: each storage's element count, each shape and its strides."""
    smallest = pickled_int_bytes(0)
    ints = [value for shape in shapes for value in (math.prod(shape), *shape, *contiguous_strides(shape))]
    return base + sum(pickled_int_bytes(value) - smallest for value in ints)


def zip_bytes(archive: str, pickle: Sizes, data: Sequence[Sizes]) -> Sizes:
    """A torch.save zip file holding a pickle of this length and tensor storages of these byte counts."""
    records = [
        ("data.pkl", pickle),
        *RECORDS_BEFORE_DATA,
        *((f"data/{i}", size) for i, size in enumerate(data)),
        *RECORDS_AFTER_DATA,
    ]
    end = 0
    for name, size in records:
        start = end + LOCAL_HEADER_BYTES + len(f"{archive}/{name}") + PADDING_FIELD_BYTES
        end = start + -start % ALIGNMENT + size + DATA_DESCRIPTOR_BYTES
    central = sum(CENTRAL_HEADER_BYTES + len(f"{archive}/{name}") for name, _ in records)
    return end + central + END_RECORDS_BYTES


def sample_file_bytes(length: Sizes, hidden_size: int) -> Sizes:
    """The size of a sample file of `length` tokens (elementwise for an array of lengths)."""
    length = np.asarray(length, dtype=np.int64)
    pickle = pickle_bytes(SAMPLE_PICKLE_BASE_BYTES, list(sample_shapes(length, hidden_size).values()))
    data = [per_token * length for per_token in bytes_per_token(hidden_size).values()]
    return zip_bytes(SAMPLE_ARCHIVE, pickle, data)


def vocab_mapping_bytes(draft_vocab_size: int, target_vocab_size: int) -> int:
    """The size of `vocab_mapping.pt`: int64 `d2t[Vd]` and bool `t2d[V]`."""
    pickle = pickle_bytes(MAPPING_PICKLE_BASE_BYTES, [(draft_vocab_size,), (target_vocab_size,)])
    return int(zip_bytes(MAPPING_ARCHIVE, pickle, [8 * draft_vocab_size, target_vocab_size]))


def specforge_files_bytes(lengths: Sequence[int] | np.ndarray, hidden_size: int) -> int:
    """What the sample files of samples of these lengths take."""
    return int(np.sum(sample_file_bytes(np.asarray(lengths), hidden_size)))
