"""Rule `tokenize`: the tokenized parts -> results/{run}/tokenized.h5, one store reading them in order."""

from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.products import inputs_identity, record_product
from eagle3_cache.supervision import join_tokenized_parts

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])

with reported_errors(), logged_wall_split(log):
    join_tokenized_parts(snakemake.output.tokenized, snakemake.input.parts)
    # HDF5 stamps a virtual dataset with its creation time: the store's identity is its parts'.
    record_product(snakemake.output.tokenized, snakemake.input.parts, inputs_identity(snakemake.input.parts))
