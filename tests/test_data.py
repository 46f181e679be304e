"""Loading conversations, rendering them with a chat template, and the HDF5 token store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import h5py
import numpy as np
import pytest
import torch
from datasets import Dataset

from eagle3_cache import chat as chat_module
from eagle3_cache import data
from eagle3_cache.chat import ChatTokenizer, chat_template_hash, special_token_ids, tokenizer_hash
from eagle3_cache.data import Conversation, Rows, conversation_from_row, iter_conversations, load_rows
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.token_store import (
    TokenizedHeader,
    iter_token_blocks,
    read_token_block,
    read_token_rows,
    read_tokenized_info,
    write_tokenized,
)
from helpers import (
    CHATML_GENERATION_TEMPLATE,
    CHATML_TEMPLATE,
    chat,
    numbered_rows,
    run_tokenize_jobs,
    tiny_llama_config,
    tokenize_run_config,
    tokenize_to_store,
    write_jsonl,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"


def ids_of(rows) -> list[int]:
    return [row["id"] for row in rows]


def supervised_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.input_ids[sample.loss_mask.astype(bool)].tolist())


def conversation(messages: list[dict], index: int = 0) -> Conversation:
    return Conversation(index=index, messages=messages, where=f"sample {index}")


def row(value: dict, where: str = "chats.jsonl, line 1") -> Conversation:
    return conversation_from_row(value, 0, where)


# --- Sources -----------------------------------------------------------------------------------


def test_jsonl_keeps_file_order_and_ignores_split_and_seed(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", numbered_rows(5))
    assert ids_of(load_rows(str(path), "train[1:2]", 42)) == [0, 1, 2, 3, 4]


def test_json_list_and_single_object(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(numbered_rows(3)))
    (tmp_path / "one.json").write_text(json.dumps(numbered_rows(1)[0]))
    assert ids_of(load_rows(str(tmp_path / "list.json"), None, None)) == [0, 1, 2]
    assert ids_of(load_rows(str(tmp_path / "one.json"), None, None)) == [0]


def test_parquet_file_is_shuffled_whole_then_sliced(tmp_path):
    rows = numbered_rows(12)
    Dataset.from_list(rows).to_parquet(tmp_path / "chats.parquet")
    expected = ids_of(Dataset.from_list(rows).shuffle(seed=7))[2:6]
    assert expected != [2, 3, 4, 5]
    assert ids_of(load_rows(str(tmp_path / "chats.parquet"), "train[2:6]", 7)) == expected


def test_parquet_directory_without_seed_keeps_order(tmp_path):
    Dataset.from_list(numbered_rows(6)).to_parquet(tmp_path / "part-0.parquet")
    assert ids_of(load_rows(str(tmp_path), "train[:3]", None)) == [0, 1, 2]
    assert ids_of(load_rows(str(tmp_path), None, 3)) == ids_of(Dataset.from_list(numbered_rows(6)).shuffle(seed=3))


def test_hub_id_loads_the_base_split_then_shuffles_and_slices(monkeypatch):
    rows = numbered_rows(10)
    calls = []

    def fake_load_dataset(path, split, **kwargs):
        calls.append((path, split))
        return Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "check_hub_access", lambda *args, **kwargs: None)
    loaded = load_rows("org/chats", "train[5:]", 1)
    assert calls == [("org/chats", "train")]
    assert ids_of(loaded) == ids_of(Dataset.from_list(rows).shuffle(seed=1))[5:]
    assert loaded.where(2) == "org/chats, row 2 (0-based, after shuffling and slicing)"


def test_hub_id_needs_a_split():
    with pytest.raises(CacheConfigError, match="hub dataset, which needs `split`"):
        load_rows("org/chats", None, 42)


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CacheConfigError, match="nope.jsonl.*no such file"):
        load_rows(str(missing), None, None)


def test_unsupported_slice_syntax(tmp_path):
    with pytest.raises(CacheConfigError, match=r"train\[:10%\]"):
        load_rows("org/chats", "train[:10%]", 42)


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(numbered_rows(1)[0]) + "\n\n{oops\n")
    with pytest.raises(CacheConfigError, match="line 3"):
        load_rows(str(path), None, None)


def test_other_file_types_are_refused(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text("a,b\n")
    with pytest.raises(CacheConfigError, match="neither JSON"):
        load_rows(str(path), None, None)


# --- Rows --------------------------------------------------------------------------------------


def test_openai_messages_are_normalised():
    value = {
        "messages": [
            {"role": "system", "content": None},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}, {"text": "here"}]},
            {"role": "assistant", "content": "ok", "reasoning_content": None, "name": "bot"},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
    }
    result = row(value)
    assert [m["content"] for m in result.messages] == ["", "look here", "ok"]
    assert result.messages[2] == {"role": "assistant", "content": "ok", "reasoning_content": "", "name": "bot"}
    assert result.tools == [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    "source_role, role",
    [("human", "user"), ("user", "user"), ("system", "system")]
    + [(name, "assistant") for name in ("gpt", "assistant", "chatgpt", "model", "bot")],
)
def test_sharegpt_roles(source_role, role):
    value = {"conversations": [{"from": source_role, "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert row(value).messages[0] == {"role": role, "content": "x"}


def test_unknown_openai_role_names_line_message_and_accepted_roles():
    rows = [{"messages": chat("a", "b")}] * 3 + [{"messages": [{"role": "narrator", "content": "x"}]}]
    named = Rows(rows, lambda index: f"chats.jsonl, line {index + 1}")
    with pytest.raises(
        CacheConfigError, match=r"line 4: messages\[0\]: unknown role 'narrator'.*system, user, assistant, tool"
    ):
        list(iter_conversations(named))


def test_unknown_sharegpt_role_names_line_turn_and_accepted_roles():
    value = {"conversations": [{"from": "observation", "value": "x"}]}
    with pytest.raises(
        CacheConfigError, match=r"line 8: conversations\[0\]: unknown ShareGPT role 'observation'.*human"
    ):
        row(value, "chats.jsonl, line 8")


def test_row_without_assistant_turn_is_refused():
    with pytest.raises(CacheConfigError, match="line 3 has no assistant turn"):
        row({"messages": [{"role": "user", "content": "hi"}]}, "chats.jsonl, line 3")


def test_row_without_messages_is_refused():
    with pytest.raises(CacheConfigError, match="line 5: no `messages`.*'text'"):
        row({"text": "hi"}, "chats.jsonl, line 5")


# --- Rendering and masks -----------------------------------------------------------------------


def test_tokenizer_without_chat_template_is_refused(make_chat_tokenizer):
    with pytest.raises(CacheConfigError, match="no chat template.*instruct"):
        ChatTokenizer(make_chat_tokenizer(template=None), 16)


def test_seq_length_below_two_is_refused(make_chat_tokenizer):
    with pytest.raises(CacheConfigError, match="seq_length must be at least 2"):
        ChatTokenizer(make_chat_tokenizer(), 1)


def test_prefix_masks_cover_each_assistant_turn_with_its_header(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer()
    messages = [{"role": "system", "content": "Be fine."}, *chat("Hello", "I am fine"), *chat("How", "Good")]
    sample = ChatTokenizer(tokenizer, 96)(conversation(messages))
    assert supervised_text(tokenizer, sample) == (
        "<|im_start|>assistant\n<think></think>I am fine<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Good<|im_end|>\n"
    )


def test_generation_tags_give_the_mask(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer(template=CHATML_GENERATION_TEMPLATE)
    sample = ChatTokenizer(tokenizer, 64)(conversation(chat("Hello", "I am fine")))
    assert supervised_text(tokenizer, sample) == "<think></think>I am fine<|im_end|>"


def test_mask_generation_prompt_drops_what_the_prompt_emits(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer()
    messages = [*chat("Hello", "I am fine"), *chat("Sum", "Four", reasoning_content="two plus two")]
    sample = ChatTokenizer(tokenizer, 96, mask_generation_prompt=True)(conversation(messages))
    # The non-thinking prompt emits the header and <think></think>; the thinking one only opens <think>.
    assert supervised_text(tokenizer, sample) == "I am fine<|im_end|>\ntwo plus two</think>Four<|im_end|>\n"


def test_mask_reasoning_content_drops_the_reasoning(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer()
    messages = chat("Sum", "Four", reasoning_content="two plus two")
    sample = ChatTokenizer(tokenizer, 64, mask_reasoning_content=True)(conversation(messages))
    assert supervised_text(tokenizer, sample) == "<|im_start|>assistant\n<think></think>Four<|im_end|>\n"


def test_truncation_keeps_the_head(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer()
    messages = chat("Hello", "The quick brown fox jumps over the lazy dog")
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    untruncated = ChatTokenizer(tokenizer, len(full) + 5)(conversation(messages))
    sample = ChatTokenizer(tokenizer, len(full) - 4)(conversation(messages))
    assert sample.truncated and not untruncated.truncated
    assert sample.input_ids.tolist() == full[: len(full) - 4]
    assert sample.length == len(full) - 4
    assert sample.loss_mask.tolist() == untruncated.loss_mask[: len(full) - 4].tolist()
    assert sample.num_supervised == untruncated.num_supervised - 4


def test_padding_is_right_and_outside_both_masks(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer()
    messages = chat("Hello", "I am fine")
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    sample = ChatTokenizer(tokenizer, len(full) + 6)(conversation(messages))
    assert sample.input_ids.tolist() == full + [tokenizer.pad_token_id] * 6
    assert sample.length == len(full)
    assert not sample.loss_mask[len(full) :].any()


def test_pad_falls_back_to_eos_and_one_trailing_eos_is_content(make_chat_tokenizer):
    tokenizer = make_chat_tokenizer(pad_token=None)
    messages = chat("Hello", "I am fine")
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    sample = ChatTokenizer(tokenizer, len(full) + 3)(conversation(messages))
    assert sample.input_ids.tolist() == full + [tokenizer.eos_token_id] * 3
    assert sample.length == len(full) + 1


def test_pad_id_zero_still_marks_padding(make_chat_tokenizer):
    # Automodel 0.7.0 takes a pad id of 0 for "no pad id" (`... or eos_token_id`) and so attends to
    # all of the padding; since the draft is causal and pads are unsupervised, we keep the true mask.
    tokenizer = make_chat_tokenizer(pad_token="<unk>")
    messages = chat("Hello", "I am fine")
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    sample = ChatTokenizer(tokenizer, len(full) + 3)(conversation(messages))
    assert sample.input_ids.tolist() == full + [0] * 3
    assert sample.length == len(full)


def test_template_that_rewrites_history_is_refused(make_chat_tokenizer):
    template = "{{ messages | length }}" + CHATML_GENERATION_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    chat_tokenizer = ChatTokenizer(make_chat_tokenizer(template=template), 64)
    with pytest.raises(CacheConfigError, match="sample 5: rendering its first 1 message.*generation"):
        chat_tokenizer(conversation(chat("Hello", "Fine"), index=5))


def test_prefix_differences_beyond_seq_length_are_ignored(make_chat_tokenizer):
    # The message count at the very end differs between a prefix render and the whole render.
    tokenizer = make_chat_tokenizer(template=CHATML_TEMPLATE + "{{ messages | length }}")
    messages = chat("Hello", "Fine")
    first_message_tokens = len(tokenizer.apply_chat_template(messages[:1])["input_ids"])
    ChatTokenizer(tokenizer, first_message_tokens - 1)(conversation(messages))
    with pytest.raises(CacheConfigError, match="rendering its first 1 message"):
        ChatTokenizer(tokenizer, first_message_tokens)(conversation(messages))


def test_leading_assistant_turn_needs_generation_tags(make_chat_tokenizer):
    messages = [{"role": "assistant", "content": "Hello"}, *chat("Hi", "Fine")]
    with pytest.raises(CacheConfigError, match="sample 0: starts with an assistant turn"):
        ChatTokenizer(make_chat_tokenizer(), 64)(conversation(messages))
    tokenizer = make_chat_tokenizer(template=CHATML_GENERATION_TEMPLATE)
    sample = ChatTokenizer(tokenizer, 64, mask_generation_prompt=True)(conversation(messages))
    assert supervised_text(tokenizer, sample) == "<think></think>Hello<|im_end|>Fine<|im_end|>"


def test_real_smollm2_template(smollm2_tokenizer):
    sample = ChatTokenizer(smollm2_tokenizer, 64)(conversation(chat("What is 2+2?", "4")))
    rendered = smollm2_tokenizer.decode(sample.input_ids[: sample.length].tolist())
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert supervised_text(smollm2_tokenizer, sample) == "<|im_start|>assistant\n4<|im_end|>\n"
    # pad == eos there, so one trailing <|im_end|> is content.
    assert rendered.endswith("<|im_end|>\n<|im_end|>")


@pytest.mark.parametrize("seq_length", [40, 512])
@pytest.mark.parametrize("options", [{}, {"mask_generation_prompt": True, "mask_reasoning_content": True}], ids=str)
def test_prefixes_read_off_the_one_encoding_equal_prefixes_encoded_alone(
    smollm2_tokenizer, monkeypatch, seq_length, options
):
    messages = [
        {"role": "system", "content": "Be brief."},
        *chat("What is 2+2?", "4", reasoning_content="add them"),
        *chat("  and  3+3?\n", "\n6 "),
        *chat("Thanks", "You are welcome."),
    ]
    located = ChatTokenizer(smollm2_tokenizer, seq_length, **options)
    assert located.added_tokens, "SmolLM2's tokenizer is fast and has added tokens"
    read_off = []
    monkeypatch.setattr(
        chat_module._Renders, "prefix", recording(chat_module._Renders.prefix, lambda renders: renders.starts, read_off)
    )
    sample = located(conversation(messages))
    assert read_off and all(read_off), "every prefix was read off the one encoding"
    encoded_alone = ChatTokenizer(smollm2_tokenizer, seq_length, **options)
    encoded_alone.added_tokens = {}
    alone = encoded_alone(conversation(messages))
    assert np.array_equal(sample.input_ids, alone.input_ids)
    assert np.array_equal(sample.loss_mask, alone.loss_mask)
    assert sample.num_supervised > 0


def recording(method, fact, facts: list):
    """`method`, appending `bool(fact(self))` to `facts` at each call."""

    def recorded(self, *args, **kwargs):
        facts.append(bool(fact(self)))
        return method(self, *args, **kwargs)

    return recorded


# --- The token store ---------------------------------------------------------------------------


def store_header(tokenizer, seq_length: int, **overrides) -> TokenizedHeader:
    fields = dict(
        seq_length=seq_length,
        target_vocab_size=384,
        special_token_ids=special_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer),
        source={"input_data": "chats.jsonl", "split": None, "shuffle_seed": 42},
        mask_reasoning_content=False,
        mask_generation_prompt=True,
    )
    return TokenizedHeader(**{**fields, **overrides})


@pytest.fixture
def store(tmp_path, make_chat_tokenizer):
    """A store of five samples at seq_length 25 (the fourth exactly fits, the last is truncated)."""
    tokenizer = make_chat_tokenizer()
    messages = [chat(f"Hello {i}", "I am fine" + " thanks" * i) for i in range(4)]
    messages.append(chat("Hello", "The quick brown fox jumps over the lazy dog"))
    chat_tokenizer = ChatTokenizer(tokenizer, 25, mask_generation_prompt=True)
    samples = [chat_tokenizer(conversation(m, i)) for i, m in enumerate(messages)]
    path = tmp_path / "tokenized.h5"
    write_tokenized(path, store_header(tokenizer, 25), iter(samples), len(samples))
    return path, samples, tokenizer


def test_store_round_trip(store):
    path, samples, tokenizer = store
    block = read_token_block(path, 1, 4)
    for tensor in (block.input_ids, block.attention_mask, block.loss_mask):
        assert tensor.dtype == torch.int64 and tensor.shape == (3, 25)
    for row, sample in zip(range(3), samples[1:4], strict=True):
        assert block.input_ids[row].tolist() == sample.input_ids.tolist()
        assert block.loss_mask[row].tolist() == sample.loss_mask.tolist()
        assert block.attention_mask[row].tolist() == [1] * sample.length + [0] * (25 - sample.length)
    with h5py.File(path) as raw:
        assert raw["input_ids"].dtype == np.int32


def test_store_info(store):
    path, samples, tokenizer = store
    info = read_tokenized_info(path)
    assert info.num_samples == 5 and info.seq_length == 25 and info.target_vocab_size == 384
    assert info.special_token_ids == (1, 2, 3, 0)
    assert info.pad_token_id == 3
    assert info.source == {"input_data": "chats.jsonl", "split": None, "shuffle_seed": 42}
    assert info.mask_generation_prompt is True and info.mask_reasoning_content is False
    assert info.tokenizer_hash == tokenizer_hash(tokenizer) and len(info.chat_template_hash) == 64
    assert info.lengths.tolist() == [s.length for s in samples]
    assert info.num_supervised.tolist() == [s.num_supervised for s in samples]
    assert info.truncated.tolist() == [False] * 4 + [True]


def test_store_rows_in_any_order(store):
    path, samples, _ = store
    block = read_token_rows(path, [4, 0, 4, 2])
    assert [row.tolist() for row in block.input_ids] == [samples[i].input_ids.tolist() for i in (4, 0, 4, 2)]
    blocks = list(iter_token_blocks(path, 2))
    assert [len(b.input_ids) for b in blocks] == [2, 2, 1]
    assert torch.equal(torch.cat([b.loss_mask for b in blocks]), read_token_block(path, 0, 5).loss_mask)


def test_store_reads_out_of_range_are_refused(store):
    path, _, _ = store
    with pytest.raises(IndexError):
        read_token_block(path, 3, 6)
    with pytest.raises(IndexError):
        read_token_rows(path, [5])


def test_store_write_is_atomic(tmp_path, store):
    _, samples, tokenizer = store
    path = tmp_path / "short.h5"
    with pytest.raises(ValueError, match="got 2 samples, 3 were announced"):
        write_tokenized(path, store_header(tokenizer, 25), iter(samples[:2]), 3)
    assert list(tmp_path.glob("short.h5*")) == []


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    path = tmp_path / "tokenized.h5"
    path.write_text("not hdf5")
    with pytest.raises(CacheConfigError, match="tokenized.h5.*rerun the tokenize rule"):
        read_tokenized_info(path)


# --- The rule script ---------------------------------------------------------------------------


def tokenize_run(tmp_path: Path, run_settings: dict | None = None, **settings) -> Path:
    """The tokenize rules' scripts on a run of `settings`, in tmp_path; the run's store."""
    return run_tokenize_jobs(tmp_path, tokenize_run_config(**settings, **(run_settings or {})), "r")


def test_a_tokenizer_with_ids_past_the_vocabulary_is_refused_as_tokenization_starts(tmp_path, chat_model_dir, capsys):
    """What a hub model gets (a local one is refused earlier, from its files)."""
    tiny_llama_config(vocab_size=100).save_pretrained(chat_model_dir)
    data_path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat("Hi", "Yo")}])
    printed = run_failing_tokenize_script(capsys, tmp_path, target_model=str(chat_model_dir), input_data=str(data_path))
    expected = r"Error: target_model '.*': its tokenizer has ids up to \d+, but its config's vocab_size is 100"
    assert re.search(expected, printed)


def test_tokenize_rule_script(tmp_path, chat_model_dir):
    rows = [
        {"messages": chat("Hello", "I am fine")},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ]
    data_path = write_jsonl(tmp_path / "chats.jsonl", rows)
    tokenized = tokenize_run(tmp_path, target_model=str(chat_model_dir), input_data=str(data_path))
    info = read_tokenized_info(tokenized)
    assert info.num_samples == 2 and info.target_vocab_size == 384
    # A JSON file is read whole: its split and shuffle_seed are not applied, and the store says so.
    assert info.source == {"input_data": str(data_path), "split": None, "shuffle_seed": None}
    assert "2 samples, 0 truncated" in (tmp_path / "logs" / "r" / "tokenize.log").read_text()


def run_failing_tokenize_script(capsys, tmp_path: Path, run_settings: dict | None = None, **settings) -> str:
    """Run the tokenize scripts expecting one to stop; returns what it printed on stderr."""
    with pytest.raises(SystemExit) as stopped:
        tokenize_run(tmp_path, run_settings, **settings)
    assert stopped.value.code != 0
    return capsys.readouterr().err + str(stopped.value.code)


def test_tokenize_rule_script_names_the_line_of_a_bad_sample_in_one_line(tmp_path, chat_model_dir, capsys):
    rows = [{"messages": chat("Hi", "Yo")}, {"messages": [{"role": "user", "content": "Hi"}]}]
    data_path = write_jsonl(tmp_path / "chats.jsonl", rows)
    printed = run_failing_tokenize_script(capsys, tmp_path, target_model=str(chat_model_dir), input_data=str(data_path))
    assert f"Error: {data_path}, line 2 has no assistant turn" in printed
    assert "Traceback" not in printed
    assert "Traceback" in (tmp_path / "logs" / "r" / "tokenize_part-000000.log").read_text()
    assert not list((tmp_path / "results" / "r" / "tokenized").glob("*.h5*"))


def test_tokenize_rule_script_checks_the_target_config_before_tokenizing(tmp_path, chat_model_dir, capsys):
    data_path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat("Hi", "Yo")}])
    printed = run_failing_tokenize_script(
        capsys, tmp_path, {"aux_layer_ids": [1, 2, 30]}, target_model=str(chat_model_dir), input_data=str(data_path)
    )
    assert "aux_layer_ids must be 3 distinct layer ids in [0, 7]" in printed


# --- Parity with Automodel's ChatDataset (the oracle) ------------------------------------------

MASK_OPTIONS = [
    dict(mask_reasoning_content=reasoning, mask_generation_prompt=prompt)
    for reasoning in (False, True)
    for prompt in (False, True)
]


def option_names(options: dict) -> str:
    return "-".join(name for name, on in options.items() if on) or "no-options"


def automodel_rows(automodel_eagle3, tokenizer, input_data, seq_length, split=None, shuffle_seed=42, **options):
    """input_ids, attention_mask, loss_mask as Automodel's EAGLE-3 dataloader yields them."""
    loader = automodel_eagle3.build_eagle3_dataloader(
        data_path=str(input_data),
        tokenizer=tokenizer,
        seq_length=seq_length,
        batch_size=64,
        shuffle=False,
        split=split,
        shuffle_seed=shuffle_seed,
        **options,
    )
    (batch,) = list(loader)
    return batch


