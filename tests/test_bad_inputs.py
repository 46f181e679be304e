"""Bad inputs: each stops the run with one actionable line, the first error line it prints, and leaves what
was already built as it was.

Every case is checked at the lowest level where it fails, in the order Snakemake runs those levels: the
config's checks while the Snakefile is read (`startup.checked_config`), the checks before the first
local job (`startup.check_before_local_jobs`), then the tokenize job's script on the run's data. A few
cases, one per level, also run through the `snakemake` command line from a copy of the session's
finished run (conftest's `completed`), to prove the one-line path end to end: the first error line,
no traceback on the terminal, and the cache's files hashed as before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import constants

from eagle3_cache import startup
from eagle3_cache.errors import CacheConfigError, error_line
from eagle3_cache.layout import CACHE_DIR
from helpers import (
    CONFIG_SCHEMA,
    HUB_MODEL,
    RUN,
    cache_dir,
    digest,
    jobs_run,
    new_workdir,
    run_config,
    run_tokenize_jobs,
    snakemake,
    write_config,
)

# The first line of an error, ours ("Error: ...") or Snakemake's ("RuleException:", "Error in rule ...").
ERROR_LINE = re.compile(r"^(Error\b|Traceback|\w*(Error|Exception)\b)")
DATA = Path("data") / "conversations.jsonl"
# No case may reach the network: the hub is an address nothing listens on.
UNREACHABLE_HUB = "http://127.0.0.1:9"


@dataclass(frozen=True)
class Case:
    """One bad input: what to change, and the message (a regex) the first error line must match."""

    id: str
    message: str
    run: dict = field(default_factory=dict)  # run settings to set; None removes one
    config: dict = field(default_factory=dict)  # top-level config keys to set
    prepare: Callable[[Path, Path], dict] | None = None  # (workdir, target) -> more run settings
    offline: bool = False  # HF_HUB_OFFLINE set
    args: tuple[str, ...] = ()
    fails: bool = True  # False: the run succeeds, and `message` is a warning it prints


def data_line(number: int, text: str | bytes) -> Callable[[Path, Path], dict]:
    """A `prepare` that replaces line `number` (1-based) of the run's conversations."""

    def prepare(workdir: Path, target: Path) -> dict:
        path = workdir / DATA
        lines = path.read_bytes().split(b"\n")
        lines[number - 1] = text if isinstance(text, bytes) else text.encode()
        path.write_bytes(b"\n".join(lines))
        return {}

    return prepare


def data_file(name: str, content: str) -> Callable[[Path, Path], dict]:
    """A `prepare` that makes the run read `data/<name>`, holding `content`."""

    def prepare(workdir: Path, target: Path) -> dict:
        (workdir / "data" / name).write_text(content)
        return {"input_data": f"data/{name}"}

    return prepare


def model_copy(edit: Callable[[Path], None]) -> Callable[[Path, Path], dict]:
    """A `prepare` that points the run at an edited copy of the target model."""

    def prepare(workdir: Path, target: Path) -> dict:
        copy = Path(shutil.copytree(target, workdir / "models" / "target"))
        edit(copy)
        return {"target_model": str(copy)}

    return prepare


def without(*patterns: str) -> Callable[[Path], None]:
    """An edit of a model copy that deletes its files matching `patterns`."""

    def edit(model: Path) -> None:
        for pattern in patterns:
            for path in model.glob(pattern):
                path.unlink()

    return edit


def truncated(name: str) -> Callable[[Path], None]:
    """An edit of a model copy that cuts file `name` to half its size, as an interrupted copy leaves it."""

    def edit(model: Path) -> None:
        path = model / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)

    return edit


def edited_weights(edit_tensors: Callable[[dict], None], **config: object) -> Callable[[Path], None]:
    """An edit of a model copy that rewrites its weights through `edit_tensors` and sets `config` keys."""

    def edit(model: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        settings = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**settings, **config}))

    return edit


def token_added_at(token_id: int) -> Callable[[Path], None]:
    """An edit of a model copy whose tokenizer gains a special token with id `token_id`."""

    def edit(model: Path) -> None:
        tokenizer = json.loads((model / "tokenizer.json").read_text())
        tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": token_id, "content": "<|extra|>"})
        (model / "tokenizer.json").write_text(json.dumps(tokenizer))

    return edit


