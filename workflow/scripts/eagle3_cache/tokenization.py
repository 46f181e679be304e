"""Conversations to the tokenized store: what the `tokenize` rule runs, callable from tests and tools."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .chat import ChatTokenizer, chat_template_hash, special_token_ids, tokenizer_hash
from .data import iter_conversations, load_rows
from .errors import CacheConfigError
from .token_store import TokenizedHeader, TokenizedSample, read_tokenized_info, write_tokenized

PROGRESS_EVERY = 1000
log = logging.getLogger(__name__)


def tokenize_dataset(
    output: str | Path,
    *,
    target_model: str,
    revision: str | None,
    trust_remote_code: bool,
    **options: Any,
) -> None:
    """Load the target's tokenizer and config, then `write_tokenized_store` (the `tokenize` rule)."""
    tokenizer = AutoTokenizer.from_pretrained(target_model, revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(target_model, revision=revision, trust_remote_code=trust_remote_code)
    write_tokenized_store(output, tokenizer, target_vocab_size(config, target_model), **options)


def write_tokenized_store(
    output: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    *,
    input_data: str,
    split: str | None,
    shuffle_seed: int | None,
    seq_length: int,
    mask_reasoning_content: bool = False,
    mask_generation_prompt: bool = False,
) -> None:
    """Load `input_data`, render it with the tokenizer's chat template and write the store at `output`."""
    chat = ChatTokenizer(
        tokenizer,
        seq_length,
        mask_reasoning_content=mask_reasoning_content,
        mask_generation_prompt=mask_generation_prompt,
    )
    header = TokenizedHeader(
        seq_length=seq_length,
        target_vocab_size=vocab_size,
        special_token_ids=special_token_ids(tokenizer),
        pad_token_id=chat.pad_token_id,
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer),
        source={"input_data": input_data, "split": split, "shuffle_seed": shuffle_seed},
        mask_reasoning_content=mask_reasoning_content,
        mask_generation_prompt=mask_generation_prompt,
    )
    rows = load_rows(input_data, split, shuffle_seed)
    log.info("Tokenizing %d samples from %s at seq_length %d", len(rows), input_data, seq_length)
    samples = (chat(conversation) for conversation in iter_conversations(rows))
    try:
        write_tokenized(output, header, with_progress(samples, len(rows)), len(rows))
    except CacheConfigError as error:
        raise CacheConfigError(f"input_data {input_data!r}: {error}") from error
    log_summary(output)


def target_vocab_size(config: PretrainedConfig, target_model: str) -> int:
    """The model's vocab size (the width of its logits), which can differ from len(tokenizer)."""
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is None:
        raise CacheConfigError(f"target_model {target_model!r}: its config has no vocab_size")
    return int(vocab_size)


def with_progress(samples: Iterable[TokenizedSample], total: int) -> Iterator[TokenizedSample]:
    for done, sample in enumerate(samples, start=1):
        if done % PROGRESS_EVERY == 0:
            log.info("tokenized %d / %d samples", done, total)
        yield sample


def log_summary(path: str | Path) -> None:
    info = read_tokenized_info(path)
    log.info(
        "%d samples, %d truncated, %d supervised tokens, %d content tokens",
        info.num_samples,
        int(info.truncated.sum()),
        int(info.num_supervised.sum()),
        int(info.lengths.sum()),
    )
    unsupervised = int((info.num_supervised == 0).sum())
    if unsupervised:
        log.warning("%d samples have no supervised token (kept, as Automodel does)", unsupervised)
