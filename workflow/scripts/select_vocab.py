"""Rule `select_vocab`: tokenized.h5 -> vocab_selection.pt (draft vocabulary) + vocab_counts.npy."""

from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.products import record_product
from eagle3_cache.vocab import build_vocab_selection

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])

with reported_errors(), logged_wall_split(log):
    vocab = build_vocab_selection(
        snakemake.input.tokenized,
        snakemake.params.draft_vocab_size,
        snakemake.output.selection,
        snakemake.output.counts,
    )
    for product in snakemake.output:
        record_product(product, snakemake.input)
    total = int(vocab.counts.sum())
    covered = int(vocab.counts[vocab.selected.numpy()].sum())
    log.info(
        "Draft vocabulary: %d of %d ids; they cover %d of %d supervised tokens (%.2f%%)",
        vocab.selected.numel(),
        vocab.target_vocab_size,
        covered,
        total,
        100 * covered / total if total else 0.0,
    )
