"""Rule script: the commit point. Check the run's shards form one cache, drop stale ones, write manifest.json."""

from pathlib import Path

from eagle3_cache.errors import CacheConfigError, reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.manifest import checked_manifest, commit_manifest, read_shard_stats
from eagle3_cache.shard_stat import unverified_shards
from eagle3_cache.specforge_cache import remove_specforge_files, specforge_manifest
from eagle3_cache.token_store import read_tokenized_info
from eagle3_cache.vocab_selection import read_vocab_selection

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.items())

with reported_errors(), logged_wall_split(log):
    cache_dir = Path(snakemake.params.cache_dir)
    unverified = unverified_shards(cache_dir, [Path(p) for p in snakemake.input.verified])
    if unverified:
        raise CacheConfigError(
            f"{cache_dir}: {', '.join(unverified)} changed on disk since verified (other bytes than the "
            "verification read), so the cache was not committed and their verification records were removed; "
            "run the workflow again to verify them again (a shard that fails is rebuilt)."
        )
    selected, _ = read_vocab_selection(snakemake.input.selection)
    stats = read_shard_stats(snakemake.input.stats)
    info = read_tokenized_info(snakemake.input.tokenized)
    manifest = checked_manifest(cache_dir, settings, stats, selected.tolist(), info)
    if settings["format"] == "specforge":
        manifest = specforge_manifest(cache_dir, stats, manifest)
    else:
        remove_specforge_files(cache_dir)
    commit_manifest(snakemake.output.manifest, manifest)
    log.info(
        "cache complete: %d samples in %d shards, %.2f GB in %s",
        manifest["num_samples"],
        len(manifest["shards"]),
        sum(s["bytes"] for s in manifest["shards"]) / 1e9,
        snakemake.params.cache_dir,
    )
