"""Rule script: re-read one committed shard and record what it holds; a shard that fails is taken out of the cache."""

import sys
from pathlib import Path

import torch

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.specforge_verification import verify_committed_specforge_shard
from eagle3_cache.verification import take_out_of_cache, verify_committed_shard

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
# The run's format decides what a shard is: a safetensors file or a directory of sample files.
VERIFY = {"automodel": verify_committed_shard, "specforge": verify_committed_specforge_shard}
# Snakemake budgets cores by `threads`, so that --cores N verifies N shards at once.
torch.set_num_threads(snakemake.threads)
shard = Path(snakemake.input.shard)

with reported_errors(), logged_wall_split(log):
    result = VERIFY[snakemake.params.format](
        shard,
        stats_path=Path(snakemake.input.stats),
        selection_path=Path(snakemake.input.selection),
        tokenized_path=Path(snakemake.input.tokenized),
        settings=dict(snakemake.params.items()),
    )
    if result.failures:
        sys.exit(take_out_of_cache(shard, result.failures))
    write_json_atomic(snakemake.output.verified, result.to_json())
    log.info("%s: verified, %.1f MB in %.2fs, digest %s", shard.name, result.bytes / 1e6, result.seconds, result.digest)
