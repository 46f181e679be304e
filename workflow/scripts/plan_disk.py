"""Rule script: the disk plan (see eagle3_cache.disk_plan); refuses to start the shards when the cache would not fit."""

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.disk_plan import plan_cache, plan_lines, refusal, target_hidden_size
from eagle3_cache.errors import CacheConfigError, reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.products import record_product

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params

with reported_errors(), logged_wall_split(log):
    hidden_size = target_hidden_size(params.target_model, params.revision, params.trust_remote_code)
    run, settings = snakemake.wildcards.run, dict(params.items())
    # The check's keys are not params: changing the margin must not rerun the plan, and with it every shard.
    plan = plan_cache(run, snakemake.input.tokenized, params.cache_dir, settings, snakemake.config["plan"], hidden_size)
    for line in plan_lines(plan):
        log.info("%s", line)
    if message := refusal(plan):
        raise CacheConfigError(message)
    if not plan["fits"]:
        log.warning("the cache does not fit, but plan.check_free_space is false: starting anyway")
    write_json_atomic(snakemake.output.plan, plan)
    # The plan holds back the jobs that write into the cache and shapes none of their bytes: one rebuilt
    # over the same inputs (free space aside) keeps its first mtime, and the shards made after it stay.
    record_product(snakemake.output.plan, snakemake.input, identity="passed")
