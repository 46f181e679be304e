import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from snakemake.logging import logger

# The rule scripts' package, appended so that it never shadows an installed module.
sys.path.append(str(Path(workflow.basedir, "workflow", "scripts")))

from eagle3_cache import (
    CACHE_SEMANTICS_VERSION,
    data_parts,
    failures,
    input_digest,
    layout,
    startup,
)
from eagle3_cache.errors import stopping_on_config_errors

# The schema fills in the defaults, then every run is checked before anything is planned.
with stopping_on_config_errors():
    for note in startup.checked_config(
        config, Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
    ):
        logger.warning(note)
    startup.make_cache_dirs(layout.CACHE_DIR, config["runs"])
# A product damaged since it was written (products.py) is set aside before Snakemake looks at it, and
# this run rebuilds it alone (the Snakefile makes it the default target): had the shards that read it
# run now, Snakemake would first have deleted them. Not in a cluster job, which re-reads this file
# while other jobs run.
REBUILD_FIRST, damage_notes = (
    ([], [])
    if workflow.remote_exec
    else startup.set_aside_damaged_products(config["runs"])
)
for note in damage_notes:
    logger.warning(note)


onstart:
    if workflow.local_exec:
        with stopping_on_config_errors():
            startup.check_before_local_jobs(config, workflow.dag.needrun_jobs())


# Snakemake touches every output after its job; a product rebuilt identical gets its mtime back.
onsuccess:
    startup.settle_products(config["runs"])
    if REBUILD_FIRST:
        logger.warning(
            f"Rebuilt {', '.join(REBUILD_FIRST)} (found damaged). Run the workflow again to go on."
        )


# Each failed job's one-line error again, below Snakemake's job tables where the eye lands.
onerror:
    startup.settle_products(config["runs"])
    for line in failures.failure_lines(log):
        logger.error(line)


wildcard_constraints:
    run="|".join(re.escape(run) for run in config["runs"]),
    shard=layout.SHARD_ID,
    part=layout.PART_ID,


def run_settings(run: str) -> dict:
    """The settings of one run, defaults filled in by the config schema."""
    return config["runs"][run]


def applied_run_settings(run: str) -> dict:
    """The run's settings as loading its data applies them: None for what a local JSON file ignores, so
    that changing those reruns nothing that reads the data."""
    return layout.applied_settings(run_settings(run))


def run_params(
    names: Sequence[str], settings: Callable[[str], dict] = run_settings
) -> dict:
    """A rule's params for the run settings `names` (each read from `settings(run)`), as keyword arguments:
    `params: **run_params(...)`."""
    return {
        name: lambda wildcards, name=name: settings(wildcards.run)[name]
        for name in names
    }


def data_input(wildcards) -> list[str]:
    """The local data file or folder (nothing for a hub id): it must exist, and a file added to the
    folder or removed from it reruns tokenization."""
    input_data = run_settings(wildcards.run)["input_data"]
    return [input_data] if layout.is_local_data(input_data) else []


def model_input(wildcards) -> list[str]:
    """The demo model's folder, so that its conversion runs first. A local model folder is tracked by its
    content instead (the digests below), which its timestamp does not follow."""
    target_model = run_settings(wildcards.run)["target_model"]
    return [target_model] if target_model == layout.DEMO_MODEL else []


# Files' sha256 beside their size, mtime and inode: only files that changed are read again.
INPUT_HASHES = input_digest.FileHashes()


def data_sha256(wildcards) -> str | None:
    """The local data's content digest: a file rewritten in place reruns tokenization."""
    input_data = run_settings(wildcards.run)["input_data"]
    if not layout.is_local_data(input_data):
        return None
    return input_digest.data_sha256(input_data, INPUT_HASHES)


def model_files_sha256(wildcards) -> str | None:
    """The digest of what tokenization reads from a local model folder (all but the weights)."""
    model_dir = input_digest.users_model_dir(
        run_settings(wildcards.run)["target_model"]
    )
    return model_dir and input_digest.model_files_sha256(model_dir, INPUT_HASHES)


def target_weights_sha256(wildcards) -> str | None:
    """The digest of a local model folder's weights: rewritten in place, they rerun what the target
    computes and nothing before it."""
    target_model = run_settings(wildcards.run)["target_model"]
    return input_digest.target_weights_sha256(target_model, INPUT_HASHES)


def gpus_per_job(wildcards) -> int:
    """GPUs a target-model job holds: none when the config pins the CPU."""
    return 0 if config["device"] == "cpu" else config["gpus_per_job"]


def run_index(run: str) -> dict:
    """The run's tokenization index, known once its checkpoint has run."""
    return data_parts.read_index(
        checkpoints.index_conversations.get(run=run).output.index
    )


def every_part(wildcards) -> list[str]:
    """Every tokenized part of the job's run."""
    parts = range(len(run_index(wildcards.run)["parts"]))
    return expand(
        layout.TOKENIZED_PART, run=wildcards.run, part=map(layout.part_id, parts)
    )


def run_num_shards(run: str) -> int:
    """The run's number of shards."""
    num_samples = run_index(run)["num_samples"]
    return layout.num_shards(num_samples, run_settings(run)["shard_size"])


def expand_shards(pattern: str, run: str) -> list[str]:
    """`pattern` (with a {shard} wildcard) for every shard of the run."""
    shards = [layout.shard_id(index) for index in range(run_num_shards(run))]
    return expand(pattern, run=run, shard=shards)


def is_specforge(run: str) -> bool:
    """Whether the run writes SpecForge's format rather than Automodel's."""
    return run_settings(run)["format"] == "specforge"


def shard_rule(run: str):
    """The rule that computes the run's shards in its output format."""
    return rules.compute_specforge_shard if is_specforge(run) else rules.compute_shard


def picked_pattern(pick: Callable | str, run: str) -> str:
    """`pick` itself, or `pick(shard rule)` for the shard rule of the run's format."""
    return pick if isinstance(pick, str) else pick(shard_rule(run))


def every_shard(pick: Callable | str):
    """An input function: a pattern with a {shard} wildcard for every shard of the job's run. `pick` is
    the pattern, or a function giving it from the shard rule of the run's format."""
    return lambda wildcards: expand_shards(
        picked_pattern(pick, wildcards.run), wildcards.run
    )


def this_shard(pick: Callable):
    """An input function: the file `pick(shard rule)` names for the job's shard, in the run's format."""
    return lambda wildcards: pick(shard_rule(wildcards.run)).format(
        run=wildcards.run, shard=wildcards.shard
    )


def run_format_files(run: str) -> list[str]:
    """What the run's format keeps beside the shards: Automodel's target embeddings, or SpecForge's
    vocabulary mapping."""
    if is_specforge(run):
        return expand(rules.specforge_vocab_mapping.output.mapping, run=run)
    return expand(rules.target_embeddings.output.embeddings, run=run)


def every_run_format_files(wildcards) -> list[str]:
    """The files every run's format keeps beside its shards."""
    return [path for run in config["runs"] for path in run_format_files(run)]


def every_run_shard(pick: Callable | str):
    """An input function: `pick` (as for `every_shard`) for every shard of every run, so that a deleted one
    is rebuilt."""
    return lambda wildcards: [
        path
        for run in config["runs"]
        for path in expand_shards(picked_pattern(pick, run), run)
    ]


def parity_gpus(wildcards) -> int:
    """GPUs the live parity job holds: none when it recomputes no sample."""
    return gpus_per_job(wildcards) if config["validation"]["num_samples"] else 0
