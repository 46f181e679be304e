"""What bad data gets: a message naming the file, the line (or item, or row) and the key, and what to do;
a sample left without supervision is kept and named."""

from __future__ import annotations

import json
import re

import pytest

from eagle3_cache.data import conversation_from_row, load_rows, read_json_rows
from eagle3_cache.errors import CacheConfigError
from helpers import chat, numbered_rows, tokenize_to_store, write_jsonl


def test_a_path_without_its_suffix_is_a_missing_file_with_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chats.jsonl", numbered_rows(1))
    with pytest.raises(CacheConfigError, match=r"'data/chats': no such file.*did you mean data/chats.jsonl\?"):
        load_rows("data/chats", None, None)


def test_jsonl_rows_are_named_by_their_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in numbered_rows(2)).replace("\n", "\n\n") + "\n")
    rows = load_rows(str(path), None, None)
    assert [rows.where(i) for i in range(2)] == [f"{path}, line 1", f"{path}, line 3"]
    assert read_json_rows(tmp_path / "chats.jsonl")[1]["id"] == 1


def test_json_list_items_are_named_from_one(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(numbered_rows(3)))
    assert load_rows(str(tmp_path / "list.json"), None, None).where(2) == f"{tmp_path / 'list.json'}, item 3"


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(json.dumps(numbered_rows(1)[0]).encode() + b'\n{"messages": "caf\xe9"}\n')
    with pytest.raises(CacheConfigError, match=r"chats.jsonl, line 2: not valid UTF-8 \(byte 0xe9\)"):
        load_rows(str(path), None, None)
    (tmp_path / "chats.json").write_bytes(b'[\n{"a": 1},\n"\xff"]')
    with pytest.raises(CacheConfigError, match=r"chats.json, line 3: not valid UTF-8"):
        load_rows(str(tmp_path / "chats.json"), None, None)


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(numbered_rows(1)[0]).encode() + b"\n")
    assert [row["id"] for row in load_rows(str(path), None, None)] == [0]


@pytest.mark.parametrize(
    ("content", "shown"),
    [({"text": "hello"}, "a dict ({'text': 'hello'})"), (42, "an int (42)"), (["hello"], "a list (['hello'])")],
)
def test_content_that_is_not_text_is_refused_not_stringified(content, shown):
    value = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(CacheConfigError, match=re.escape(f"line 2: messages[0].content is {shown}; give a string")):
        conversation_from_row(value, 0, "chats.jsonl, line 2")


def test_sharegpt_turn_without_value_is_refused():
    value = {"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(CacheConfigError, match=r"conversations\[0\]: a ShareGPT turn needs `value`"):
        conversation_from_row(value, 0, "chats.jsonl, line 1")


def test_samples_left_without_supervision_are_named_by_line(tmp_path, make_chat_tokenizer, caplog):
    long_system = {"role": "system", "content": "The quick brown fox jumps over the lazy dog. " * 40}
    rows = [{"messages": chat("Hi", "Yo")}, {"messages": [long_system, *chat("Hi", "Yo")]}]
    data_path = write_jsonl(tmp_path / "chats.jsonl", rows)
    with caplog.at_level("WARNING"):
        tokenize_to_store(tmp_path / "tokenized.h5", make_chat_tokenizer(), data_path, 32)
    warning = " ".join(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert "1 samples have no supervised token" in warning
    assert f"{data_path}, line 2 (cut at seq_length before its first assistant token)" in warning


def test_invalid_json_in_a_document_names_its_line_and_column(tmp_path):
    (tmp_path / "chats.json").write_text('[\n{"a": 1},\n{oops}]')
    with pytest.raises(CacheConfigError, match=r"chats.json: invalid JSON \(.* at line 3, column 2\)"):
        load_rows(str(tmp_path / "chats.json"), None, None)
