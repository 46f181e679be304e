"""Rule script: store the target's input embeddings beside the shards (the draft seeds from them)."""

from pathlib import Path

from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.manifest import retire_commit
from eagle3_cache.shard_format import write_target_embeddings
from eagle3_cache.target import input_embeddings

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params

with reported_errors(), logged_wall_split(log):
    retire_commit(Path(snakemake.output.embeddings).parent, "the target embeddings are being written")
    weight = input_embeddings(params.target_model, revision=params.revision, trust_remote_code=params.trust_remote_code)
    write_target_embeddings(snakemake.output.embeddings, weight)
    log.info("wrote %s: %s fp32", snakemake.output.embeddings, tuple(weight.shape))
