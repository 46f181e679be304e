"""Reaching the Hugging Face hub: a hub id that cannot be fetched fails in seconds, saying what to do.

Left alone, huggingface_hub retries a dead connection for most of a minute and then raises a bare
OSError. A local run checks before its first job starts (startup.check_before_local_jobs), and every job that
loads a hub model or dataset checks again as it starts; the DAG build does not, because a cluster's
login node and its compute nodes often reach different networks.
"""

from __future__ import annotations

import contextlib
import pickle
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from safetensors import SafetensorError

from .errors import CacheConfigError, disk_full
from .layout import MODEL_CONFIG_FILE, names_local_path

# Long enough for a slow proxy, short against huggingface_hub's retries.
HUB_TIMEOUT_S = 5.0


def check_hub_access(setting: str, name: str, *, revision: str | None = None, repo_type: str = "model") -> None:
    """Refuse a hub id that cannot be fetched: the hub unreachable, or HF_HUB_OFFLINE set and a model not
    cached. Returns at once for a local path."""
    if names_local_path(name):
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if repo_type == "model" and not is_cached_model(name, revision):
            raise CacheConfigError(
                f"{setting} {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                f"is set: download it first ({download_command(name, repo_type)}) and point {setting} at that "
                "directory, or unset HF_HUB_OFFLINE"
            )
        return
    if not hub_reachable(constants.ENDPOINT):
        raise CacheConfigError(
            f"could not reach the Hugging Face hub ({constants.ENDPOINT}) for {setting} {name!r}: download it first "
            f"({download_command(name, repo_type)}) and point {setting} at that directory, or set HF_HUB_OFFLINE=1 "
            "to use the Hugging Face cache"
        )


def check_run_sources(settings: Mapping[str, Any]) -> None:
    """The run's target_model and input_data, where they are hub ids, can be fetched."""
    check_hub_access("target_model", settings["target_model"], revision=settings["revision"])
    check_hub_access("input_data", settings["input_data"], revision=settings["data_revision"], repo_type="dataset")


def download_command(name: str, repo_type: str) -> str:
    """The `hf download` command line that fetches `name` into a local directory."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f"hf download {name}{kind} --local-dir <dir>"


def is_cached_model(name: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds this model revision's config (so loading it offline can work)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, MODEL_CONFIG_FILE, revision=revision), str)


def hub_reachable(endpoint: str) -> bool:
    """Whether `endpoint` answers an HTTP request within HUB_TIMEOUT_S (proxy variables apply)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True  # an answer, if an unwelcome one
    except urllib.error.URLError as error:
        # A certificate the system does not trust still means the host answered; huggingface_hub has its own.
        return isinstance(error.reason, ssl.SSLError)
    except OSError:  # a timeout or a reset connection
        return False
    return True


# What transformers raises for files it cannot use: missing or unreachable (OSError), not a checkpoint it
# knows (ValueError), weights that cannot be read (a damaged pickle or safetensors file, a tensor of
# another shape: RuntimeError).
UNLOADABLE = (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError)


@contextlib.contextmanager
def loading(setting: str, name: str, *, revision: str | None = None) -> Iterator[None]:
    """Around loading `name` with transformers: refused at once when it cannot be fetched, and a failure of
    the load (no such repo, a gated one, a missing file, a damaged one) as a CacheConfigError naming it."""
    check_hub_access(setting, name, revision=revision)
    try:
        yield
    except UNLOADABLE as error:
        if disk_full(error):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CacheConfigError(
            f"{setting} {name!r} could not be loaded ({type(error).__name__}: {first_line}); check that its "
            "files are whole, or download it again"
        ) from error
