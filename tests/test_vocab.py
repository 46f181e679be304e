"""Draft-vocabulary counting and selection."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from snakemake.iocontainers import Namedlist

from eagle3_cache import token_store as token_store_module
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.token_store import (
    TokenizedSample,
    join_stores,
    read_supervised_counts,
    read_tokenized_info,
    synthetic_header,
    write_tokenized,
)
from eagle3_cache.vocab import (
    build_vocab_selection,
    select_draft_vocab,
    store_vocab_selection,
    write_vocab_counts,
    write_vocab_selection,
)
from eagle3_cache.vocab_selection import read_vocab_selection
from helpers import tokenize_to_store

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
NO_SPECIALS = (None, None, None, None)


def select(counts, draft_vocab_size, specials=NO_SPECIALS) -> list[int]:
    counts = np.asarray(counts, dtype=np.int64)
    return select_draft_vocab(counts, specials, draft_vocab_size, len(counts)).tolist()


def test_by_descending_count_with_ties_to_the_lower_id():
    assert select([0, 5, 2, 5, 0, 7], 4) == [5, 1, 3, 2]


def test_specials_come_first_even_unseen_skipping_none_out_of_range_and_repeats():
    counts = [9, 0, 4, 0, 3, 0]
    assert select(counts, 5, specials=(3, None, 3, 99)) == [3, 0, 2, 4, 1]
    assert select(counts, 3, specials=(5, 1, 3, -1)) == [5, 1, 3]


def test_unseen_ids_fill_in_increasing_order_and_result_is_not_sorted():
    assert select([0, 0, 0, 1, 0, 2], 5) == [5, 3, 0, 1, 2]


def test_whole_vocabulary_when_size_is_none_or_too_large():
    assert select([3, 0, 1], None) == [0, 1, 2]
    assert select([3, 0, 1], 3) == [0, 1, 2]
    assert select([3, 0, 1], 10) == [0, 1, 2]


@pytest.mark.parametrize("size", [0, -1])
def test_draft_vocab_below_one_is_refused(size):
    with pytest.raises(CacheConfigError, match="draft_vocab_size must be >= 1"):
        select([1, 2], size)


def token_store(path: Path, rows: list[tuple[list[int], list[int]]], vocab_size: int, seq_length: int = 4):
    """A store from (input_ids, loss_mask) rows padded with id 0."""
    samples = []
    for ids, mask in rows:
        pad = seq_length - len(ids)
        samples.append(
            TokenizedSample(
                input_ids=np.array(ids + [0] * pad, dtype=np.int64),
                loss_mask=np.array(mask + [0] * pad, dtype=np.uint8),
                length=len(ids),
                truncated=False,
            )
        )
    header = synthetic_header(seq_length, vocab_size, special_token_ids=(1, 2, None, 0), pad_token_id=0)
    write_tokenized(path, header, samples, len(samples))
    return path


def test_counts_only_loss_masked_unshifted_in_range_ids_summed_over_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(token_store_module, "WRITE_ROWS", 2)
    rows = [
        ([5, 6, 7, 5], [1, 0, 1, 1]),
        ([9, 9, 3], [1, 1, 0]),
        ([4, 12], [1, 1]),  # 12 is outside the vocabulary
    ]
    whole = token_store(tmp_path / "whole.h5", rows, vocab_size=10)
    parts = [token_store(tmp_path / f"part-{i}.h5", rows[i : i + 2], vocab_size=10) for i in (0, 2)]
    joined = tmp_path / "joined.h5"
    join_stores(joined, parts)
    for store in (whole, joined):
        counts = read_supervised_counts(store)
        assert counts.dtype == np.int64
        assert counts.tolist() == [0, 0, 0, 0, 1, 2, 0, 1, 0, 2]


def test_selection_file_round_trip(tmp_path):
    path = tmp_path / "vocab_selection.pt"
    write_vocab_selection(path, torch.tensor([3, 1, 2], dtype=torch.int32), 10)
    saved = torch.load(path, weights_only=True)
    assert saved["selected_token_ids"].dtype == torch.int64 and saved["target_vocab_size"] == 10
    selected, vocab_size = read_vocab_selection(path)
    assert selected.tolist() == [3, 1, 2] and vocab_size == 10


def test_malformed_selection_file_is_refused(tmp_path):
    path = tmp_path / "vocab_selection.pt"
    torch.save({"ids": torch.tensor([1])}, path)
    with pytest.raises(CacheConfigError, match="vocab_selection.pt: not a vocab selection"):
        read_vocab_selection(path)


def test_select_vocab_rule_script(tmp_path):
    store = token_store(tmp_path / "tokenized.h5", [([5, 6, 7, 5], [1, 1, 1, 1])], vocab_size=10)
    outputs = Namedlist(fromdict={"selection": str(tmp_path / "sel.pt"), "counts": str(tmp_path / "counts.npy")})
    snakemake = SimpleNamespace(
        input=Namedlist(fromdict={"tokenized": str(store)}),
        output=outputs,
        params=SimpleNamespace(draft_vocab_size=4),
        log=[str(tmp_path / "select_vocab.log")],
    )
    runpy.run_path(str(SCRIPTS / "select_vocab.py"), init_globals={"snakemake": snakemake})
    assert read_vocab_selection(outputs.selection)[0].tolist() == [1, 2, 0, 5]
    assert np.load(outputs.counts).tolist() == [0, 0, 0, 0, 0, 2, 1, 1, 0, 0]
    assert "cover 2 of 4 supervised tokens" in (tmp_path / "select_vocab.log").read_text()


def test_a_draft_vocabulary_larger_than_the_target_is_refused_not_clamped(tmp_path):
    store = token_store(tmp_path / "tokenized.h5", [([5, 6], [1, 1])], vocab_size=10)
    with pytest.raises(CacheConfigError, match="draft_vocab_size 11 is larger than the target's vocabulary of 10"):
        build_vocab_selection(store, 11, tmp_path / "selection.pt")
    assert not (tmp_path / "selection.pt").exists()


def test_counts_file(tmp_path):
    path = tmp_path / "vocab_counts.npy"
    write_vocab_counts(path, np.array([1, 0, 3], dtype=np.int64))
    assert np.load(path).tolist() == [1, 0, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["vocab_counts.npy"]


# --- Parity with Automodel's build_eagle3_token_mapping (the oracle) ---------------------------


def automodel_selection(automodel_eagle3, tokenizer, input_data, seq_length, vocab_size, draft_vocab_size):
    """What Automodel's precompute CLI selects: specials read after its dataset set the pad token."""
    loader = automodel_eagle3.build_eagle3_dataloader(
        data_path=str(input_data), tokenizer=tokenizer, seq_length=seq_length, batch_size=2, shuffle=False
    )
    special_token_ids = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")]
    selected, _ = automodel_eagle3.build_eagle3_token_mapping(
        loader,
        target_vocab_size=vocab_size,
        draft_vocab_size=draft_vocab_size,
        special_token_ids=special_token_ids,
    )
    return selected


