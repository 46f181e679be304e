"""Rule `index_conversations`: the data -> results/{run}/tokenized/index.json (see eagle3_cache.data_parts)."""

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.data_parts import conversation_index
from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.products import record_product

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params

with reported_errors(), logged_wall_split(log):
    index = conversation_index(
        params.input_data, params.split, params.shuffle_seed, params.data_revision, params.tokenize_part_size
    )
    write_json_atomic(snakemake.output.index, index)
    record_product(snakemake.output.index, snakemake.input)
    log.info("%d samples in %d parts of up to %d", index["num_samples"], len(index["parts"]), index["part_size"])