def index_naming(*files: str) -> Callable[[Path], None]:
    """An edit of a model copy that adds a safetensors index whose weight map names `files`."""

    def edit(model: Path) -> None:
        weight_map = {f"tensor.{number}": name for number, name in enumerate(files)}
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return edit


def shallow_text_config(model: Path) -> None:
    """A multimodal-style config: the decoder's depth (4) on text_config, another at the top level."""
    config = json.loads((model / "config.json").read_text())
    config["text_config"] = {"num_hidden_layers": 4}
    (model / "config.json").write_text(json.dumps(config))


def template_raising(message: str) -> Callable[[Path], None]:
    """An edit of a model copy whose chat template raises on every conversation, as templates that refuse a
    role do."""

    def edit(model: Path) -> None:
        (model / "chat_template.jinja").write_text(f"{{{{ raise_exception({message!r}) }}}}")

    return edit


def results_as_a_file(workdir: Path, target: Path) -> dict:
    """A `prepare` that leaves a file where the results directory goes."""
    (workdir / "results").write_text("")
    return {}


def messages(*turns: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]}, ensure_ascii=False)


LONG_SYSTEM = messages(("system", "the model reads every token " * 40), ("user", "hi"), ("assistant", "yes"))

CASES = [
    # The config's schema, at DAG build.
    Case(
        "unknown_key",
        r"config runs\.tiny: unknown key 'sequence_length'; the known keys .*seq_length",
        run={"sequence_length": 512},
    ),
    Case("wrong_type", r"config runs\.tiny\.seq_length: 'long' is not of type 'integer'", run={"seq_length": "long"}),
    Case(
        "seq_length_too_small", r"config runs\.tiny\.seq_length: 1 is less than the minimum of 2", run={"seq_length": 1}
    ),
    Case(
        "bad_dtype", r"config runs\.tiny\.dtype: 'bf32' is not one of \['bf16', 'fp16', 'fp32'\]", run={"dtype": "bf32"}
    ),
    Case("two_aux_layers", r"config runs\.tiny\.aux_layer_ids: \[1, 2\] is too short", run={"aux_layer_ids": [1, 2]}),
    Case("no_input_data", r"config runs\.tiny: 'input_data' is a required property", run={"input_data": None}),
    Case("zero_gpus_per_job", r"config gpus_per_job: 0 is less than the minimum of 1", config={"gpus_per_job": 0}),
    Case(
        "unknown_validation_key",
        r"config validation: unknown key 'samples'; the known keys are num_samples",
        config={"validation": {"samples": 3}},
    ),
    Case("bad_device", r"config device: 'gpu' is not one of \['auto', 'cuda', 'cpu'\]", config={"device": "gpu"}),
    # The target model, at DAG build.
    Case(
        "model_dir_missing",
        r"target_model '/nonexistent/model': no such directory",
        run={"target_model": "/nonexistent/model"},
    ),
    Case(
        "not_a_model_dir",
        r"target_model 'data' is not a model directory: it has no config\.json",
        run={"target_model": "data"},
    ),
    Case(
        "model_without_weights",
        r"target_model '.*/target' has no weights \(no \*\.safetensors or \*\.bin",
        prepare=model_copy(without("*.safetensors")),
    ),
    Case(
        "model_without_tokenizer",
        r"target_model '.*/target' has no tokenizer",
        prepare=model_copy(without("tokenizer*")),
    ),
    # The target's files, at DAG build, without torch (eagle3_cache.checkpoint_files).
    Case(
        "weights_cut_short",
        r"target/model\.safetensors: \d+ bytes, its header describes \d+ \(cut short\); copy the file again",
        prepare=model_copy(truncated("model.safetensors")),
    ),
    Case(
        "index_names_a_missing_file",
        r"model\.safetensors\.index\.json: names model-00002-of-00002\.safetensors, which the directory lacks",
        prepare=model_copy(index_naming("model.safetensors", "model-00002-of-00002.safetensors")),
    ),
    Case(
        "untied_model_without_head",
        r"config\.json: tie_word_embeddings is false, but no weight file of target_model has lm_head\.weight",
        prepare=model_copy(edited_weights(lambda tensors: tensors.pop("lm_head.weight"), tie_word_embeddings=False)),
    ),
    Case(
        "tied_head_of_another_shape",
        r"lm_head\.weight is \[8, 32\], but config\.json ties it to model\.embed_tokens\.weight, which is \[\d+, 32\]",
        prepare=model_copy(
            edited_weights(
                lambda tensors: tensors.update({"lm_head.weight": tensors["lm_head.weight"][:8]}),
                tie_word_embeddings=True,
            )
        ),
    ),
    Case(
        "tokenizer_of_another_model",
        r"tokenizer\.json: token ids go up to 5000, but model\.embed_tokens\.weight in model\.safetensors has \d+ rows",
        prepare=model_copy(token_added_at(5000)),
    ),
    Case(
        "model_without_chat_template",
        r"target_model '.*/target' has no chat template \(none in tokenizer_config\.json",
        prepare=model_copy(without("chat_template.jinja")),
    ),
    Case(
        "seq_length_beyond_context",
        r"seq_length 100000 is longer than the target's context of 256 positions \(max_position_embeddings, with "
        r"its rope scaling, in its config\.json\); set seq_length to at most 256",
        run={"seq_length": 100000},
    ),
    Case(
        "revision_of_a_local_dir",
        r"is a local directory, which has no revisions: remove `revision: main`",
        run={"revision": "main"},
    ),
    Case(
        "data_revision_of_a_local_file",
        r"input_data 'data/conversations\.jsonl' is local, which has no revisions: remove `data_revision: v1`",
        run={"data_revision": "v1"},
    ),
    Case(
        "aux_layer_beyond_depth",
        r"runs\.tiny: aux_layer_ids must be 3 distinct layer ids in \[0, 7\] for this 8-layer target; got \[1, 2, 99\]",
        run={"aux_layer_ids": [1, 2, 99]},
    ),
    Case(
        "aux_layer_beyond_text_config_depth",
        r"layer ids in \[0, 3\] for this 4-layer target; got \[1, 3, 6\]",
        run={"aux_layer_ids": [1, 3, 6]},
        prepare=model_copy(shallow_text_config),
    ),
    Case(
        "draft_vocab_above_vocab",
        r"draft_vocab_size 100000 is larger than the target's vocabulary of \d+ tokens: set it to at most \d+",
        run={"draft_vocab_size": 100000},
    ),
    # The input data's path, at DAG build.
    Case(
        "data_missing",
        r"input_data 'data/missing\.jsonl': no such file or directory",
        run={"input_data": "data/missing.jsonl"},
    ),
    Case(
        "data_without_suffix",
        r"'data/conversations': no such file or directory \(did you mean data/conversations\.jsonl\?\)",
        run={"input_data": "data/conversations"},
    ),
    Case(
        "data_csv",
        r"input_data 'data/conversations\.csv' is neither JSON",
        prepare=data_file("conversations.csv", "a,b\n"),
    ),
    Case(
        "data_dir_without_parquet",
        r"input_data 'data' is a directory without \.parquet files",
        run={"input_data": "data"},
    ),
    Case(
        "hub_dataset_without_split",
        r"input_data 'org/chats' is no local file, so it names a hub dataset, which needs `split`",
        run={"input_data": "org/chats"},
    ),
    Case(
        "unsupported_split",
        r"split 'train\[:10%\]': only `name\[start:stop\]`",
        run={"input_data": "org/chats", "split": "train[:10%]"},
    ),
    # The device, before the first job (a dtype change would recompute every shard).
    pytest.param(
        Case(
            "cuda_without_gpu",
            r"device is 'cuda' but no CUDA device is visible here; set `device: auto`",
            run={"dtype": "fp16"},
            config={"device": "cuda"},
        ),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
    ),
    # The hub, before the first job (a new target would recompute everything).
    Case(
        "hub_model_offline",
        rf"target_model '{HUB_MODEL}' is not in the Hugging Face cache .* HF_HUB_OFFLINE is set",
        run={"target_model": HUB_MODEL},
        offline=True,
    ),
    Case(
        "hub_model_unreachable",
        rf"could not reach the Hugging Face hub \({UNREACHABLE_HUB}\) for target_model '{HUB_MODEL}': download it "
        r"first \(hf download .*\) .* or set HF_HUB_OFFLINE=1",
        run={"target_model": HUB_MODEL},
    ),
    Case(
        "hub_dataset_unreachable",
        r"could not reach the Hugging Face hub .* for input_data 'org/chats'",
        run={"input_data": "org/chats", "split": "train"},
    ),
    # The data's rows, as the tokenize job reads them (numbered by their line in the file).
    Case(
        "not_utf8",
        r"data/conversations\.jsonl, line 4: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8",
        prepare=data_line(4, messages(("user", "café"), ("assistant", "oui")).encode("latin-1")),
    ),
    Case(
        "invalid_json",
        r"data/conversations\.jsonl, line 3: invalid JSON \(Expecting value at column 15\); fix or remove it",
        prepare=data_line(3, '{"messages": ['),
    ),
    Case(
        "content_is_a_dict",
        r"line 3: messages\[0\]\.content is a dict \(\{'text': 'hello'\}\); give a string",
        prepare=data_line(3, messages(("user", {"text": "hello"}), ("assistant", "hi"))),
    ),
    Case(
        "unknown_role",
        r"line 5: messages\[0\]: unknown role 'narrator'; accepted roles are",
        prepare=data_line(5, messages(("narrator", "once"), ("assistant", "upon"))),
    ),
    Case(
        "no_assistant_turn",
        r"data/conversations\.jsonl, line 6 has no assistant turn",
        prepare=data_line(6, messages(("user", "hello"))),
    ),
    Case(
        "no_messages",
        r"line 2: no `messages` \(OpenAI\) or `conversations` \(ShareGPT\) list; its keys are \['text'\]",
        prepare=data_line(2, json.dumps({"text": "hello"})),
    ),
    Case(
        "reasoning_not_a_string",
        r"line 7: messages\[1\]\.reasoning_content must be a string, got a list",
        prepare=data_line(
            7,
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b", "reasoning_content": ["c"]},
                    ]
                }
            ),
        ),
    ),
    Case("empty_data_file", r"input_data 'data/empty\.jsonl' holds no rows", prepare=data_file("empty.jsonl", "\n")),
    Case(
        "leading_assistant_turn",
        r"data/conversations\.jsonl, line 8: starts with an assistant turn",
        prepare=data_line(8, messages(("assistant", "hello"), ("user", "hi"), ("assistant", "yes"))),
    ),
    Case(
        "no_sample_supervised",
        r"input_data 'data/cut\.jsonl': none of its 3 samples has a supervised token at seq_length 32 "
        r"\(mask_reasoning_content False, mask_generation_prompt False\), so the cache would train nothing: "
        r"data/cut\.jsonl, line 1 \(cut at seq_length before its first assistant token\)",
        prepare=data_file("cut.jsonl", f"{LONG_SYSTEM}\n" * 3),
    ),
    Case(
        "text_the_tokenizer_cannot_encode",
        r"data/conversations\.jsonl, line 3: messages\[0\]\.content holds text that is not valid Unicode",
        prepare=data_line(
            3, r'{"messages": [{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "c"}]}'
        ),
    ),
    Case(
        "chat_template_that_raises",
        r"data/conversations\.jsonl, line 1: the chat template of target_model '.*/target' failed on it "
        r"\(TemplateError: no system messages\)",
        prepare=model_copy(template_raising("no system messages")),
    ),
    Case(
        "integral_float",
        r"config runs\.tiny\.seq_length: 32\.0 is a float; write it as an integer \(32\)",
        run={"seq_length": 32.0},
    ),
    Case(
        "results_not_a_directory",
        r"cannot create the cache directory results/tiny/shards \(.*\); make results/ a writable directory",
        prepare=results_as_a_file,
    ),
    # Kept, with a warning naming it: a sample that truncation leaves without supervision.
    Case(
        "sample_without_supervision",
        r"\d+ samples have no supervised token.*data/conversations\.jsonl, line 5 \(cut at seq_length before its first",
        prepare=data_line(5, LONG_SYSTEM),
        args=(f"results/{RUN}/tokenized.h5",),
        fails=False,
    ),
]


