"""Rule script: the commit point. Check the run's shards form one cache, drop stale ones, write manifest.json."""

from pathlib import Path

from eagle3_cache.logs import setup_logging
from eagle3_cache.manifest import checked_manifest, commit_manifest, read_shard_stats
from eagle3_cache.token_store import read_tokenized_info
from eagle3_cache.vocab import read_vocab_selection

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.items())

selected, _ = read_vocab_selection(snakemake.input.selection)
manifest = checked_manifest(
    Path(snakemake.params.cache_dir),
    settings,
    read_shard_stats(snakemake.input.stats),
    selected.tolist(),
    read_tokenized_info(snakemake.input.tokenized),
)
commit_manifest(snakemake.output.manifest, manifest)
log.info(
    "cache complete: %d samples in %d shards, %.2f GB in %s",
    manifest["num_samples"],
    len(manifest["shards"]),
    sum(s["bytes"] for s in manifest["shards"]) / 1e9,
    snakemake.params.cache_dir,
)
