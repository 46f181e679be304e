import re
import sys
from collections.abc import Sequence
from pathlib import Path

# Makes the rule scripts' package importable; appended so that it never shadows
# an installed module.
sys.path.append(str(Path(workflow.basedir, "workflow", "scripts")))

from eagle3_cache import CACHE_SEMANTICS_VERSION
from eagle3_cache.layout import (
    DEMO_GGUF,
    DEMO_MODEL,
    DEMO_PACKAGE,
    EMBEDDINGS_FILE,
    LOCAL_DATA_SUFFIXES,
    MANIFEST_FILE,
    MANIFEST_SETTINGS,
    PARITY_SETTINGS,
    SELECT_VOCAB_SETTINGS,
    SHARD_FILE,
    SHARD_ID,
    SHARD_SETTINGS,
    TARGET_SETTINGS,
    TOKENIZE_SETTINGS,
    VALIDATION_JSON,
    VALIDATION_REPORT,
    VERIFY_SETTINGS,
    num_shards,
    shard_id,
)

CACHE_DIR = "results/{run}/shards"


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


def setting(name: str):
    """A params function giving the run's value of `name`."""
    return lambda wildcards: run_settings(wildcards.run)[name]


def run_params(names: Sequence[str]) -> dict:
    """A rule's params for the run settings `names`, as keyword arguments: `params: **run_params(...)`."""
    return {name: setting(name) for name in names}


def is_local_data(input_data: str) -> bool:
    """Whether input_data names a local file or folder rather than a hub dataset."""
    path = Path(input_data)
    return path.exists() or path.suffix.lower() in LOCAL_DATA_SUFFIXES


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


def every_shard(pattern: str):
    """An input function giving `pattern` for every shard of the job's run."""
    return lambda wildcards: expand_shards(pattern, wildcards.run)


def every_run_shard(pattern: str):
    """An input function giving `pattern` for every shard of every run, so that a deleted one is rebuilt."""
    return lambda wildcards: [
        path for run in config["runs"] for path in expand_shards(pattern, run)
    ]


def parity_gpus(wildcards) -> int:
    """GPUs the live parity job holds: none when it recomputes no sample."""
    return gpus_per_job(wildcards) if config["validation"]["num_samples"] else 0
