"""What the Snakefile does before any job: check the config while it is read (the schema, then every run),
make the cache directories, and check the sources and the device before the first local job.

Torch-free, and free of Snakemake's workflow state (common.smk hands in the config and the runs), so
that every config case is a unit test.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import CacheConfigError
from .hub import check_run_sources
from .layout import PART_DIGITS, PRODUCTS, TOKENIZED_PART
from .preflight import check_device, check_run, ignored_settings_note
from .products import damage, set_aside, settle

CONFIG_README = "config/README.md"


def checked_config(config: dict[str, Any], schema: str | Path) -> list[str]:
    """Validate `config` against `schema`, filling in its defaults, then check every run before anything is
    planned. A bad setting raises a CacheConfigError naming it; the notes about ignored settings are
    returned, for the caller to print as warnings."""
    # Snakemake's own validator, for the defaults it fills in; imported here so that a config case's
    # unit test pays for it only when it runs.
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema))
    except WorkflowError as error:
        raise CacheConfigError(schema_violation(error.__context__) or str(error)) from error
    if violation := schema_violation(strict_type_error(config, schema)):
        raise CacheConfigError(violation)
    notes = []
    for run, settings in config["runs"].items():
        with named_run(run):
            check_run(settings)
        note = ignored_settings_note(settings)
        if note:
            notes.append(f"runs.{run}: {note}")
    return notes


def strict_type_error(config: Mapping[str, Any], schema: str | Path) -> jsonschema.ValidationError | None:
    """The schema's first type error once a float is no integer: JSON Schema takes 32.0 for one, which
    the code cannot use as a length or an index (YAML reads `32.0` as a float)."""
    loaded = yaml.safe_load(Path(schema).read_text())
    validator = jsonschema.validators.validator_for(loaded)
    integers = validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = jsonschema.validators.extend(validator, type_checker=integers)(loaded)
    return jsonschema.exceptions.best_match(strict.iter_errors(config))


def schema_violation(cause: BaseException | None) -> str | None:
    """What the config's schema refused, as one line naming the key; None for another cause."""
    if not isinstance(cause, jsonschema.ValidationError):
        return None
    key = ".".join(str(part) for part in cause.absolute_path) or "(top level)"
    notes = [f"{CONFIG_README} explains every key"]
    if cause.validator == "additionalProperties":
        known = sorted(cause.schema.get("properties", {}))
        unknown = sorted(set(cause.instance) - set(known))
        problem = f"unknown key {', '.join(map(repr, unknown))}; the known keys are {', '.join(known)}"
    elif cause.validator == "type" and isinstance(cause.instance, float) and cause.instance.is_integer():
        problem = f"{cause.instance} is a float; write it as an integer ({int(cause.instance)})"
    else:
        problem = cause.message
        if isinstance(cause.schema, dict) and cause.schema.get("description"):
            notes.insert(0, cause.schema["description"].rstrip("."))
    return f"config {key}: {problem} ({'; '.join(notes)})"


def make_cache_dirs(cache_dir: str, runs: Iterable[str]) -> None:
    """Create every run's cache directory (`cache_dir` with its {run} filled in), an input of the manifest
    rule (see manifest.smk). No rule makes it, and Snakemake looks for inputs before any job runs."""
    for run in runs:
        path = Path(cache_dir.format(run=run))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheConfigError(
                f"cannot create the cache directory {path} ({error.strerror}); make {path.parts[0]}/ a writable "
                "directory (or a link to one)"
            ) from error


def set_aside_damaged_products(runs: Iterable[str]) -> tuple[list[str], list[str]]:
    """Every run's products (layout.PRODUCTS) that differ from what their producer wrote, each moved aside
    so that it is rebuilt: their paths, and a note on each for the caller to print."""
    damaged, notes = [], []
    for product in run_products(runs):
        if problem := damage(product):
            damaged.append(product)
            notes.append(
                f"{product} is damaged ({problem}): moved aside to {set_aside(product).name}. This run rebuilds "
                "it alone, before any job reads it; then run the workflow again to go on (what was made from "
                "it is kept if it comes out identical)."
            )
    return damaged, notes


def run_products(runs: Iterable[str]) -> list[str]:
    """Every run's products (layout.PRODUCTS) and the tokenized parts it has."""
    products = [pattern.format(run=run) for run in runs for pattern in PRODUCTS]
    any_part = "[0-9]" * PART_DIGITS
    return products + [
        part for run in runs for part in sorted(glob.glob(TOKENIZED_PART.format(run=run, part=any_part)))
    ]


def settle_products(runs: Iterable[str]) -> None:
    """Once a run's jobs are over: every product its recorded mtime (see products.settle)."""
    settle(run_products(runs))


def check_before_local_jobs(config: Mapping[str, Any], jobs: Iterable[Any]) -> None:
    """Before the first job of a local run (`jobs`, Snakemake's jobs to run): `device: cuda` needs a GPU
    here, and the hub ids of the runs with work must be reachable (or cached, offline). Not at DAG build,
    where the executor is not yet known: a cluster's login node may have no GPU, or another network, than
    the nodes its jobs run on; there each job checks as it starts."""
    check_device(config["device"])
    for run in sorted({job.wildcards.get("run") for job in jobs} - {None}):
        with named_run(run):
            check_run_sources(config["runs"][run])


@contextlib.contextmanager
def named_run(run: str) -> Iterator[None]:
    """Around one run's checks: a CacheConfigError's message starts with `runs.<run>: `."""
    try:
        yield
    except CacheConfigError as error:
        raise CacheConfigError(f"runs.{run}: {error}") from error
