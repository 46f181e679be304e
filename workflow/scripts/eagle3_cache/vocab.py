"""Draft-vocabulary selection, identical to Automodel's `build_eagle3_token_mapping`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .atomic import atomic_output, torch_save_atomic
from .errors import CacheConfigError
from .layout import draft_vocab_width
from .preflight import check_draft_vocab_size
from .token_store import read_supervised_counts, read_tokenized_info


def select_draft_vocab(
    counts: np.ndarray,
    special_token_ids: Sequence[int | None],
    draft_vocab_size: int | None,
    vocab_size: int,
) -> torch.LongTensor:
    """Target ids of the draft vocabulary; column j of target_probs is target id `result[j]`.

    Order: the special ids (kept even when never seen), then ids by descending count with ties
    to the lower id, then the lowest unused ids; cut to draft_vocab_size and NOT sorted.
    None or a size >= vocab_size selects the whole vocabulary.
    """
    if draft_vocab_size is not None and draft_vocab_size < 1:
        raise CacheConfigError(f"draft_vocab_size must be >= 1 or null (whole vocabulary), got {draft_vocab_size}")
    width = draft_vocab_width(draft_vocab_size, vocab_size)
    if width == vocab_size:
        return torch.arange(vocab_size, dtype=torch.long)
    if len(counts) != vocab_size:
        raise ValueError(f"counts cover {len(counts)} ids, the vocabulary has {vocab_size}")
    specials = list(dict.fromkeys(i for i in special_token_ids if i is not None and 0 <= i < vocab_size))
    taken = np.zeros(vocab_size, dtype=bool)
    taken[specials] = True
    by_count = np.argsort(-counts, kind="stable")
    frequent = by_count[(counts[by_count] > 0) & ~taken[by_count]]
    taken[frequent] = True
    unused = np.flatnonzero(~taken)
    selected = np.concatenate([np.asarray(specials, dtype=np.int64), frequent, unused])
    return torch.from_numpy(selected[:width].astype(np.int64))


def write_vocab_selection(path: str | os.PathLike, selected: torch.Tensor, target_vocab_size: int) -> None:
    """The selection in the file layout Automodel's `selected_token_ids_path` loads."""
    torch_save_atomic(
        path, {"selected_token_ids": selected.detach().cpu().long(), "target_vocab_size": int(target_vocab_size)}
    )


def write_vocab_counts(path: str | os.PathLike, counts: np.ndarray) -> None:
    """The per-id counts as .npy, for the report's coverage curve."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, counts)


@dataclass(frozen=True)
class VocabSelection:
    """A draft vocabulary and the supervised-token counts it was chosen from."""

    selected: torch.LongTensor
    counts: np.ndarray  # int64 [target_vocab_size]

    @property
    def target_vocab_size(self) -> int:
        return len(self.counts)


def store_vocab_selection(tokenized: str | os.PathLike, draft_vocab_size: int | None) -> VocabSelection:
    """The draft vocabulary of a tokenized store, with its specials, as the select_vocab rule picks it.

    A draft_vocab_size above the target's vocabulary is refused, where Automodel would take the whole
    vocabulary: more ids than exist is a mistake to fix, not a size to round down.
    """
    info = read_tokenized_info(tokenized)
    check_draft_vocab_size(draft_vocab_size, info.target_vocab_size)
    # Counted as tokenization wrote the rows (token_store.supervised_counts), summed over its parts.
    counts = read_supervised_counts(tokenized)
    selected = select_draft_vocab(counts, info.special_token_ids, draft_vocab_size, info.target_vocab_size)
    return VocabSelection(selected, counts)


def build_vocab_selection(
    tokenized: str | os.PathLike,
    draft_vocab_size: int | None,
    selection_path: str | os.PathLike,
    counts_path: str | os.PathLike | None = None,
) -> VocabSelection:
    """The select_vocab rule's step: the store's draft vocabulary, written to `selection_path`
    (and its counts to `counts_path` when given)."""
    vocab = store_vocab_selection(tokenized, draft_vocab_size)
    if counts_path is not None:
        write_vocab_counts(counts_path, vocab.counts)
    write_vocab_selection(selection_path, vocab.selected, vocab.target_vocab_size)
    return vocab