def assert_same_rows(ours_path, theirs) -> None:
    ours = read_token_block(ours_path, 0, read_tokenized_info(ours_path).num_samples)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(ours, key), theirs[key]), key


@pytest.mark.automodel
@pytest.mark.parametrize("template", [CHATML_TEMPLATE, CHATML_GENERATION_TEMPLATE], ids=["prefixes", "generation"])
@pytest.mark.parametrize("options", MASK_OPTIONS, ids=option_names)
def test_parity_tiny_tokenizer(tmp_path, automodel_eagle3, make_chat_tokenizer, parity_jsonl, template, options):
    ours = tokenize_to_store(tmp_path / "t.h5", make_chat_tokenizer(template), parity_jsonl, 40, **options)
    info = read_tokenized_info(ours)
    assert info.truncated.any() and (info.lengths < 40).any()
    theirs = automodel_rows(automodel_eagle3, make_chat_tokenizer(template), parity_jsonl, 40, **options)
    assert_same_rows(ours, theirs)


@pytest.mark.automodel
def test_parity_without_pad_token(tmp_path, automodel_eagle3, make_chat_tokenizer, parity_jsonl):
    options = MASK_OPTIONS[-1]
    ours = tokenize_to_store(tmp_path / "t.h5", make_chat_tokenizer(pad_token=None), parity_jsonl, 40, **options)
    theirs = automodel_rows(automodel_eagle3, make_chat_tokenizer(pad_token=None), parity_jsonl, 40, **options)
    assert_same_rows(ours, theirs)


