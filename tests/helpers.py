"""Helpers the tests share: tiny models and token stores, chat templates, a finished cache built in-process,
and copies of the workflow to run Snakemake in."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from eagle3_cache.cache_dir import check_cache
from eagle3_cache.layout import shard_dir_name, shard_file_name, shard_id, shard_index
from eagle3_cache.token_store import TokenBlock, TokenizedSample, synthetic_header, write_tokenized


def tiny_llama_config(**overrides):
    """A Llama config small enough to run in milliseconds, deep enough for the default aux layers."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def random_token_block(lengths: list[int], seq_length: int, vocab_size: int = 128, seed: int = 0, pad_id: int = 2):
    """Right-padded random rows with a loss mask over the second half of each row's content."""
    generator = torch.Generator().manual_seed(seed)
    n = len(lengths)
    input_ids = torch.full((n, seq_length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((n, seq_length), dtype=torch.int64)
    loss_mask = torch.zeros((n, seq_length), dtype=torch.int64)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, :length] = 1
        loss_mask[row, length // 2 : length] = 1
    return TokenBlock(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


def write_token_store(path, block, *, target_vocab_size: int = 128, pad_id: int = 2) -> None:
    """A tokenized store holding exactly the rows of `block` (for shard tests without a tokenizer)."""
    seq_length = block.input_ids.shape[1]
    header = synthetic_header(seq_length, target_vocab_size, pad_token_id=pad_id)
    lengths = block.attention_mask.sum(dim=1).tolist()
    samples = [
        TokenizedSample(
            input_ids=block.input_ids[row].numpy(),
            loss_mask=block.loss_mask[row].numpy().astype("uint8"),
            length=length,
            truncated=length == seq_length,
        )
        for row, length in enumerate(lengths)
    ]
    write_tokenized(path, header, samples, len(samples))


# --- Chat templates and conversations --------------------------------------------------------

# ChatML without {% generation %} tags: assistant spans come from prefix renders. Assistant turns
# carry a <think> block; the generation prompt reads enable_thinking.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{{ '<think>' + (m['reasoning_content'] or '') + '</think>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking %}{{ '<think>' }}"
    "{% else %}{{ '<think></think>' }}{% endif %}{% endif %}"
)


# The same rendering, with the assistant's think block, content and <|im_end|> in {% generation %}.
CHATML_GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ '<think>' + (m['reasoning_content'] or '') + '</think>' + m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking %}{{ '<think>' }}"
    "{% else %}{{ '<think></think>' }}{% endif %}{% endif %}"
)