# One case per level, through the command line: the schema and a run's check at DAG build, the hub check
# before the first job, a bad row in the tokenize job, and a warning that lets the run finish.
# How far from the end of a failed run's output its Error: line may be (Snakemake's footer is four lines).
LAST_LINES = 6
END_TO_END = {"unknown_key", "model_without_weights", "hub_model_offline", "not_utf8", "sample_without_supervision"}


def case_id(case: Case) -> str:
    return case.id


def with_case_settings(workdir: Path, case: Case, target: Path) -> None:
    """The run's config with the case's settings, and its files prepared."""
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    settings = {**case.run, **(case.prepare(workdir, target) if case.prepare else {})}
    run = config["runs"][RUN]
    for key, value in settings.items():
        if value is None:
            del run[key]
        else:
            run[key] = value
    write_config(workdir, {**config, **case.config})


# --- Each case at its level, in-process ----------------------------------------------------------


def unwrapped(case: Case) -> Case:
    return case.values[0] if hasattr(case, "values") else case


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and an unreachable hub, as huggingface_hub read them at import."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def first_refusal(workdir: Path) -> str | None:
    """The line the first level to refuse the run's config prints, or None when every level passes."""
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    try:
        startup.checked_config(config, CONFIG_SCHEMA)
        startup.make_cache_dirs(CACHE_DIR, config["runs"])
        startup.check_before_local_jobs(config, [SimpleNamespace(wildcards={"run": RUN})])
    except CacheConfigError as error:
        return error_line(error)
    try:
        run_tokenize_jobs(workdir, config, RUN)
    except SystemExit as stopped:
        return str(stopped.code)
    return None


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_refused_in_one_line_at_its_level(case, hub, tiny_chat_target, tmp_path, capsys):
    if case.offline:
        hub.setattr(constants, "HF_HUB_OFFLINE", True)
    workdir = new_workdir(tmp_path, run_config(tiny_chat_target))
    hub.chdir(workdir)
    with_case_settings(workdir, case, tiny_chat_target)
    refusal = first_refusal(workdir)
    printed = capsys.readouterr()
    if case.fails:
        assert refusal is not None and refusal.startswith("Error: "), printed
        assert re.search(case.message, refusal), refusal
    else:
        assert refusal is None, refusal
        log = (workdir / "logs" / RUN / "tokenize.log").read_text()
        assert any(re.search(case.message, line) for line in log.splitlines()), log
    assert "Traceback" not in printed.out + printed.err


