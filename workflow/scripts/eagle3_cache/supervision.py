"""What a tokenized store supervises, said once it is written: a summary line, a warning naming samples
without a supervised token, and the refusal of a run's store in which no sample has one. No torch."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import CacheConfigError
from .token_store import TokenizedInfo, join_stores

log = logging.getLogger(__name__)


def join_tokenized_parts(output: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> TokenizedInfo:
    """The `tokenize` rule's step: the parts joined into the run's store at `output`, refused (and not left
    behind) when no sample of it has a supervised token."""
    info = join_stores(output, parts)
    if not info.num_supervised.any():
        Path(output).unlink()
        raise CacheConfigError(no_supervision_error(info))
    log_supervision(info)
    return info


def log_supervision(info: TokenizedInfo) -> None:
    """The store's summary line, and a warning naming its first samples without supervision."""
    log.info(
        "%d samples, %d truncated, %d supervised tokens, %d content tokens",
        info.num_samples,
        int(info.truncated.sum()),
        int(info.num_supervised.sum()),
        int(info.lengths.sum()),
    )
    if num_unsupervised(info):
        log.warning(unsupervised_warning(info))


def num_unsupervised(info: TokenizedInfo) -> int:
    return int((info.num_supervised == 0).sum())


def unsupervised_warning(info: TokenizedInfo) -> str:
    """One line naming the first samples without supervision."""
    return (
        f"{num_unsupervised(info)} samples have no supervised token, so nothing trains on them (kept, as "
        f"Automodel does): {first_named(info)}. Raise seq_length (now {info.seq_length}), shorten what precedes "
        "their assistant turns, or remove them"
    )


def first_named(info: TokenizedInfo) -> str:
    """The samples without supervision the store names, and how many more there are."""
    more = num_unsupervised(info) - len(info.unsupervised)
    return "; ".join(info.unsupervised) + (f"; and {more} more" if more > 0 else "")


def no_supervision_error(info: TokenizedInfo) -> str:
    """One line for data of which no sample has a supervised token: the cache would train nothing."""
    masks = ", ".join(f"{name} {getattr(info, name)}" for name in ("mask_reasoning_content", "mask_generation_prompt"))
    return (
        f"input_data {info.source['input_data']!r}: none of its {info.num_samples} samples has a supervised token "
        f"at seq_length {info.seq_length} ({masks}), so the cache would train nothing: {first_named(info)}. Raise "
        "seq_length, shorten what precedes the assistant turns, or turn off a masking setting that removes them"
    )
