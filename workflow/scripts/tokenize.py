"""Rule `tokenize`: conversations -> results/{run}/tokenized.h5 (see eagle3_cache.tokenized)."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from eagle3_cache.chat import ChatTokenizer, chat_template_hash, special_token_ids, tokenizer_hash
from eagle3_cache.data import iter_conversations, load_rows
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.logs import setup_logging
from eagle3_cache.tokenized import TokenizedHeader, TokenizedSample, read_tokenized_info, write_tokenized

PROGRESS_EVERY = 1000


def main(snakemake) -> None:
    logger = setup_logging(snakemake.log[0])
    params = snakemake.params
    tokenizer = AutoTokenizer.from_pretrained(
        params.target_model, revision=params.revision, trust_remote_code=params.trust_remote_code
    )
    config = AutoConfig.from_pretrained(
        params.target_model, revision=params.revision, trust_remote_code=params.trust_remote_code
    )
    chat = ChatTokenizer(
        tokenizer,
        params.seq_length,
        mask_reasoning_content=params.mask_reasoning_content,
        mask_generation_prompt=params.mask_generation_prompt,
    )
    header = TokenizedHeader(
        seq_length=params.seq_length,
        target_vocab_size=target_vocab_size(config, params.target_model),
        special_token_ids=special_token_ids(tokenizer),
        pad_token_id=chat.pad_token_id,
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer),
        source={"input_data": params.input_data, "split": params.split, "shuffle_seed": params.shuffle_seed},
        mask_reasoning_content=params.mask_reasoning_content,
        mask_generation_prompt=params.mask_generation_prompt,
    )
    rows = load_rows(params.input_data, params.split, params.shuffle_seed)
    logger.info("Tokenizing %d samples from %s at seq_length %d", len(rows), params.input_data, params.seq_length)
    samples = (chat(conversation) for conversation in iter_conversations(rows))
    try:
        write_tokenized(snakemake.output.tokenized, header, with_progress(samples, len(rows), logger), len(rows))
    except CacheConfigError as error:
        raise CacheConfigError(f"input_data {params.input_data!r}: {error}") from error
    log_summary(snakemake.output.tokenized, logger)


def target_vocab_size(config: PretrainedConfig, target_model: str) -> int:
    """The model's vocab size (the width of its logits), which can differ from len(tokenizer)."""
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is None:
        raise CacheConfigError(f"target_model {target_model!r}: its config has no vocab_size")
    return int(vocab_size)


def with_progress(samples: Iterable[TokenizedSample], total: int, logger: logging.Logger) -> Iterator[TokenizedSample]:
    for done, sample in enumerate(samples, start=1):
        if done % PROGRESS_EVERY == 0:
            logger.info("tokenized %d / %d samples", done, total)
        yield sample


def log_summary(path: str, logger: logging.Logger) -> None:
    info = read_tokenized_info(path)
    logger.info(
        "%d samples, %d truncated, %d supervised tokens, %d content tokens",
        info.num_samples,
        int(info.truncated.sum()),
        int(info.num_supervised.sum()),
        int(info.lengths.sum()),
    )
    unsupervised = int((info.num_supervised == 0).sum())
    if unsupervised:
        logger.warning("%d samples have no supervised token (kept, as Automodel does)", unsupervised)


main(snakemake)  # noqa: F821 (Snakemake's `script:` directive defines it)
