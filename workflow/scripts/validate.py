"""Rule script: validate a run's finished cache and write its report (see eagle3_cache.validation).

With `validation.strict` (the default) a failed check fails the job; the report is then kept as
`validation_report.FAILED.html` beside the declared output, and the error names it.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from eagle3_cache.errors import CacheConfigError, reported_errors
from eagle3_cache.gpu_lease import lease_gpus
from eagle3_cache.logs import setup_logging
from eagle3_cache.specforge_cache import manifest_format
from eagle3_cache.specforge_validation import specforge_checks
from eagle3_cache.target import load_target, resolve_device
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
config = snakemake.config
run = snakemake.wildcards.run
# The parity check runs the target; on the CPU torch would otherwise take every core, not the job's.
torch.set_num_threads(snakemake.threads)


@contextlib.contextmanager
def leased_target() -> Iterator[nn.Module]:
    """The target on the GPUs this job leases (or the CPU), held only while the parity check runs."""
    with lease_gpus(config["gpus_per_job"], device=config["device"]) as gpus:
        yield load_target(
            params.target_model,
            revision=params.revision,
            trust_remote_code=params.trust_remote_code,
            device=resolve_device(config["device"]),
            num_gpus=max(1, len(gpus)),
        )


with reported_errors():
    inputs = ValidationInputs(
        run=run,
        cache_dir=Path(params.cache_dir),
        tokenized=Path(snakemake.input.tokenized),
        selection=Path(snakemake.input.selection),
        counts=Path(snakemake.input.counts),
        stats=[Path(p) for p in snakemake.input.stats],
        benchmarks=[Path(p) for p in params.benchmarks],
        num_samples=params.num_samples,
        seed=params.seed,
        plan=Path(snakemake.input.plan),
    )
    format_checks = specforge_checks if manifest_format(inputs.cache_dir) == "specforge" else automodel_checks
    report = validate_cache(inputs, leased_target, format_checks)
    kept = write_report(report, Path(snakemake.output.report), Path(snakemake.output.json), strict=params.strict)
    if kept is not None:
        raise CacheConfigError(failure_message(report, kept))
    log.info("validation of %s: %s in %.1fs", run, "PASS" if report.passed else "FAIL (not strict)", report.seconds)
