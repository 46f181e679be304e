"""Local inputs tracked by content: a file rewritten in place changes its digest, and an unchanged file
is never read again (its size, mtime and inode are enough)."""

import os
from pathlib import Path

import pytest

from eagle3_cache import input_digest
from eagle3_cache.input_digest import FileHashes, data_sha256, model_files_sha256, weights_sha256


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files whose bytes are read to hash them."""
    read = []
    original = input_digest.file_sha256

    def counting(path):
        read.append(Path(path))
        return original(path)

    monkeypatch.setattr(input_digest, "file_sha256", counting)
    return read


def model_folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 64)
    (root / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 64)
    (root / "model.safetensors.index.json").write_text("{}")
    return root


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Same file, same inode, same size: what a tool that writes into an open file does."""
    inode = path.stat().st_ino
    with open(path, "r+b") as handle:
        handle.write(data)
    assert path.stat().st_ino == inode


def test_weights_rewritten_in_place_change_the_weights_digest_only(tmp_path):
    model = model_folder(tmp_path / "model")
    hashes = FileHashes(tmp_path / "hashes.json")
    before = weights_sha256(str(model), hashes), model_files_sha256(str(model), hashes)
    rewrite_in_place(model / "model-00002-of-00002.safetensors", b"\x03" * 64)
    after = weights_sha256(str(model), hashes), model_files_sha256(str(model), hashes)
    assert after[0] != before[0]
    assert after[1] == before[1]


def test_tokenizer_files_change_the_model_files_digest_only(tmp_path):
    model = model_folder(tmp_path / "model")
    hashes = FileHashes(tmp_path / "hashes.json")
    before = weights_sha256(str(model), hashes), model_files_sha256(str(model), hashes)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    after = weights_sha256(str(model), hashes), model_files_sha256(str(model), hashes)
    assert after[0] == before[0]
    assert after[1] != before[1]


def test_an_unchanged_file_is_not_read_again_even_by_another_process(tmp_path, reads):
    model = model_folder(tmp_path / "model")
    first = weights_sha256(str(model), FileHashes(tmp_path / "hashes.json"))
    assert len(reads) == 3
    reads.clear()
    # A new store object reads what the first one saved, as the next Snakemake process does.
    assert weights_sha256(str(model), FileHashes(tmp_path / "hashes.json")) == first
    assert reads == []
    rewrite_in_place(model / "model-00001-of-00002.safetensors", b"\x04")
    weights_sha256(str(model), FileHashes(tmp_path / "hashes.json"))
    assert reads == [model / "model-00001-of-00002.safetensors"]


def test_a_data_folder_notices_a_rewritten_added_or_removed_file_and_ignores_hidden_ones(tmp_path):
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    (data / "part" / "a.parquet").write_bytes(b"a" * 10)
    (data / "b.parquet").write_bytes(b"b" * 10)
    hashes = FileHashes(tmp_path / "hashes.json")
    digests = [data_sha256(str(data), hashes)]
    (data / ".cache").mkdir()
    (data / ".cache" / "lock").write_text("x")
    assert data_sha256(str(data), hashes) == digests[0]
    rewrite_in_place(data / "part" / "a.parquet", b"A")
    digests.append(data_sha256(str(data), hashes))
    (data / "c.parquet").write_bytes(b"c")
    digests.append(data_sha256(str(data), hashes))
    (data / "b.parquet").unlink()
    digests.append(data_sha256(str(data), hashes))
    assert len(set(digests)) == 4


def test_a_damaged_store_is_read_as_empty_and_rewritten(tmp_path):
    store = tmp_path / "hashes.json"
    store.write_text("{not json")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    hashes = FileHashes(store)
    digest = data_sha256(str(data), hashes)
    assert FileHashes(store).known and digest == data_sha256(str(data), FileHashes(store))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
