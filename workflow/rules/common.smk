import re
import sys
from collections.abc import Callable, Sequence
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
    PLAN_SETTINGS,
    SELECT_VOCAB_SETTINGS,
    SHARD_DIR,
    SHARD_FILE,
    SHARD_ID,
    SHARD_SETTINGS,
    TARGET_SETTINGS,
    TOKENIZE_SETTINGS,
    VOCAB_MAPPING_FILE,
    num_shards,
    shard_id,
)

CACHE_DIR = "results/{run}/shards"


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


def is_specforge(run: str) -> bool:
    """Whether the run writes SpecForge's format rather than Automodel's."""
    return run_settings(run)["format"] == "specforge"


def shard_rule(run: str):
    """The rule that computes the run's shards in its output format."""
    return rules.compute_specforge_shard if is_specforge(run) else rules.compute_shard


def every_shard(pick: Callable):
    """An input function: the pattern `pick(shard rule)` (with a {shard} wildcard) for every shard of
    the job's run, taken from the shard rule of the run's format."""
    return lambda wildcards: expand_shards(
        pick(shard_rule(wildcards.run)), wildcards.run
    )


def format_files(wildcards) -> list[str]:
    """What the run's format keeps beside the shards: Automodel's target embeddings, or SpecForge's
    vocabulary mapping."""
    if is_specforge(wildcards.run):
        return expand(rules.specforge_vocab_mapping.output.mapping, run=wildcards.run)
    return expand(rules.target_embeddings.output.embeddings, run=wildcards.run)


def every_run_shard(wildcards) -> list[str]:
    """Every shard of every run, so that a deleted shard is rebuilt."""
    return [
        path
        for run in config["runs"]
        for path in expand_shards(shard_rule(run).output.shard, run)
    ]
