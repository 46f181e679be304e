"""Rule `tokenize_part`: one part of the conversations -> results/{run}/tokenized/part-NNNNNN.h5, a tokenized
store of its rows (see eagle3_cache.token_store)."""

from eagle3_cache.data import checked, load_rows
from eagle3_cache.data_parts import read_parts
from eagle3_cache.errors import reported_errors
from eagle3_cache.layout import DATA_SETTINGS, INPUT_DIGESTS
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.products import record_product

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
# The input digests only make Snakemake rerun this job when the data or tokenizer files change.
params = {name: value for name, value in snakemake.params.items() if name not in INPUT_DIGESTS}

with reported_errors(), logged_wall_split(log):
    part = read_parts(snakemake.input.index)[int(snakemake.wildcards.part)]
    source = {name: params[name] for name in DATA_SETTINGS}
    rows = checked(load_rows(**source, part=part), params["input_data"])
    # Imported once the data is known good: transformers and torch take seconds to import.
    from eagle3_cache.tokenization import tokenize_dataset

    tokenize_dataset(
        snakemake.output.part,
        rows=rows,
        run_settings=snakemake.config["runs"][snakemake.wildcards.run],
        **params,
    )
    record_product(snakemake.output.part, snakemake.input)