@pytest.mark.automodel
@pytest.mark.parametrize("pad_token", ["<pad>", None])
@pytest.mark.parametrize("draft_vocab_size", [1, 3, 40, 383, 384, None])
def test_parity_tiny_tokenizer(
    tmp_path, automodel_eagle3, make_chat_tokenizer, parity_jsonl, pad_token, draft_vocab_size
):
    tokenizer = make_chat_tokenizer(pad_token=pad_token)
    store = tokenize_to_store(tmp_path / "t.h5", tokenizer, parity_jsonl, 40, vocab_size=384)
    theirs = automodel_selection(
        automodel_eagle3, make_chat_tokenizer(pad_token=pad_token), parity_jsonl, 40, 384, draft_vocab_size
    )
    assert torch.equal(store_vocab_selection(store, draft_vocab_size).selected, theirs)


@pytest.mark.automodel
def test_parity_smollm2(tmp_path, automodel_eagle3, smollm2_tokenizer, parity_jsonl):
    store = tokenize_to_store(tmp_path / "t.h5", smollm2_tokenizer, parity_jsonl, 64)
    vocab_size = read_tokenized_info(store).target_vocab_size
    for draft_vocab_size in (32, 1000):
        theirs = automodel_selection(
            automodel_eagle3, smollm2_tokenizer, parity_jsonl, 64, vocab_size, draft_vocab_size
        )
        assert torch.equal(store_vocab_selection(store, draft_vocab_size).selected, theirs)
