"""Rule script: a few samples recomputed by the live target, compared with the cache (see eagle3_cache.live_parity)."""

from pathlib import Path

import torch

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.errors import reported_errors
from eagle3_cache.live_parity import ParityInputs, compared_samples, run_parity_job
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.results import json_safe
from eagle3_cache.specforge_parity import compared_specforge_samples

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params
# The run's format decides what a stored sample is compared with.
COMPARE = {"automodel": compared_samples, "specforge": compared_specforge_samples}
# On the CPU torch would otherwise take every core, not the job's.
torch.set_num_threads(snakemake.threads)

with reported_errors(), logged_wall_split(log):
    inputs = ParityInputs(
        cache_dir=Path(params.cache_dir),
        tokenized=Path(snakemake.input.tokenized),
        selection=Path(snakemake.input.selection),
        stats=[Path(p) for p in snakemake.input.stats],
        settings=dict(params.items()),
        num_samples=params.num_samples,
        seed=params.seed,
    )
    result = run_parity_job(
        inputs,
        device=snakemake.config["device"],
        gpus_per_job=snakemake.config["gpus_per_job"],
        compare=COMPARE[params.format],
    )
    write_json_atomic(snakemake.output.parity, json_safe(result.to_json()))
    log.info("live parity: %s: %s", "PASS" if result.passed else "FAIL", result.summary)
