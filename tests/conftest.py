"""Shared fixtures: tiny random models and token batches built locally (no network)."""

from __future__ import annotations

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
