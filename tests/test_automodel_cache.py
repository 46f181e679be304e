"""NeMo Automodel 0.7.0 reads our cache directory unchanged, and its EAGLE-3 trainer steps on it."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_ROWS, build_tiny_cache

pytest.importorskip(
    "nemo_automodel.recipes.llm.train_eagle3",
    reason="nemo-automodel 0.7.0 is the consumer oracle: pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
)
pytestmark = pytest.mark.automodel


def tiny_draft(target_config, draft_vocab_size: int):
    """A one-layer LlamaEagle3DraftModel configured as Automodel's recipe configures it."""
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
    from transformers import LlamaConfig

    config = target_config.to_dict()
    config.update(
        num_hidden_layers=1,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=target_config.hidden_size,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaEagle3DraftModel(LlamaConfig(**config))


def trainer_on(cache_dir, target_config):
    """Automodel's cached-target setup: the manifest checks, vocabulary mask, seeded embeddings, trainer."""
    from nemo_automodel.components.datasets.llm.eagle3_cache import read_manifest, read_target_embeddings
    from nemo_automodel.components.speculative.eagle.core import Eagle3TrainerModule
    from nemo_automodel.recipes.llm.train_eagle3 import _validate_cached_eagle3_manifest

    manifest = read_manifest(str(cache_dir))
    _validate_cached_eagle3_manifest(
        str(cache_dir), manifest, target_config, mask_reasoning_content=False, mask_generation_prompt=False
    )
    selected = torch.tensor(manifest["selected_token_ids"], dtype=torch.long)
    selected_mask = torch.zeros(target_config.vocab_size, dtype=torch.bool)
    selected_mask[selected] = True
    draft = tiny_draft(target_config, int(selected.numel()))
    draft.copy_embeddings_from_target(torch.nn.Embedding.from_pretrained(read_target_embeddings(str(cache_dir))))
    return Eagle3TrainerModule(draft, selected_token_ids=selected, selected_token_mask=selected_mask, ttt_steps=2)


@pytest.mark.parametrize(("dtype", "topk"), [("bf16", 0), ("fp32", 8)])
def test_automodel_reads_our_cache_and_trains_a_step(tmp_path, tiny_chat_target, dtype, topk):
    from nemo_automodel.components.datasets.llm.eagle3_cache import build_cached_eagle3_dataloader
    from transformers import AutoConfig

    cache = build_tiny_cache(
        tmp_path / "run", tiny_chat_target, PARITY_ROWS, shard_size=4, dtype=dtype, target_probs_topk=topk
    )
    loader = build_cached_eagle3_dataloader(cache_dir=str(cache.cache_dir), batch_size=3, shuffle=False)
    assert len(loader.dataset) == len(PARITY_ROWS)
    batch = next(iter(loader))
    assert batch["aux_hidden_states"].dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert batch["target_probs"].shape[-1] == 64  # top-k rows are scattered back to the draft vocab

    config = AutoConfig.from_pretrained(tiny_chat_target)
    trainer = trainer_on(cache.cache_dir, config)
    if dtype == "bf16":
        trainer = trainer.to(torch.bfloat16)
    metrics = trainer(**batch)
    assert torch.isfinite(metrics.loss)
    metrics.loss.backward()
    grads = [p.grad for p in trainer.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
