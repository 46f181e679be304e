"""Tokenization in parts: the index, the rows of one part, and the run's store joined from the parts."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import Dataset

from eagle3_cache.data import load_rows
from eagle3_cache.data_parts import conversation_index, read_parts
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.token_store import join_stores, read_token_block, read_tokenized_info
from helpers import chat, run_tokenize_jobs, tokenize_run_config, tokenize_to_store, write_jsonl

ROWS = [{"messages": chat(f"question {i}", f"answer {i} " * (i % 4 + 1))} for i in range(7)]


def ragged_jsonl(path: Path) -> Path:
    """ROWS as JSON Lines opened by a byte order mark, with blank and whitespace-only lines among them."""
    lines = [json.dumps(row) for row in ROWS]
    text = "\n".join([lines[0], "", lines[1], "  \t", *lines[2:5], "\r", *lines[5:]])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\n\n")
    return path


def index_parts(input_data: Path, part_size: int, split=None, shuffle_seed=None):
    index = conversation_index(str(input_data), split, shuffle_seed, None, part_size)
    path = input_data.with_suffix(".index.json")
    path.write_text(json.dumps(index))
    return index, read_parts(path)


@pytest.mark.parametrize("part_size", [1, 2, 3, 7, 100])
def test_json_lines_parts_hold_the_rows_named_by_their_lines(tmp_path, part_size):
    path = ragged_jsonl(tmp_path / "chats.jsonl")
    whole = load_rows(str(path), None, None)
    index, parts = index_parts(path, part_size)
    assert index["num_samples"] == len(ROWS) == len(whole)
    assert [part.num_rows for part in parts] == [min(part_size, 7 - start) for start in range(0, 7, part_size)]
    rows, names = [], []
    for part in parts:
        part_rows = load_rows(str(path), None, None, part=part)
        rows += list(part_rows)
        names += [part_rows.where(i) for i in range(len(part_rows))]
    assert rows == list(whole) == ROWS
    assert names == [whole.where(i) for i in range(len(whole))]
    assert names[:3] == [f"{path}, line 1", f"{path}, line 3", f"{path}, line 5"]


def test_parquet_parts_follow_the_shuffle_and_slice(tmp_path):
    path = tmp_path / "chats.parquet"
    Dataset.from_list([{**row, "id": i} for i, row in enumerate(ROWS)]).to_parquet(path)
    settings = dict(split="train[1:6]", shuffle_seed=3)
    whole = load_rows(str(path), settings["split"], settings["shuffle_seed"])
    _, parts = index_parts(path, 2, **settings)
    assert [part.num_rows for part in parts] == [2, 2, 1]
    rows = []
    for part in parts:
        part_rows = load_rows(str(path), settings["split"], settings["shuffle_seed"], part=part)
        rows += [(row["id"], part_rows.where(i)) for i, row in enumerate(part_rows)]
    assert rows == [(row["id"], whole.where(i)) for i, row in enumerate(whole)]


def test_a_part_whose_rows_changed_since_the_index_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", ROWS)
    _, parts = index_parts(path, 4)
    write_jsonl(path, ROWS[:5])
    with pytest.raises(CacheConfigError, match=r"not the 3 its tokenization index found .* run the workflow again"):
        load_rows(str(path), None, None, part=parts[1])


def test_an_empty_file_is_refused_by_the_index(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n")
    with pytest.raises(CacheConfigError, match="holds no rows"):
        conversation_index(str(path), None, None, None, 10)


def run_config(model_dir: Path, input_data: Path, part_size: int) -> dict:
    return tokenize_run_config(
        target_model=str(model_dir), input_data=str(input_data), tokenize_part_size=part_size, seq_length=24
    )


def test_a_store_tokenized_in_parts_reads_as_the_store_tokenized_whole(tmp_path, chat_model_dir, make_chat_tokenizer):
    data = ragged_jsonl(tmp_path / "chats.jsonl")
    whole = tokenize_to_store(tmp_path / "whole.h5", make_chat_tokenizer(), data, 24, vocab_size=384, shuffle_seed=None)
    joined = run_tokenize_jobs(tmp_path / "w", run_config(chat_model_dir, data, 3), "r")
    assert len(list((joined.parent / "tokenized").glob("part-*.h5"))) == 3
    ours, theirs = read_tokenized_info(joined), read_tokenized_info(whole)
    assert ours.header == theirs.header
    for name in ("lengths", "num_supervised", "truncated"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
    for name in ("input_ids", "attention_mask", "loss_mask"):
        assert np.array_equal(
            getattr(read_token_block(joined, 0, 7), name), getattr(read_token_block(whole, 0, 7), name)
        )
    with h5py.File(joined) as store, h5py.File(whole) as single:
        assert store["input_ids"].is_virtual
        assert np.array_equal(store["supervised_counts"][:], single["supervised_counts"][:])


def test_a_joined_store_refuses_to_read_zeros_for_a_missing_part(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "chats.jsonl", ROWS)
    joined = run_tokenize_jobs(tmp_path / "w", run_config(chat_model_dir, data, 4), "r")
    (joined.parent / "tokenized" / "part-000001.h5").unlink()
    with pytest.raises(CacheConfigError, match=r"its part tokenized/part-000001\.h5 is missing .* run the workflow"):
        read_tokenized_info(joined)


def test_parts_of_other_settings_are_not_joined(tmp_path, make_chat_tokenizer):
    data = write_jsonl(tmp_path / "chats.jsonl", ROWS)
    parts = [tokenize_to_store(tmp_path / f"p{n}.h5", make_chat_tokenizer(), data, n, vocab_size=384) for n in (24, 32)]
    with pytest.raises(CacheConfigError, match=r"p32\.h5: tokenized with other settings"):
        join_stores(tmp_path / "joined.h5", parts)
