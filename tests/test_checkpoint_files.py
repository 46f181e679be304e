"""The torch-free checks of a local checkpoint's files; the bad-input table (test_bad_inputs.py) runs them as
a user meets them, these cover the cases a tiny Llama cannot show."""

import json
import struct

import pytest

from eagle3_cache.checkpoint_files import check_seq_length, context_length, tokenizer_max_id, whole_file_tensors
from eagle3_cache.errors import CacheConfigError

LLAMA_3_1 = {
    "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
}
QWEN_YARN = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0}}


@pytest.mark.parametrize(
    ("config", "context"),
    [
        (LLAMA_3_1, 131072),
        (QWEN_YARN, 131072),
        ({"max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, 2048),
        ({"text_config": {"max_position_embeddings": 4096}}, 4096),
        ({}, None),
    ],
    ids=["llama-3.1", "yarn", "default-rope", "text-config", "unstated"],
)
def test_the_context_is_what_the_positions_and_their_scaling_cover(config, context):
    assert context_length(config) == context


def test_seq_length_beyond_the_context_names_both_numbers():
    check_seq_length(QWEN_YARN, 131072)
    with pytest.raises(CacheConfigError, match="seq_length 131073 is longer than the target's context of 131072"):
        check_seq_length(QWEN_YARN, 131073)
    check_seq_length({}, 10**9)  # a config that states no context: left to the model


def write_safetensors(path, header: dict, data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))


def test_a_weight_file_is_whole_when_its_data_reaches_every_offset(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    write_safetensors(path, header, 24)
    assert whole_file_tensors(path) == {"w": (2, 3)}
    write_safetensors(path, header, 23)
    with pytest.raises(CacheConfigError, match=r"model.safetensors: \d+ bytes, its header describes \d+ \(cut short\)"):
        whole_file_tensors(path)
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CacheConfigError, match="too short for its safetensors header"):
        whole_file_tensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(CacheConfigError, match="its safetensors header is not valid JSON"):
        whole_file_tensors(path)


def test_the_largest_token_id_counts_added_tokens_and_unigram_vocabularies(tmp_path):
    assert tokenizer_max_id(tmp_path) is None
    tokenizer = {"model": {"vocab": {"a": 0, "b": 7}}, "added_tokens": [{"id": 9, "content": "<s>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert tokenizer_max_id(tmp_path) == 9
    unigram = {"model": {"type": "Unigram", "vocab": [["a", -1.0], ["b", -2.0], ["c", -3.0]]}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(unigram))
    assert tokenizer_max_id(tmp_path) == 2