def chat(user: str, assistant: str, **assistant_fields) -> list[dict]:
    """A user turn and an assistant turn, as OpenAI messages."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant, **assistant_fields}]


def numbered_rows(count: int) -> list[dict]:
    """`count` rows, each with its `id` and a short exchange."""
    return [{"id": i, "messages": chat(f"question {i}", f"answer {i}")} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Conversations for the Automodel parity tests: both row schemas, system turns, several assistant
# turns, reasoning, list-of-parts content, and rows long enough to be truncated mid-turn.
PARITY_ROWS = [
    {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine."}]},
    {
        "messages": [
            {"role": "system", "content": "You think step by step."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four.", "reasoning_content": "two plus two is four"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "The quick"}, {"type": "text", "text": "fox"}]},
            {"role": "assistant", "content": "jumps over the lazy dog."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "How are you today?"},
            {"from": "gpt", "value": "Fine, thanks for asking."},
            {"from": "human", "value": "Good."},
            {"from": "gpt", "value": "Today is a good day."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Tell me about the fox."},
            {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 6},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Let me think about it step by step. " * 8},
            {"role": "assistant", "content": "Sure."},
        ]
    },
]


def tokenize_to_store(
    path, tokenizer, input_data, seq_length, *, vocab_size=None, split=None, shuffle_seed=42, **mask_options
):
    """What the tokenize rule does, on an already loaded tokenizer (vocab_size defaults to its length)."""
    from eagle3_cache.tokenization import write_tokenized_store

    write_tokenized_store(
        path,
        tokenizer,
        vocab_size or len(tokenizer),
        input_data=str(input_data),
        split=split,
        shuffle_seed=shuffle_seed,
        seq_length=seq_length,
        **mask_options,
    )
    return path


def tokenize_run_config(**settings) -> dict:
    """A config of one run `r` for the tokenize rules alone: seq_length 32, a local JSON file's defaults, and
    `settings` (target_model and input_data among them)."""
    run = {"seq_length": 32, "mask_reasoning_content": False, "mask_generation_prompt": False}
    run |= {"revision": None, "data_revision": None, "trust_remote_code": False, "split": None, "shuffle_seed": 42}
    return {"runs": {"r": run | {"aux_layer_ids": None, "draft_vocab_size": None, **settings}}}


def run_tokenize_jobs(workdir: Path, config: dict, run: str) -> Path:
    """The tokenize rules' scripts, run in this process in Snakemake's order on the run's data, their files
    under `workdir`: the index, each part, the join. The run's store; a script's failure is its SystemExit."""
    import runpy

    from snakemake.iocontainers import Namedlist

    from eagle3_cache import layout
    from eagle3_cache.data_parts import read_index

    settings = layout.applied_settings(config["runs"][run])
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"

    def job(script: str, log: str, output: dict, params: dict, inputs: dict, **wildcards) -> None:
        paths = {name: str(workdir / pattern.format(run=run, **wildcards)) for name, pattern in output.items()}
        log_path = workdir / "logs" / run / log
        for path in [*paths.values(), log_path]:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        namespace = SimpleNamespace(
            input=Namedlist(fromdict=inputs),
            params=Namedlist(fromdict=params),
            output=Namedlist(fromdict=paths),
            log=[str(log_path)],
            config=config,
            wildcards=SimpleNamespace(run=run, **wildcards),
        )
        runpy.run_path(str(scripts / script), init_globals={"snakemake": namespace})

    index = workdir / layout.TOKENIZE_INDEX.format(run=run)
    data_params = {name: settings[name] for name in layout.DATA_SETTINGS}
    part_size = {"tokenize_part_size": settings.get("tokenize_part_size", 20000)}
    job(
        "index_conversations.py",
        "index_conversations.log",
        {"index": layout.TOKENIZE_INDEX},
        data_params | part_size,
        {},
    )
    parts = [layout.part_id(number) for number in range(len(read_index(index)["parts"]))]
    tokenize_params = {name: settings[name] for name in layout.TOKENIZE_SETTINGS}
    for part in parts:
        output = {"part": layout.TOKENIZED_PART}
        job(
            "tokenize_conversations.py",
            f"tokenize_part-{part}.log",
            output,
            tokenize_params,
            {"index": str(index)},
            part=part,
        )
    part_paths = [str(workdir / layout.TOKENIZED_PART.format(run=run, part=part)) for part in parts]
    job("join_tokenized.py", "tokenize.log", {"tokenized": layout.TOKENIZED}, {}, {"parts": part_paths})
    return workdir / layout.TOKENIZED.format(run=run)


# --- A finished cache, built without Snakemake (report and end-to-end tests) -----------------


@dataclass(frozen=True)
class TinyCache:
    """A finished run laid out as `results/{run}/`: tokenized store, vocabulary files, shards, shard stats,
    verification records, and the settings it was built under."""

    run_dir: Path

    @property
    def settings(self) -> dict:
        return json.loads((self.run_dir / "settings.json").read_text())

    @property
    def tokenized(self) -> Path:
        return self.run_dir / "tokenized.h5"

    @property
    def selection(self) -> Path:
        return self.run_dir / "vocab_selection.pt"

    @property
    def counts(self) -> Path:
        return self.run_dir / "vocab_counts.npy"

    @property
    def cache_dir(self) -> Path:
        return self.run_dir / "shards"

    @property
    def stats(self) -> list[Path]:
        return sorted((self.run_dir / "shard_stats").glob("shard-*.json"))

    @property
    def verified(self) -> list[Path]:
        return [self.run_dir / "verified" / f"shard-{shard_id(shard_index(path))}.json" for path in self.stats]

    @property
    def parity(self) -> Path:
        return self.run_dir / "parity.json"

    def copied_to(self, tmp_path: Path) -> TinyCache:
        """A private copy of this cache under `tmp_path`, free to damage."""
        return TinyCache(Path(shutil.copytree(self.run_dir, tmp_path / "results" / RUN)))

    def shard(self, index: int) -> Path:
        """Shard `index`: a file, or a directory in the specforge format."""
        specforge = self.settings["format"] == "specforge"
        return self.cache_dir / (shard_dir_name if specforge else shard_file_name)(index)


def verified_shard(cache: TinyCache, index: int):
    """What the verify_shard job finds in shard `index` of a tiny cache, in either format."""
    from eagle3_cache.specforge_verification import verify_committed_specforge_shard
    from eagle3_cache.verification import verify_committed_shard

    verify = verify_committed_specforge_shard if cache.settings["format"] == "specforge" else verify_committed_shard
    return verify(
        cache.shard(index),
        stats_path=cache.stats[index],
        selection_path=cache.selection,
        tokenized_path=cache.tokenized,
        settings=cache.settings,
    )


def verify_tiny_cache(cache: TinyCache) -> None:
    """What the verify_shard jobs do, for every shard present; a record is written even for a shard that
    fails (the jobs write none and delete the shard instead), so that the report can be tested on it."""
    from eagle3_cache.atomic import write_json_atomic

    for index, record in enumerate(cache.verified):
        record.unlink(missing_ok=True)
        if cache.shard(index).exists():
            write_json_atomic(record, verified_shard(cache, index).to_json())


def check_tiny_parity(cache: TinyCache, model, num_samples: int, seed: int = 0) -> None:
    """What the parity job does once it holds the target: `parity.json`."""
    from eagle3_cache.atomic import write_json_atomic
    from eagle3_cache.live_parity import ParityInputs, checked_parity, compared_samples
    from eagle3_cache.results import json_safe
    from eagle3_cache.specforge_parity import compared_specforge_samples

    compare = compared_specforge_samples if cache.settings["format"] == "specforge" else compared_samples
    inputs = ParityInputs(
        cache.cache_dir, cache.tokenized, cache.selection, cache.stats, cache.settings, num_samples, seed
    )
    result = checked_parity(model, inputs, compare, load_seconds=0.0)
    write_json_atomic(cache.parity, json_safe(result.to_json()))


def validated_tiny_cache(cache: TinyCache, model, num_samples: int, benchmarks: list[Path] = ()):
    """The report on a tiny cache after the jobs it reads (each shard's verification, live parity with `model`)."""
    from eagle3_cache.specforge_validation import specforge_checks
    from eagle3_cache.validation import ValidationInputs, automodel_checks, validate_cache

    verify_tiny_cache(cache)
    check_tiny_parity(cache, model, num_samples)
    inputs = ValidationInputs(
        run=RUN,
        cache_dir=cache.cache_dir,
        tokenized=cache.tokenized,
        selection=cache.selection,
        counts=cache.counts,
        stats=cache.stats,
        verified=cache.verified,
        parity=cache.parity,
        benchmarks=list(benchmarks),
    )
    return validate_cache(inputs, specforge_checks if cache.settings["format"] == "specforge" else automodel_checks)


def build_tiny_cache(
    run_dir: Path,
    target_dir: Path,
    rows: list[dict],
    *,
    seq_length: int = 40,
    shard_size: int = 3,
    batch_size: int = 2,
    draft_vocab_size: int | None = 64,
    dtype: str = "bf16",
    compute_dtype: str = "auto",
    target_probs_topk: int = 0,
    format: str = "automodel",
) -> TinyCache:
    """What the workflow's rules do, in-process on the CPU: tokenize `rows`, select the draft
    vocabulary, compute and verify every shard, store the embeddings (automodel) or the vocabulary
    mapping (specforge) and write the manifest."""
    from transformers import AutoTokenizer

    from eagle3_cache import CACHE_SEMANTICS_VERSION
    from eagle3_cache.atomic import write_json_atomic
    from eagle3_cache.layout import EMBEDDINGS_FILE, MANIFEST_FILE, VOCAB_MAPPING_FILE, num_shards, shard_dir_name
    from eagle3_cache.manifest import checked_manifest, read_shard_stats
    from eagle3_cache.pipeline import compute_shard, run_shard_job
    from eagle3_cache.shard_format import write_target_embeddings
    from eagle3_cache.specforge_cache import specforge_manifest
    from eagle3_cache.specforge_format import write_vocab_mapping
    from eagle3_cache.specforge_shard import compute_specforge_shard
    from eagle3_cache.target import input_embeddings
    from eagle3_cache.token_store import read_tokenized_info
    from eagle3_cache.vocab import build_vocab_selection

    cache = TinyCache(Path(run_dir))
    cache.run_dir.mkdir(parents=True, exist_ok=True)
    data = cache.run_dir / "conversations.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tokenize_to_store(cache.tokenized, tokenizer, data, seq_length)
    info = read_tokenized_info(cache.tokenized)
    selected = build_vocab_selection(cache.tokenized, draft_vocab_size, cache.selection, cache.counts).selected

    # The manifest rule's params (the shard rule's, plus the data and mask settings).
    settings = {
        "target_model": str(target_dir),
        "revision": None,
        "trust_remote_code": False,
        "aux_layer_ids": None,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "target_probs_topk": target_probs_topk,
        "seq_length": seq_length,
        "shard_size": shard_size,
        "cache_semantics_version": CACHE_SEMANTICS_VERSION,
        "target_weights_sha256": None,
        "data_sha256": None,
        "model_files_sha256": None,
        "input_data": str(data),
        "data_revision": None,
        "split": None,
        "shuffle_seed": 42,
        "mask_reasoning_content": False,
        "mask_generation_prompt": False,
        "format": format,
    }
    write_json_atomic(cache.run_dir / "settings.json", settings)
    specforge = format == "specforge"
    shard_count = num_shards(info.num_samples, shard_size)
    stats_paths = [cache.run_dir / "shard_stats" / f"shard-{shard_id(i)}.json" for i in range(shard_count)]
    for index, stats_path in enumerate(stats_paths):
        run_shard_job(
            settings,
            tokenized_path=cache.tokenized,
            selection_path=cache.selection,
            shard_index=index,
            batch_size=batch_size,
            device=torch.device("cpu"),
            num_gpus=1,
            shard_path=cache.cache_dir / (shard_dir_name if specforge else shard_file_name)(index),
            stats_path=stats_path,
            compute=compute_specforge_shard if specforge else compute_shard,
        )
    verify_tiny_cache(cache)
    if specforge:
        write_vocab_mapping(cache.cache_dir / VOCAB_MAPPING_FILE, selected, info.target_vocab_size)
    else:
        embeddings = input_embeddings(str(target_dir), revision=None, trust_remote_code=False)
        write_target_embeddings(cache.cache_dir / EMBEDDINGS_FILE, embeddings)
    stats = read_shard_stats(stats_paths)
    manifest = checked_manifest(cache.cache_dir, settings, stats, selected.tolist(), info)
    if specforge:
        manifest = specforge_manifest(cache.cache_dir, stats, manifest)
    write_json_atomic(cache.cache_dir / MANIFEST_FILE, manifest)
    return cache


# --- Copies of the workflow (workflow and SLURM tests) ---------------------------------------

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CONFIG_SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
WORKFLOW_FILES = ["Snakefile", "workflow", "profiles", "envs"]
RUN = "tiny"
# Three shards, the last one partial: a first, a middle and a last shard, in as few jobs as that takes.
NUM_CONVERSATIONS = 10
SHARD_SIZE = 4
NUM_SHARDS = 3
# Tokenized in two parts, the second partial.
TOKENIZE_PART_SIZE = 6
TOKENIZE_PARTS = 2
TOKENIZATION = {"index_conversations", "tokenize", *(f"tokenize_part-{index:06d}" for index in range(TOKENIZE_PARTS))}

WORDS = (
    "the model reads every token and writes a short answer about rivers cities numbers "
    "colors music weather trains gardens bread stars"
).split()


def conversation(index: int) -> dict:
    """A short deterministic user/assistant exchange; lengths vary with the index."""

    def text(start: int, length: int) -> str:
        return " ".join(WORDS[(start + i * 7) % len(WORDS)] for i in range(length))

    return {
        "messages": [
            {"role": "user", "content": text(index, 2 + index % 5)},
            {"role": "assistant", "content": text(index * 3, 3 + index % 7)},
        ]
    }


def run_config(target_model: str | Path, **overrides) -> dict:
    settings = {
        "target_model": str(target_model),
        "input_data": "data/conversations.jsonl",
        "seq_length": 32,
        "draft_vocab_size": 64,
        "shard_size": SHARD_SIZE,
        "tokenize_part_size": TOKENIZE_PART_SIZE,
        "batch_size": 2,
    }
    settings.update(overrides)
    # Not strict: a random model's predictions fail the report's quality thresholds.
    validation = {"num_samples": 2, "strict": False}
    return {"runs": {RUN: settings}, "device": "cpu", "validation": validation}


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def new_workdir(path: Path, config: dict) -> Path:
    """A copy of the workflow with `config` and the tiny conversations."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / name)
    (path / "config").mkdir()
    write_config(path, config)
    (path / "data").mkdir()
    lines = [json.dumps(conversation(index)) for index in range(NUM_CONVERSATIONS)]
    (path / "data" / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return path


def cache_dir(workdir: Path) -> Path:
    return workdir / "results" / RUN / "shards"


def shard_path(workdir: Path, index: int) -> Path:
    return cache_dir(workdir) / shard_file_name(index)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_complete_cache(workdir: Path, num_shards: int, reported: bool = True) -> None:
    """Exactly the expected files in the cache dir, all checks passing; the report written, or (`reported`
    false: the run made the manifest alone) none, since the one before vouched for an older commit."""
    expected = {shard_path(workdir, index).name for index in range(num_shards)}
    expected |= {"manifest.json", "target_embeddings.safetensors"}
    assert {path.name for path in cache_dir(workdir).iterdir()} == expected
    assert check_cache(cache_dir(workdir)) == []
    assert (workdir / "results" / RUN / "validation_report.html").is_file() == reported


# Injected into the shard job through PYTHONPATH: holds the shard named by HOLD_DESTINATION
# (shard-000001.safetensors by default) just before its temp file or staging directory is moved
# into place and tells the test the writer's pid, so that the SIGKILL lands while the shard is
# still being written.
HOLD_SHARD = """
import os, time
from pathlib import Path

_replace = os.replace


def replace(source, destination, *args, **kwargs):
    if str(destination).endswith(os.environ.get("HOLD_DESTINATION", "shard-000001.safetensors")):
        Path(os.environ["HOLD_MARKER"]).write_text(str(os.getpid()))
        time.sleep(3600)
    return _replace(source, destination, *args, **kwargs)


os.replace = replace
"""


# --- Running snakemake in a copy (workflow tests) ----------------------------------------

RUN_TIMEOUT_S = 900
# One thread per target-model job, so that two shard jobs share the 2 cores of a CI machine.
LOCAL_RUN = [
    "--profile",
    "profiles/local",
    "--set-threads",
    "compute_shard=1",
    "compute_specforge_shard=1",
    "parity=1",
    "validate=1",
    "--cores",
    "2",
]

JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
SHARD_WILDCARD = re.compile(r"^\s+wildcards: .*\b(?:shard|part)=(\d{6})")


# Rules with one job per shard (or tokenized part); jobs_run names their jobs "<rule>-<shard>".
SHARD_RULES = ("compute_shard", "compute_specforge_shard", "verify_shard", "tokenize_part")
AUTOMODEL_SHARD_RULES = ("compute_shard", "verify_shard")


def every_shard(count: int = NUM_SHARDS, rules: tuple[str, ...] = AUTOMODEL_SHARD_RULES) -> set[str]:
    """The per-shard jobs of `count` shards (computed and verified, by default)."""
    return {f"{rule}-{index:06d}" for rule in rules for index in range(count)}


def shard_jobs(*indices: int, rules: tuple[str, ...] = AUTOMODEL_SHARD_RULES) -> set[str]:
    """The jobs that rebuild the shards at `indices`."""
    return {f"{rule}-{index:06d}" for rule in rules for index in indices}


# What every rebuilt shard reruns after it: the commit, live parity and the report.
AFTER_SHARDS = {"manifest", "parity", "validate"}


class Tier:
    """Whether the running test is in the tier that may start Snakemake: marked `slow` (conftest sets it
    before each test's fixtures), so that the fast tier never pays for a Snakemake process."""

    slow = True


def snakemake_argv(*args: str) -> list[str]:
    """The snakemake command line with `args`; fails a test of the fast tier."""
    if not Tier.slow:
        pytest.fail("this test starts Snakemake: mark it @pytest.mark.slow (the fast tier starts none)")
    return [SNAKEMAKE, *args]


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake with the local profile on 2 cores; output is stdout and stderr together."""
    command = ["timeout", "-k", "10", str(RUN_TIMEOUT_S), *snakemake_argv(*LOCAL_RUN, *args)]
    result = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def jobs_run(output: str) -> set[str]:
    """The jobs a snakemake run executed ("compute_shard-000003" for a shard), `all` left out."""
    jobs = []
    for line in output.splitlines():
        header = JOB_HEADER.match(line)
        shard = SHARD_WILDCARD.match(line)
        if header:
            jobs.append(header.group(1))
        elif shard and jobs and jobs[-1] in SHARD_RULES:
            jobs[-1] = f"{jobs[-1]}-{shard.group(1)}"
    assert len(jobs) == len(set(jobs)), f"a job ran twice: {jobs}"
    return set(jobs) - {"all"}


def kill_shard_writer_mid_write(
    workdir: Path, hook_dir: Path, destination: str = "shard-000001.safetensors"
) -> subprocess.CompletedProcess:
    """Run the workflow, SIGKILL the job writing `destination` at its final rename, return the run."""
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOLD_SHARD)
    marker = hook_dir / "writer.pid"
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "HOLD_MARKER": str(marker), "HOLD_DESTINATION": destination}
    run = subprocess.Popen(
        snakemake_argv(*LOCAL_RUN),
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists() or not marker.read_text():
            assert run.poll() is None, f"snakemake ended before the write:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "the shard job never reached its write"
            time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        run.kill()
    return subprocess.CompletedProcess(run.args, run.returncode, output)


HUB_MODEL = "example-org/example-model"


def snakemake_static(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake without the profile; output is stdout and stderr together."""
    return subprocess.run(
        ["timeout", "-k", "10", "300", *snakemake_argv(*args)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def private_copy(workdir: Path, tmp_path: Path) -> Path:
    """A copy of a finished workdir a test may change (timestamps and Snakemake metadata kept)."""
    return Path(shutil.copytree(workdir, tmp_path / "workdir", symlinks=True))


def fail_second_forward(monkeypatch) -> None:
    """Make the shard pipeline's second forward raise, as a GPU running out of memory mid-shard would."""
    import eagle3_cache.pipeline as pipeline

    forward = pipeline.compute_cache_batch
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute_cache_batch", failing)


# --- Rule scripts run by hand, each in an interpreter of its own ----------------------------------


class Params(SimpleNamespace):
    """A rule's params for a script run by hand: attributes, and `items()` as Snakemake's have."""

    def items(self):
        return vars(self).items()


class Files(SimpleNamespace):
    """A rule's input or output files for a script run by hand: attributes, and iteration as Snakemake's have."""

    def __iter__(self):
        return iter(vars(self).values())


# What the light jobs (manifest, plan, report) must not import.
HEAVY_MODULES = ("torch", "transformers")
# The `snakemake` object arrives as JSON, so that building it imports nothing of the test suite's.
RUN_ALONE = """
import json, runpy, sys
from types import SimpleNamespace

class Params(SimpleNamespace):
    def items(self):
        return vars(self).items()

class Files(SimpleNamespace):
    def __iter__(self):
        return iter(vars(self).values())

given = json.loads(open(sys.argv[1]).read())
namespace = SimpleNamespace(
    **{key: Files(**value) for key, value in given.items() if key in ("input", "output")},
    wildcards=SimpleNamespace(**given.get("wildcards", {})),
    params=Params(**given["params"]), log=given["log"], config=given.get("config", {}), threads=given.get("threads", 1),
)
runpy.run_path(sys.argv[2], init_globals={"snakemake": namespace})
print(json.dumps(sorted(name for name in sys.argv[3:] if name in sys.modules)))
"""


def run_script_alone(script: str, namespace: SimpleNamespace, tmp_path: Path) -> list[str]:
    """Run `workflow/scripts/<script>` in a fresh interpreter, as Snakemake does; the HEAVY_MODULES it imported."""
    result = run_script_process(script, namespace, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def run_script_process(script: str, namespace: SimpleNamespace, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `workflow/scripts/<script>` in a fresh interpreter, as Snakemake does, whatever its exit status."""
    given = tmp_path / f"{Path(script).stem}.snakemake.json"
    given.write_text(
        json.dumps(
            {key: value if isinstance(value, (list, dict)) else vars(value) for key, value in vars(namespace).items()}
        )
    )
    command = [sys.executable, "-c", RUN_ALONE, str(given), str(REPO / "workflow" / "scripts" / script)]
    path = os.pathsep.join([str(REPO / "workflow" / "scripts")])
    return subprocess.run(
        [*command, *HEAVY_MODULES], env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True
    )


def plan_namespace(cache: TinyCache) -> SimpleNamespace:
    """The `snakemake` object the plan rule gives plan_disk.py for a tiny cache."""
    from eagle3_cache.cache_dir import read_manifest
    from eagle3_cache.layout import PLAN_SETTINGS

    settings = {**cache.settings, "draft_vocab_size": read_manifest(cache.cache_dir)["draft_vocab_size"]}
    return SimpleNamespace(
        input=Files(tokenized=str(cache.tokenized)),
        output=Files(plan=str(cache.run_dir / "plan.json")),
        log=[str(cache.run_dir / "plan.log")],
        params=Params(**{key: settings[key] for key in PLAN_SETTINGS}, cache_dir=str(cache.cache_dir)),
        config={"plan": {"margin": 0.05, "check_free_space": False}},
        wildcards=SimpleNamespace(run=RUN),
    )


def manifest_namespace(cache: TinyCache) -> SimpleNamespace:
    """The `snakemake` object the manifest rule gives write_manifest.py for a tiny cache."""
    return SimpleNamespace(
        input=SimpleNamespace(
            selection=str(cache.selection),
            stats=[str(p) for p in cache.stats],
            verified=[str(p) for p in cache.verified],
            tokenized=str(cache.tokenized),
        ),
        output=SimpleNamespace(manifest=str(cache.cache_dir / "manifest.json")),
        log=[str(cache.run_dir / "manifest.log")],
        params=Params(**cache.settings, cache_dir=str(cache.cache_dir)),
    )


def verify_namespace(cache: TinyCache, index: int, verified: Path) -> SimpleNamespace:
    """The `snakemake` object the verify_shard rule gives verify_shard.py for shard `index` of a tiny cache."""
    from eagle3_cache.layout import VERIFY_SETTINGS

    return SimpleNamespace(
        input=SimpleNamespace(
            shard=str(cache.shard(index)),
            stats=str(cache.stats[index]),
            selection=str(cache.selection),
            tokenized=str(cache.tokenized),
        ),
        output=SimpleNamespace(verified=str(verified)),
        log=[str(verified.with_suffix(".log"))],
        params=Params(**{name: cache.settings[name] for name in VERIFY_SETTINGS}),
        wildcards=SimpleNamespace(run="tiny", shard=f"{index:06d}"),
    )


def validate_namespace(cache: TinyCache, strict: bool) -> SimpleNamespace:
    """The `snakemake` object the validate rule gives validate.py, once the plan, verification and parity ran."""
    out = cache.run_dir
    return SimpleNamespace(
        input=SimpleNamespace(
            plan=str(out / "plan.json"),
            manifest=str(cache.cache_dir / "manifest.json"),
            tokenized=str(cache.tokenized),
            selection=str(cache.selection),
            counts=str(cache.counts),
            stats=[str(p) for p in cache.stats],
            verified=[str(p) for p in cache.verified],
            parity=str(cache.parity),
        ),
        output=SimpleNamespace(report=str(out / "validation_report.html"), json=str(out / "validation.json")),
        log=[str(out / "validate.log")],
        params=SimpleNamespace(strict=strict, cache_dir=str(cache.cache_dir), benchmarks=[]),
        wildcards=SimpleNamespace(run=RUN),
    )
