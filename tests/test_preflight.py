"""What is checked before any work: names of models and data, a model directory's settings, the device,
the hub, and how a job reports a user's error."""

from __future__ import annotations

import errno
import json
import logging
import time

import pytest
from huggingface_hub import constants
from safetensors import SafetensorError

from eagle3_cache.errors import CacheConfigError, reported_errors
from eagle3_cache.hub import check_hub_access, hub_reachable, loading
from eagle3_cache.layout import applied_settings, is_hub_id, is_local_data, names_local_path
from eagle3_cache.logs import setup_logging
from eagle3_cache.preflight import check_device, check_model_config, check_run, cuda_device_count
from eagle3_cache.provenance import SHARD_SETTING_KEYS, settings_fingerprint
from helpers import run_config

UNREACHABLE_HUB = "http://127.0.0.1:9"


def run_settings(**overrides) -> dict:
    """A run's settings with the schema's defaults."""
    defaults = dict(
        revision=None, data_revision=None, split=None, shuffle_seed=42, aux_layer_ids=None, draft_vocab_size=None
    )
    return {**defaults, **run_config("org/model")["runs"]["tiny"], **overrides}


# --- Names -------------------------------------------------------------------------------------


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("gpt2")
    assert not is_hub_id("./model") and not is_hub_id("/models/x") and not is_hub_id("a/b/c")
    assert not names_local_path("meta-llama/Llama-3.1-8B")
    # The first folder exists here: a mistyped local path, not a hub id.
    assert names_local_path("models/llama")
    assert is_local_data("org/chats.jsonl") and not is_local_data("org/chats")


def test_a_json_file_applies_no_split_or_seed_and_a_parquet_file_does():
    json_run = {"input_data": "data/chats.jsonl", "split": "train[:3]", "shuffle_seed": 7}
    assert applied_settings(json_run) == {**json_run, "split": None, "shuffle_seed": None}
    parquet_run = {**json_run, "input_data": "data/chats.parquet"}
    assert applied_settings(parquet_run) == parquet_run


def test_split_and_shuffle_seed_do_not_shape_the_shards():
    shard_settings = dict.fromkeys(SHARD_SETTING_KEYS, "any")
    fingerprints = {
        settings_fingerprint({**shard_settings, "split": split, "shuffle_seed": seed})
        for split, seed in [(None, 42), ("train[:3]", 7)]
    }
    assert len(fingerprints) == 1


# --- A model's settings --------------------------------------------------------------------------


def test_aux_layers_and_draft_vocabulary_are_checked_against_the_text_config():
    config = {"num_hidden_layers": 32, "vocab_size": 1000, "text_config": {"num_hidden_layers": 8, "vocab_size": 500}}
    check_model_config(config, run_settings(aux_layer_ids=[1, 3, 7], draft_vocab_size=500))
    with pytest.raises(CacheConfigError, match=r"\[0, 7\] for this 8-layer target; got \[1, 3, 9\]"):
        check_model_config(config, run_settings(aux_layer_ids=[1, 3, 9]))
    with pytest.raises(CacheConfigError, match="draft_vocab_size 501 is larger than the target's vocabulary of 500"):
        check_model_config(config, run_settings(draft_vocab_size=501))


def test_what_a_config_does_not_state_is_left_to_the_shard_job():
    check_model_config({}, run_settings(aux_layer_ids=[1, 2, 999], draft_vocab_size=10**9))


def test_a_hub_target_is_not_checked_while_planning(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("{}\n")
    check_run(run_settings(target_model="org/model", input_data=str(data)))


# --- The device ----------------------------------------------------------------------------------


def test_cuda_needs_a_visible_device_and_is_asked_only_for_cuda():
    with pytest.raises(CacheConfigError, match="device is 'cuda' but no CUDA device is visible"):
        check_device("cuda", lambda: 0)
    check_device("cuda", lambda: 1)
    check_device("cuda", lambda: None)  # unknown (ROCm): left to torch in the job
    check_device("auto", lambda: pytest.fail("asked for auto"))


def test_the_driver_is_asked_without_torch():
    assert cuda_device_count() is None or cuda_device_count() >= 0


# --- The hub -------------------------------------------------------------------------------------


def test_an_unreachable_hub_is_refused_in_seconds(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)
    started = time.monotonic()
    assert not hub_reachable(UNREACHABLE_HUB)
    with pytest.raises(CacheConfigError, match=r"could not reach the Hugging Face hub .* HF_HUB_OFFLINE=1"):
        check_hub_access("target_model", "org/model")
    with pytest.raises(CacheConfigError, match="hf download org/chats --repo-type dataset"):
        check_hub_access("input_data", "org/chats", repo_type="dataset")
    assert time.monotonic() - started < 5


def test_offline_a_model_must_be_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CacheConfigError, match="'org/model' is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        check_hub_access("target_model", "org/model")
    check_hub_access("target_model", str(tmp_path))  # a local path: nothing to fetch


@pytest.mark.parametrize(
    "failure",
    [OSError("no weights found\nmore details"), RuntimeError("no weights found"), SafetensorError("no weights found")],
    ids=["missing", "damaged-pickle", "damaged-safetensors"],
)
def test_load_errors_name_the_setting(tmp_path, failure):
    with pytest.raises(CacheConfigError, match=r"could not be loaded \(\w+: no weights found\); check that its files"):
        with loading("target_model", str(tmp_path)):
            raise failure


# --- Reporting -----------------------------------------------------------------------------------


def test_a_job_reports_a_user_error_in_one_line_and_keeps_the_traceback_in_its_log(tmp_path, capsys):
    log_path = tmp_path / "job.log"
    setup_logging(str(log_path))
    with pytest.raises(SystemExit) as stopped, reported_errors():
        raise CacheConfigError("input_data 'x.jsonl', line 3:\n  bad row")
    assert stopped.value.code == "Error: input_data 'x.jsonl', line 3: bad row"
    assert "Traceback" not in capsys.readouterr().err
    assert "Traceback" in log_path.read_text()
    logging.getLogger().handlers.clear()


def test_a_disk_that_fills_mid_job_is_one_line_naming_the_filesystem_and_its_free_space(tmp_path, monkeypatch):
    """As the shard writer's thread raises it: an unnamed ENOSPC, handed on as the cause of another error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    log_path = tmp_path / "job.log"
    setup_logging(str(log_path))
    with pytest.raises(SystemExit) as stopped, reported_errors():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as full:
            raise RuntimeError("writer failed") from full
    line = stopped.value.code
    assert line.startswith(
        "Error: No space left on device while writing this job's outputs: the filesystem mounted at /"
    )
    assert " free. Nothing this job wrote was committed" in line and "\n" not in line
    assert "Traceback" in log_path.read_text()
    logging.getLogger().handlers.clear()


def test_a_file_the_job_may_not_open_is_one_line():
    with pytest.raises(SystemExit) as stopped, reported_errors():
        raise OSError(errno.EROFS, "Read-only file system", "results/tiny/plan.json.tmp")
    assert stopped.value.code == (
        "Error: cannot open results/tiny/plan.json.tmp (Read-only file system); make it readable, and results/ "
        "writable, for the user that runs the workflow"
    )


def test_other_failures_keep_their_traceback():
    with pytest.raises(OSError), reported_errors():
        raise OSError(errno.EIO, "Input/output error", "results/x")


def test_a_config_json_that_is_not_json_is_named(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{")
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer.json").write_text(json.dumps({}))
    with pytest.raises(CacheConfigError, match="config.json: not valid JSON"):
        check_run(run_settings(target_model=str(model)))