# --- A few cases through the command line --------------------------------------------------------


@pytest.fixture(scope="module")
def built_cache(completed) -> dict[str, str]:
    """sha256 of every file of the finished run's cache (shards, embeddings, manifest)."""
    return {path.name: digest(path) for path in sorted(cache_dir(completed[0]).iterdir())}


def first_error_line(output: str) -> str | None:
    return next((line for line in output.splitlines() if ERROR_LINE.match(line)), None)


def case_env(tmp_path: Path, case: Case) -> dict[str, str]:
    """This environment with an empty Hugging Face cache and an unreachable hub, offline if the case says so."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_") and "proxy" not in key.lower()}
    offline = {"HF_HUB_OFFLINE": "1"} if case.offline else {}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": UNREACHABLE_HUB, **offline}


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if unwrapped(case).id in END_TO_END], ids=case_id)
def test_bad_input_stops_snakemake_with_one_line_and_changes_nothing(
    case, completed, built_cache, tiny_chat_target, tmp_path
):
    workdir = Path(shutil.copytree(completed[0], tmp_path / "workdir", symlinks=True))
    with_case_settings(workdir, case, tiny_chat_target)
    result = snakemake(workdir, *case.args, check=False, env=case_env(tmp_path, case))
    output = result.stdout
    if case.fails:
        assert result.returncode != 0, output[-4000:]
        first = first_error_line(output)
        assert first is not None and first.startswith("Error: "), output[-4000:]
        assert re.search(case.message, first), first
        # And again where the eye lands: among the last lines, below Snakemake's job tables.
        last = output.strip().splitlines()[-LAST_LINES:]
        assert any(line.startswith("Error: ") and re.search(case.message, line) for line in last), "\n".join(last)
    else:
        assert result.returncode == 0, output[-4000:]
        assert any(re.search(case.message, line) for line in output.splitlines()), output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert {path.name: digest(path) for path in sorted(cache_dir(workdir).iterdir())} == built_cache


@pytest.mark.slow
def test_split_and_shuffle_seed_of_a_json_file_rerun_no_shard(workdir):
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["runs"][RUN].update(split="train[:3]", shuffle_seed=7)
    write_config(workdir, config)
    result = snakemake(workdir, "-n")
    # The manifest records them (as Automodel's does), and the report shows the manifest.
    assert jobs_run(result.stdout) == {"manifest", "validate"}
    assert "split 'train[:3]' does not apply to the local JSON file" in result.stdout
