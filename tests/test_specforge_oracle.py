"""SpecForge 0.2.0 as the oracle: its offline reader, loader, target head and EAGLE-3 trainer on our files.

SpecForge is installed `--no-deps`, only as a test oracle. Under CI (the `CI` environment variable set)
a missing install fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
import torch

from eagle3_cache.layout import VOCAB_MAPPING_FILE
from eagle3_cache.specforge_cache import sample_paths
from eagle3_cache.specforge_format import write_weight_index
from eagle3_cache.token_store import read_token_block
from helpers import PARITY_ROWS, build_tiny_cache

ORACLE = "specforge.runtime.data_plane.offline_reader"
if os.environ.get("CI"):
    __import__(ORACLE)
else:
    pytest.importorskip(
        ORACLE, reason="specforge 0.2.0 is the oracle: pip install --no-deps -r envs/requirements-nodeps-oracle.txt"
    )
pytestmark = pytest.mark.specforge
MAX_LEN = 2048
BF16_EPS = torch.finfo(torch.bfloat16).eps


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, tiny_chat_target):
    """The tiny chat target as SpecForge's TargetHead needs it: with a weight index (a copy, so that the
    shared fixture's identity stays as other tests see it)."""
    path = shutil.copytree(tiny_chat_target, tmp_path_factory.mktemp("target") / "tiny-chat-target")
    write_weight_index(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_target):
    """Our specforge cache of the parity conversations: 6 samples in shards of 4 and 2."""
    return build_tiny_cache(
        tmp_path_factory.mktemp("specforge-oracle") / "run", tiny_target, PARITY_ROWS, shard_size=4, format="specforge"
    )


def manifest_of(cache) -> dict:
    return json.loads((cache.cache_dir / "manifest.json").read_text())


def offline_loader(cache_dir, batch_size: int):
    """SpecForge's offline data path: reader, local store, loader with its collator and normalizer."""
    from specforge.algorithms.eagle3.data import build_offline_collator, build_offline_normalizer
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader
    from specforge.runtime.data_plane.feature_store import LocalFeatureStore
    from specforge.runtime.data_plane.offline_reader import OfflineManifestReader

    refs = OfflineManifestReader(str(cache_dir), max_len=MAX_LEN).read()
    return FeatureDataLoader(
        LocalFeatureStore(),
        refs=refs,
        batch_size=batch_size,
        collate_fn=build_offline_collator(),
        per_sample_transform=build_offline_normalizer(MAX_LEN),
        strategy="eagle3",
        drop_last=False,
    )


def target_head(target_dir, lm_head_key: str):
    from specforge.modeling.target.target_head import TargetHead

    return TargetHead.from_pretrained(str(target_dir), lm_head_key=lm_head_key)


def test_reader_and_store_list_and_load_our_files_in_sample_order(cache):
    from specforge.runtime.data_plane.feature_store import LocalFeatureStore
    from specforge.runtime.data_plane.offline_reader import OfflineManifestReader, list_feature_files

    manifest = manifest_of(cache)
    ours = [str(path.resolve()) for path, _ in sample_paths(cache.cache_dir, manifest)]
    assert list_feature_files(str(cache.cache_dir)) == ours
    refs = OfflineManifestReader(str(cache.cache_dir), validate_files=True).read()
    assert [ref.feature_store_uri for ref in refs] == [f"file://{path}" for path in ours]
    tokens = read_token_block(cache.tokenized, 0, len(PARITY_ROWS))
    store = LocalFeatureStore()
    for index, ref in enumerate(refs):
        tensors, handle = store.get(ref)
        length = int(tokens.attention_mask[index].sum())
        assert ref.num_tokens == length
        assert torch.equal(tensors["input_ids"], tokens.input_ids[index, :length])
        assert torch.equal(tensors["loss_mask"], tokens.loss_mask[index, :length])
        assert tensors["hidden_state"].shape == (1, length, 32)
        assert tensors["aux_hidden_state"].shape == (1, length, 96)
        store.release(handle)


def test_feature_dataloader_batches_our_files(cache):
    batches = list(offline_loader(cache.cache_dir, batch_size=4))
    assert [len(b.sample_ids) for b in batches] == [4, 2]
    tokens = read_token_block(cache.tokenized, 0, len(PARITY_ROWS))
    lengths = tokens.attention_mask.sum(dim=1)
    for start, batch in zip((0, 4), batches, strict=True):
        t = batch.tensors
        rows = slice(start, start + len(batch.sample_ids))
        width = int(lengths[rows].max())
        assert t["hidden_state"].shape == (len(batch.sample_ids), width, 96)
        assert t["target"].shape == (len(batch.sample_ids), width, 32)
        assert t["hidden_state"].dtype == t["target"].dtype == torch.bfloat16
        assert torch.equal(t["attention_mask"].sum(dim=1), lengths[rows])
        assert batch.metadata["target_repr"] == "hidden_state"


