"""What the Snakefile runs before any job, called as common.smk calls it; the bad-input table
(test_bad_inputs.py) holds the refusals."""

from types import SimpleNamespace

import pytest
from huggingface_hub import constants

from eagle3_cache import startup
from eagle3_cache.errors import CacheConfigError
from helpers import CONFIG_SCHEMA, HUB_MODEL, RUN, new_workdir, run_config


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the tiny conversations, as the working directory."""
    workdir = new_workdir(tmp_path, {})
    monkeypatch.chdir(workdir)
    return workdir


def test_the_schema_fills_in_the_defaults(workdir, tiny_chat_target):
    config = run_config(tiny_chat_target)
    assert startup.checked_config(config, CONFIG_SCHEMA) == []
    assert config["gpus_per_job"] == 1 and config["runs"][RUN]["format"] == "automodel"
    assert config["runs"][RUN]["compute_dtype"] == "auto"


def test_a_split_the_data_ignores_is_a_note_naming_the_run(workdir, tiny_chat_target):
    config = run_config(tiny_chat_target, split="train[:3]")
    (note,) = startup.checked_config(config, CONFIG_SCHEMA)
    assert note.startswith(f"runs.{RUN}: split 'train[:3]' does not apply to the local JSON file")


def test_the_cache_directories_are_made_for_every_run(tmp_path):
    startup.make_cache_dirs(str(tmp_path / "results" / "{run}" / "shards"), ["a", "b"])
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == ["a", "b"]
    startup.make_cache_dirs(str(tmp_path / "results" / "{run}" / "shards"), ["a"])  # already there


def test_only_the_runs_with_jobs_have_their_sources_checked(workdir, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    config = run_config(HUB_MODEL)
    config["runs"]["idle"] = config["runs"][RUN]
    startup.checked_config(config, CONFIG_SCHEMA)
    the_all_job = SimpleNamespace(wildcards={})
    startup.check_before_local_jobs(config, [the_all_job])
    with pytest.raises(CacheConfigError, match=rf"^runs\.{RUN}: target_model '{HUB_MODEL}' is not in the Hugging"):
        startup.check_before_local_jobs(config, [the_all_job, SimpleNamespace(wildcards={"run": RUN})])
