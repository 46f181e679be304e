import contextlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# Makes the rule scripts' package importable; appended so that it never shadows
# an installed module.
sys.path.append(str(Path(workflow.basedir, "workflow", "scripts")))

from eagle3_cache import CACHE_SEMANTICS_VERSION
from eagle3_cache.errors import CacheConfigError, error_line
from eagle3_cache.hub import check_run_sources
from eagle3_cache.layout import (
    DEMO_GGUF,
    DEMO_MODEL,
    DEMO_PACKAGE,
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    MANIFEST_SETTINGS,
    PARITY_SETTINGS,
    PLAN_SETTINGS,
    SELECT_VOCAB_SETTINGS,
    SHARD_DIR,
    SHARD_FILE,
    SHARD_ID,
    SHARD_SETTINGS,
    TARGET_SETTINGS,
    TOKENIZE_SETTINGS,
    VALIDATION_JSON,
    VALIDATION_REPORT,
    VERIFY_SETTINGS,
    VOCAB_MAPPING_FILE,
    applied_settings,
    is_local_data,
    num_shards,
    shard_id,
)
from eagle3_cache.preflight import check_device, check_run, ignored_settings_note

CACHE_DIR = "results/{run}/shards"
# Relative to this file, as snakemake.utils.validate reads it.
CONFIG_SCHEMA = "../schemas/config.schema.yaml"


@contextlib.contextmanager
def stopping_on_config_errors(prefix: str = "") -> Iterator[None]:
    """End Snakemake on a CacheConfigError with its message as the one line it prints, and no traceback."""
    try:
        yield
    except CacheConfigError as error:
        sys.exit(error_line(f"{prefix}{error}"))


def schema_violation(error: WorkflowError) -> str:
    """What the config's schema refused, as one line naming the key."""
    cause = error.__context__
    if not isinstance(cause, jsonschema.ValidationError):
        return str(error)
    key = ".".join(str(part) for part in cause.absolute_path) or "(top level)"
    notes = ["config/README.md explains every key"]
    if cause.validator == "additionalProperties":
        known = sorted(cause.schema.get("properties", {}))
        unknown = sorted(set(cause.instance) - set(known))
        problem = f"unknown key {', '.join(map(repr, unknown))}; the known keys are {', '.join(known)}"
    else:
        problem = cause.message
        if isinstance(cause.schema, dict) and cause.schema.get("description"):
            notes.insert(0, cause.schema["description"].rstrip("."))
    return f"config {key}: {problem} ({'; '.join(notes)})"


def check_config() -> None:
    """Validate the config against its schema (which fills in the defaults), then check every run before
    anything is planned: a bad setting stops Snakemake with one line naming it."""
    try:
        validate(config, CONFIG_SCHEMA)
    except WorkflowError as error:
        sys.exit(error_line(schema_violation(error)))
    for run, settings in config["runs"].items():
        with stopping_on_config_errors(f"runs.{run}: "):
            check_run(settings)
        note = ignored_settings_note(settings)
        if note:
            logger.warning(f"runs.{run}: {note}")


def runs_with_jobs() -> set[str]:
    """The runs that have a job to run (the `all` job has no run)."""
    return {job.wildcards.get("run") for job in workflow.dag.needrun_jobs()} - {None}


def check_before_local_jobs() -> None:
    """Before the first job of a local run: `device: cuda` needs a GPU here, and the hub ids of the runs
    with work must be reachable (or cached, offline). Not at DAG build, where the executor is not yet
    known: a cluster's login node may have no GPU, or another network, than the nodes its jobs run on;
    there each job checks as it starts."""
    if not workflow.local_exec:
        return
    with stopping_on_config_errors():
        check_device(config["device"])
    for run in sorted(runs_with_jobs()):
        with stopping_on_config_errors(f"runs.{run}: "):
            check_run_sources(run_settings(run))


check_config()


onstart:
    check_before_local_jobs()


def make_cache_dirs() -> None:
    """Create every run's cache directory, an input of the manifest rule (see manifest.smk).

    No rule makes it, and Snakemake looks for inputs before any job runs, so it is made when the
    workflow is loaded.
    """
    for run in config["runs"]:
        Path(CACHE_DIR.format(run=run)).mkdir(parents=True, exist_ok=True)


make_cache_dirs()


wildcard_constraints:
    run="|".join(re.escape(run) for run in config["runs"]),
    shard=SHARD_ID,


def run_settings(run: str) -> dict:
    """The settings of one run, defaults filled in by the config schema."""
    return config["runs"][run]


def applied_run_settings(run: str) -> dict:
    """The run's settings as loading its data applies them: None for what a local JSON file ignores, so
    that changing those reruns nothing that reads the data."""
    return applied_settings(run_settings(run))


def setting(name: str, settings: Callable[[str], dict] = run_settings):
    """A params function giving the run's value of `name` in `settings(run)`."""
    return lambda wildcards: settings(wildcards.run)[name]


def run_params(
    names: Sequence[str], settings: Callable[[str], dict] = run_settings
) -> dict:
    """A rule's params for the run settings `names`, as keyword arguments: `params: **run_params(...)`."""
    return {name: setting(name, settings) for name in names}


def data_input(wildcards) -> list[str]:
    """The local data file, so that editing it reruns tokenization (nothing for a hub id)."""
    input_data = run_settings(wildcards.run)["input_data"]
    return [input_data] if is_local_data(input_data) else []


def model_input(wildcards) -> list[str]:
    """The local model directory (nothing for a hub id); for the demo model this
    makes its conversion run first."""
    target_model = run_settings(wildcards.run)["target_model"]
    is_local = target_model == DEMO_MODEL or Path(target_model).is_dir()
    return [target_model] if is_local else []


def gpus_per_job(wildcards) -> int:
    """GPUs a target-model job holds: none when the config pins the CPU."""
    return 0 if config["device"] == "cpu" else config["gpus_per_job"]


def run_num_shards(run: str) -> int:
    """The run's number of shards, known once the tokenize checkpoint has run."""
    tokenized = checkpoints.tokenize.get(run=run).output.tokenized
    # Imported only now: the module pulls in torch, which a dry run before
    # tokenization should not pay for.
    from eagle3_cache.token_store import read_tokenized_info

    num_samples = read_tokenized_info(tokenized).num_samples
    return num_shards(num_samples, run_settings(run)["shard_size"])


def expand_shards(pattern: str, run: str) -> list[str]:
    """`pattern` (with a {shard} wildcard) for every shard of the run."""
    shards = [shard_id(index) for index in range(run_num_shards(run))]
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


def format_files(wildcards) -> list[str]:
    """An input function: the files the job's run's format keeps beside the shards."""
    return run_format_files(wildcards.run)


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
