"""Rule script: validate a run's finished cache and write its report (see eagle3_cache.validation).

It reads what the other jobs recorded, never a shard, and holds no GPU. With `validation.strict`
(the default) a failed check fails the job and retires the manifest, so trainers refuse the cache;
the report is then kept as `validation_report.FAILED.html` beside the declared output, and the
error names it.
"""

from pathlib import Path

from eagle3_cache.errors import CacheConfigError, reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.manifest import retire_commit
from eagle3_cache.specforge_cache import manifest_format
from eagle3_cache.specforge_validation import specforge_checks
from eagle3_cache.validation import (
    ValidationInputs,
    automodel_checks,
    failure_message,
    validate_cache,
    write_report,
)

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params
run = snakemake.wildcards.run

with reported_errors(), logged_wall_split(log):
    inputs = ValidationInputs(
        run=run,
        cache_dir=Path(params.cache_dir),
        tokenized=Path(snakemake.input.tokenized),
        selection=Path(snakemake.input.selection),
        counts=Path(snakemake.input.counts),
        stats=[Path(p) for p in snakemake.input.stats],
        verified=[Path(p) for p in snakemake.input.verified],
        parity=Path(snakemake.input.parity),
        benchmarks=[Path(p) for p in params.benchmarks],
        plan=Path(snakemake.input.plan),
    )
    format_checks = specforge_checks if manifest_format(inputs.cache_dir) == "specforge" else automodel_checks
    report = validate_cache(inputs, format_checks)
    kept = write_report(report, Path(snakemake.output.report), Path(snakemake.output.json), strict=params.strict)
    if kept is not None:
        retire_commit(inputs.cache_dir, f"validation failed: {', '.join(report.failed_titles)}")
        raise CacheConfigError(failure_message(report, kept))
    log.info("validation of %s: %s in %.1fs", run, "PASS" if report.passed else "FAIL (not strict)", report.seconds)
