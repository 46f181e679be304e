"""Rule `select_vocab`: tokenized.h5 -> vocab_selection.pt (draft vocabulary) + vocab_counts.npy."""

from eagle3_cache.logs import setup_logging
from eagle3_cache.token_store import read_tokenized_info
from eagle3_cache.vocab import (
    count_supervised_tokens,
    select_draft_vocab,
    write_vocab_counts,
    write_vocab_selection,
)


def main(snakemake) -> None:
    logger = setup_logging(snakemake.log[0])
    tokenized = snakemake.input.tokenized
    info = read_tokenized_info(tokenized)
    vocab_size = info.target_vocab_size
    counts = count_supervised_tokens(tokenized, vocab_size)
    selected = select_draft_vocab(counts, info.special_token_ids, snakemake.params.draft_vocab_size, vocab_size)
    write_vocab_counts(snakemake.output.counts, counts)
    write_vocab_selection(snakemake.output.selection, selected, vocab_size)
    total = int(counts.sum())
    covered = int(counts[selected.numpy()].sum())
    logger.info(
        "Draft vocabulary: %d of %d ids; they cover %d of %d supervised tokens (%.2f%%)",
        selected.numel(),
        vocab_size,
        covered,
        total,
        100 * covered / total if total else 0.0,
    )


main(snakemake)  # noqa: F821 (Snakemake's `script:` directive defines it)
