"""Conversations to the tokenized store: what the `tokenize` rule runs, callable from tests and tools."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .chat import ChatTokenizer, chat_template_hash, special_token_ids, tokenizer_hash
from .data import Conversation, Rows, checked, iter_conversations, load_rows
from .errors import CacheConfigError
from .hub import loading
from .layout import applied_settings
from .preflight import check_model_config
from .supervision import log_supervision
from .token_store import TokenizedHeader, TokenizedSample, read_tokenized_info, write_tokenized

PROGRESS_EVERY = 1000
log = logging.getLogger(__name__)


def tokenize_dataset(
    output: str | Path,
    *,
    target_model: str,
    revision: str | None,
    trust_remote_code: bool,
    run_settings: Mapping[str, Any] | None = None,
    **options: Any,
) -> None:
    """Load the target's tokenizer and config, then `write_tokenized_store` (the `tokenize` rule).

    With `run_settings` (the run's whole settings), its aux_layer_ids and draft_vocab_size are first
    checked against the config: for a hub model this is the first place they can be.
    """
    with loading("target_model", target_model, revision=revision):
        config = AutoConfig.from_pretrained(target_model, revision=revision, trust_remote_code=trust_remote_code)
        if run_settings is not None:
            check_model_config(config.to_dict(), run_settings)
        tokenizer = AutoTokenizer.from_pretrained(target_model, revision=revision, trust_remote_code=trust_remote_code)
    vocab_size = target_vocab_size(config, target_model)
    check_tokenizer_fits(tokenizer, vocab_size, target_model)
    write_tokenized_store(output, tokenizer, vocab_size, **options)


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int, target_model: str) -> None:
    """Refuse a tokenizer with ids past the model's vocabulary: such a token would index past the embedding
    in the first shard job (a local checkpoint's files are checked before any job; a hub model's here)."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= vocab_size:
        raise CacheConfigError(
            f"target_model {target_model!r}: its tokenizer has ids up to {largest}, but its config's vocab_size is "
            f"{vocab_size}, so a token past it would index past the embedding; use the tokenizer this model "
            "was trained with"
        )


def write_tokenized_store(
    output: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    *,
    input_data: str,
    split: str | None,
    shuffle_seed: int | None,
    seq_length: int,
    data_revision: str | None = None,
    mask_reasoning_content: bool = False,
    mask_generation_prompt: bool = False,
    rows: Rows | None = None,
) -> None:
    """Load `input_data` (unless its `rows` are given), render it with the tokenizer's chat template and
    write the store at `output`."""
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
        # As applied: a JSON file's split and shuffle_seed are None, whatever the run set.
        source=applied_settings({"input_data": input_data, "split": split, "shuffle_seed": shuffle_seed}),
        mask_reasoning_content=mask_reasoning_content,
        mask_generation_prompt=mask_generation_prompt,
    )
    if rows is None:
        rows = checked(load_rows(input_data, split, shuffle_seed, data_revision), input_data)
    log.info("Tokenizing %d samples from %s at seq_length %d", len(rows), input_data, seq_length)
    samples = watched(iter_conversations(rows), chat)
    write_tokenized(output, header, with_progress(samples, len(rows)), len(rows))
    log_supervision(read_tokenized_info(output))


def target_vocab_size(config: PretrainedConfig, target_model: str) -> int:
    """The model's vocab size (the width of its logits), which can differ from len(tokenizer)."""
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is None:
        raise CacheConfigError(f"target_model {target_model!r}: its config has no vocab_size")
    return int(vocab_size)


def watched(conversations: Iterable[Conversation], chat: ChatTokenizer) -> Iterator[TokenizedSample]:
    """Each conversation tokenized; a chat template that fails on one names it."""
    for conversation in conversations:
        try:
            yield chat(conversation)
        except jinja2.TemplateError as error:
            raise CacheConfigError(
                f"{conversation.where}: the chat template of target_model {chat.tokenizer.name_or_path!r} failed "
                f"on it ({type(error).__name__}: {error}); fix or remove the sample, or use a template that "
                "renders it"
            ) from error


def with_progress(samples: Iterable[TokenizedSample], total: int) -> Iterator[TokenizedSample]:
    for done, sample in enumerate(samples, start=1):
        if done % PROGRESS_EVERY == 0:
            log.info("tokenized %d / %d samples", done, total)
        yield sample