@pytest.mark.parametrize("model_fixture", ["tiny_target", "smollm2_dir"])
def test_target_head_turns_our_hidden_state_into_the_live_targets_logits(request, tmp_path, model_fixture):
    """`_prepare_eagle_target` with SpecForge's TargetHead, loaded from our target checkpoint (the demo
    model is tied: its lm_head_key is the embedding's), against the live target's own logits."""
    from specforge.training.strategies.base import _prepare_eagle_target
    from transformers import AutoModelForCausalLM

    target_dir = request.getfixturevalue(model_fixture)
    cache = build_tiny_cache(tmp_path / "run", target_dir, PARITY_ROWS, seq_length=96, shard_size=4, format="specforge")
    manifest = manifest_of(cache)
    head = target_head(target_dir, manifest["lm_head_key"])
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    for batch in offline_loader(cache.cache_dir, batch_size=3):
        t = batch.tensors
        input_ids, logits, loss_mask = _prepare_eagle_target(
            target_head=head,
            target_repr="hidden_state",
            input_ids=t["input_ids"],
            target=t["target"],
            loss_mask=t["loss_mask"],
            device=torch.device("cpu"),
        )
        assert logits.shape == (*t["input_ids"].shape, model.config.vocab_size)
        with torch.no_grad():
            live = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        for row, length in enumerate(t["attention_mask"].sum(dim=1).tolist()):
            # SpecForge shifts left by one: position p holds the logits the target computes at p + 1.
            assert torch.equal(input_ids[row, : length - 1], t["input_ids"][row, 1:length])
            # bf16 hidden state, head and product against fp32 logits: within the parity tests' 4 bf16
            # steps, relative to the value and to the largest logit at its position.
            got, want = logits[row, : length - 1].float(), live[row, 1:length]
            scale = want.abs() + want.abs().amax(dim=-1, keepdim=True)
            assert ((got - want).abs() <= 4 * BF16_EPS * scale).all()
        assert loss_mask.shape == (*t["input_ids"].shape, 1)


class PureTorchLogSoftmaxLoss(torch.autograd.Function):
    """SpecForge's `LogSoftmaxLoss` (a Triton kernel, GPU only) as plain torch, for a CPU step.

    The same value as its reference `_compute_loss`: -sum(position_mask * target_p * log_softmax(logits))
    over the vocabulary, averaged over batch and positions.
    """

    @staticmethod
    def forward(ctx, logits, target_p, position_mask):
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            loss = -(position_mask * target_p * torch.log_softmax(leaf.float(), dim=-1)).sum(dim=-1).mean()
        (grad,) = torch.autograd.grad(loss, leaf)
        ctx.save_for_backward(grad)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


@pytest.fixture()
def eagle3_model_module(monkeypatch):
    """`specforge.algorithms.eagle3.model` imported with `specforge.core.loss` (which needs triton) replaced
    by the pure-torch loss, and torch.compile off (a CPU compile of its helpers is slow)."""
    loss_module = types.ModuleType("specforge.core.loss")
    loss_module.LogSoftmaxLoss = PureTorchLogSoftmaxLoss
    monkeypatch.setitem(sys.modules, "specforge.core.loss", loss_module)
    monkeypatch.delitem(sys.modules, "specforge.algorithms.eagle3.model", raising=False)
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    import specforge.algorithms.eagle3.model as module

    yield module
    sys.modules.pop("specforge.algorithms.eagle3.model", None)


def tiny_draft(target_dir, draft_vocab_size: int):
    """A one-layer LlamaForCausalLMEagle3, configured from the target as SpecForge generates a draft config."""
    from specforge.modeling.auto import AutoDraftModel
    from transformers import AutoConfig, LlamaConfig

    target = AutoConfig.from_pretrained(target_dir).to_dict()
    config = LlamaConfig(
        **{key: target[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        num_key_value_heads=target["num_key_value_heads"],
        num_hidden_layers=1,
        draft_vocab_size=draft_vocab_size,
        architectures=["LlamaForCausalLMEagle3"],
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoDraftModel.from_config(config, attention_backend="sdpa")


def test_one_eagle3_training_step_on_our_files(eagle3_model_module, cache, tiny_target):
    from specforge.core.compact_teacher import validate_vocab_mapping_consistency
    from specforge.training.strategies.base import Eagle3TrainStrategy

    manifest = manifest_of(cache)
    draft = tiny_draft(tiny_target, manifest["draft_vocab_size"])
    draft.load_vocab_mapping(str(cache.cache_dir / VOCAB_MAPPING_FILE))
    validate_vocab_mapping_consistency(draft.t2d, draft.d2t)
    assert (torch.arange(draft.d2t.numel()) + draft.d2t).tolist() == sorted(manifest["selected_token_ids"])
    draft.load_embedding(str(tiny_target), embedding_key="model.embed_tokens.weight")
    draft.freeze_embedding()
    model = eagle3_model_module.OnlineEagle3Model(draft, length=2, attention_backend="sdpa").to(torch.bfloat16)
    strategy = Eagle3TrainStrategy(model, target_head=target_head(tiny_target, manifest["lm_head_key"]))
    batch = next(iter(offline_loader(cache.cache_dir, batch_size=2)))
    step = strategy.forward_loss(batch)
    assert torch.isfinite(step.loss)
    step.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