@pytest.mark.automodel
@pytest.mark.parametrize("options", MASK_OPTIONS, ids=option_names)
def test_parity_smollm2(tmp_path, automodel_eagle3, smollm2_tokenizer, parity_jsonl, options):
    ours = tokenize_to_store(tmp_path / "t.h5", smollm2_tokenizer, parity_jsonl, 64, **options)
    assert read_tokenized_info(ours).truncated.any()
    assert_same_rows(ours, automodel_rows(automodel_eagle3, smollm2_tokenizer, parity_jsonl, 64, **options))


@pytest.mark.automodel
def test_parity_parquet_shuffle_and_slice(tmp_path, automodel_eagle3, make_chat_tokenizer):
    rows = [{"messages": chat(f"question {i}", f"answer {i}" * (i % 3 + 1))} for i in range(12)]
    folder = tmp_path / "chats"
    folder.mkdir()
    Dataset.from_list(rows).to_parquet(folder / "part-0.parquet")
    source = dict(split="train[3:9]", shuffle_seed=5)
    ours = tokenize_to_store(tmp_path / "t.h5", make_chat_tokenizer(), folder, 32, **source)
    theirs = automodel_rows(automodel_eagle3, make_chat_tokenizer(), folder, 32, **source)
    assert_same_rows(ours, theirs)


def test_a_hub_dataset_is_read_at_its_data_revision(monkeypatch):
    """The revision reaches `datasets.load_dataset` (the hub itself is not reached: no network in tests)."""
    import datasets as hf_datasets

    from eagle3_cache import data

    asked = {}

    def load_dataset(path, **options):
        asked.update(path=path, **options)
        return hf_datasets.Dataset.from_list([{"messages": chat("Hi", "Yo")}])

    monkeypatch.setattr(hf_datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "check_hub_access", lambda *args, **kwargs: None)
    rows = data.checked(data.load_rows("org/chats", "train", None, data_revision="0123abc"), "org/chats")
    assert len(rows) == 1 and asked["path"] == "org/chats" and asked["revision"] == "0123abc"
