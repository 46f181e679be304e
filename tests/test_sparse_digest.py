"""A shard file's digest: the same however its zeros are stored, changed by any byte, and never reading a hole."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

from eagle3_cache import sparse_digest
from eagle3_cache.sparse_digest import BLOCK, SparseReader, bytes_digest, data_extents, file_digest

SIZE = 9 * BLOCK + 4321


@pytest.fixture
def sparse_file(tmp_path):
    """A file of SIZE bytes, mostly holes, with random runs of data (some crossing block boundaries)."""
    path = tmp_path / "sparse.bin"
    rng = random.Random(0)
    with open(path, "wb") as handle:
        handle.truncate(SIZE)
        for offset in (0, BLOCK - 10, 3 * BLOCK + 5, 7 * BLOCK, SIZE - 100):
            handle.seek(offset)
            handle.write(rng.randbytes(min(3000, SIZE - offset)))
    return path


def test_the_digest_is_the_same_for_holes_and_written_zeros(sparse_file, tmp_path):
    dense = tmp_path / "dense.bin"
    with open(sparse_file, "rb") as source, open(dense, "wb") as target:
        shutil.copyfileobj(source, target)
    with open(sparse_file, "rb") as handle:
        extents = list(data_extents(handle.fileno(), SIZE))
    assert sum(stop - start for start, stop in extents) < SIZE / 2, "the filesystem keeps the holes"
    assert file_digest(sparse_file) == file_digest(dense) == bytes_digest(dense.read_bytes())


@pytest.mark.parametrize("offset", [0, 17, BLOCK - 1, BLOCK, 5 * BLOCK + 99, SIZE - 1])
def test_any_changed_byte_changes_the_digest(sparse_file, offset):
    before = file_digest(sparse_file)
    with open(sparse_file, "r+b") as handle:
        old = os.pread(handle.fileno(), 1, offset)
        os.pwrite(handle.fileno(), bytes([old[0] ^ 0x10]), offset)
    assert file_digest(sparse_file) != before


def test_a_nonzero_block_moved_elsewhere_changes_the_digest():
    assert bytes_digest(bytes(BLOCK) + b"x") != bytes_digest(b"x" + bytes(BLOCK))
    assert bytes_digest(b"x") != bytes_digest(b"x\0")


def test_only_the_data_is_read(sparse_file):
    with open(sparse_file, "rb", buffering=0) as handle:
        reader = SparseReader(handle.fileno())
        buffer = bytearray(SIZE)
        reader.read_into(buffer, 0)
        data = sum(stop - start for start, stop in reader.extents)
        assert reader.digest.bytes_fed == data < SIZE
        assert reader.hexdigest() == file_digest(sparse_file)
    assert bytes(buffer) == sparse_file.read_bytes()


def test_without_seek_data_the_whole_file_is_read_to_the_same_digest(sparse_file, monkeypatch):
    expected = file_digest(sparse_file)
    real_lseek = os.lseek

    def no_seek_data(fd, position, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "not supported")
        return real_lseek(fd, position, how)

    monkeypatch.setattr(sparse_digest.os, "lseek", no_seek_data)
    assert file_digest(sparse_file) == expected
