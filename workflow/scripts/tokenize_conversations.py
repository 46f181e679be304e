"""Rule `tokenize`: conversations -> results/{run}/tokenized.h5 (see eagle3_cache.token_store)."""

from eagle3_cache.logs import setup_logging
from eagle3_cache.tokenization import tokenize_dataset

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
setup_logging(snakemake.log[0])
tokenize_dataset(snakemake.output.tokenized, **dict(snakemake.params.items()))
