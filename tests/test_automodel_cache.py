"""NeMo Automodel 0.7.0 reads our cache directory unchanged, and its EAGLE-3 trainer steps on it."""

from __future__ import annotations

import pytest
import torch

from helpers import PARITY_ROWS, build_tiny_cache

pytest.importorskip(
    "nemo_automodel.recipes.llm.train_eagle3",
    reason="nemo-automodel 0.7.0 is the consumer oracle: pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
)
pytestmark = pytest.mark.automodel
BF16_EPS = torch.finfo(torch.bfloat16).eps


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


def automodel_precompute(model_dir, data_path, *, seq_length, draft_vocab_size, dtype):
    """Automodel's own precompute, assembled as its CLI does, minus the file writing.

    Returns its draft vocabulary and the per-batch cache dicts of `_compute_batch_cache`.
    """
    from nemo_automodel.components.datasets.llm.eagle3 import build_eagle3_dataloader, build_eagle3_token_mapping
    from nemo_automodel.components.datasets.llm.eagle3_cache import DTYPE_MAP
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel
    from nemo_automodel.components.speculative.precompute_eagle3 import _compute_batch_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loader = build_eagle3_dataloader(
        data_path=str(data_path), tokenizer=tokenizer, seq_length=seq_length, batch_size=4, shuffle=False
    )
    special = [getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")]
    selected, selected_mask = build_eagle3_token_mapping(
        loader, target_vocab_size=model.config.vocab_size, draft_vocab_size=draft_vocab_size, special_token_ids=special
    )
    target = HFEagle3TargetModel(model)
    batches = []
    with torch.no_grad():
        for batch in loader:
            out = target.generate_batch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            batches.append(_compute_batch_cache(out, selected, selected_mask, DTYPE_MAP[dtype], 0))
    return selected, {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def test_smollm2_cache_equals_automodels_precompute_and_trains(tmp_path, smollm2_dir):
    """The demo model on a handful of conversations: same vocabulary, same rows, and a trainer step."""
    from nemo_automodel.components.datasets.llm.eagle3_cache import CachedEagle3Dataset, read_manifest
    from transformers import AutoConfig

    settings = dict(seq_length=96, draft_vocab_size=256, dtype="bf16")
    cache = build_tiny_cache(tmp_path / "run", smollm2_dir, PARITY_ROWS, shard_size=4, batch_size=4, **settings)
    selected, theirs = automodel_precompute(smollm2_dir, tmp_path / "run" / "conversations.jsonl", **settings)
    assert read_manifest(str(cache.cache_dir))["selected_token_ids"] == selected.tolist()

    dataset = CachedEagle3Dataset(str(cache.cache_dir))
    ours = {key: torch.stack([dataset[i][key] for i in range(len(dataset))]) for key in theirs}
    for key in ("input_ids", "attention_mask", "loss_mask", "position_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    content = theirs["attention_mask"].bool()
    for key in ("aux_hidden_states", "target_probs"):
        # Both compute in fp32 on the CPU and round to bf16: at most a few bf16 steps apart, where
        # a step is relative to the value and to the largest value at its position.
        got, want = ours[key][content].float(), theirs[key][content].float()
        scale = want.abs() + want.abs().amax(dim=-1, keepdim=True)
        assert ((got - want).abs() <= 4 * BF16_EPS * scale).all(), key

    trainer = trainer_on(cache.cache_dir, AutoConfig.from_pretrained(smollm2_dir)).to(torch.bfloat16)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    metrics = trainer(**batch)
    metrics.loss.backward()
    assert torch.isfinite(metrics.loss)
