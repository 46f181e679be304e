"""Rule script: re-read one committed shard and record what it holds; a shard that fails is taken out of the cache."""

import importlib
import sys
from pathlib import Path

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.verification import take_out_of_cache

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
# The run's format decides what a shard is: a safetensors file (read with numpy: this job imports no
# torch) or a directory of sample files (read as SpecForge reads them, with torch).
VERIFY = {
    "automodel": ("eagle3_cache.verification", "verify_committed_shard"),
    "specforge": ("eagle3_cache.specforge_verification", "verify_committed_specforge_shard"),
}
module, function = VERIFY[snakemake.params.format]
verify = getattr(importlib.import_module(module), function)
if "torch" in sys.modules:
    # Snakemake budgets cores by `threads`, so that --cores N verifies N shards at once.
    sys.modules["torch"].set_num_threads(snakemake.threads)
shard = Path(snakemake.input.shard)

with reported_errors(), logged_wall_split(log):
    result = verify(
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
