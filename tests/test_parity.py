"""The parity rule under reduced precision: bf16 noise passes, a real error fails.

The rows are the demo model's own (SmolLM2-135M-Instruct, real weights) on demo conversations,
computed on the CPU by the shards' function in bf16 and in fp32, as a CUDA run and a CPU run do;
then the live parity job's path on a tiny cache of each format, re-checked by a bf16 target.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle3_cache.cache_rows import CacheSpec, compute_cache_batch
from eagle3_cache.parity import parity_outcome
from eagle3_cache.target import resolve_aux_layer_ids
from eagle3_cache.token_store import read_token_rows
from eagle3_cache.tolerance import Tolerance, parity_tolerance
from eagle3_cache.vocab import build_vocab_selection
from helpers import build_tiny_cache, check_tiny_parity, conversation, tokenize_to_store
from tools.benchmark.workload import DEMO_CONVERSATIONS

BF16, FP32 = torch.bfloat16, torch.float32
SAMPLES = 8
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory, smollm2_dir):
    """Each sample's rows, by name of how they were computed: bf16 four rows a forward and one a
    forward, fp32 four rows a forward, and bf16 with another low aux layer."""
    work = tmp_path_factory.mktemp("parity-rows")
    lines = DEMO_CONVERSATIONS.read_text().splitlines()[:SAMPLES]
    data = work / "conversations.jsonl"
    data.write_text("\n".join(lines) + "\n")
    tokenized = tokenize_to_store(work / "tokenized.h5", AutoTokenizer.from_pretrained(smollm2_dir), data, 256)
    selection = build_vocab_selection(tokenized, 1024, work / "vocab_selection.pt", work / "counts.pt")
    models = {dtype: AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).eval() for dtype in (BF16, FP32)}

    def rows(dtype: torch.dtype, per_forward: int, aux_layer_ids=None) -> dict[int, dict[str, torch.Tensor]]:
        model = models[dtype]
        spec = CacheSpec(
            aux_layer_ids=resolve_aux_layer_ids(model, aux_layer_ids),
            selected_token_ids=selection.selected,
            target_vocab_size=model.config.vocab_size,
            dtype="bf16",
            target_probs_topk=0,
        )
        out = {}
        for start in range(0, SAMPLES, per_forward):
            samples = list(range(start, min(start + per_forward, SAMPLES)))
            fields = compute_cache_batch(model, spec, read_token_rows(tokenized, samples)).cpu().padded()
            for i, sample in enumerate(samples):
                out[sample] = {name: values[i] for name, values in fields.items()}
        return out

    default_aux = resolve_aux_layer_ids(models[BF16], None)
    return {
        "bf16 batched": rows(BF16, 4),
        "bf16 single": rows(BF16, 1),
        "fp32 batched": rows(FP32, 4),
        "bf16 other aux layer": rows(BF16, 1, [default_aux[0] + 1, *default_aux[1:]]),
    }


def outcome(live: dict, stored: dict, compute_dtypes: set[torch.dtype]):
    return parity_outcome(
        ((sample, live[sample], stored[sample]) for sample in sorted(stored)),
        shard_size=SHARD_SIZE,
        draft_vocab_size=1024,
        cache_dtype=BF16,
        compute_dtypes=compute_dtypes,
    )


def shifted_by_one(rows: dict) -> dict:
    """Every sample's computed fields moved one position earlier: a misaligned row."""
    shifted = {}
    for sample, fields in rows.items():
        moved = dict(fields)
        for name in ("aux_hidden_states", "target_probs"):
            moved[name] = torch.cat([fields[name][1:], fields[name][-1:]])
        shifted[sample] = moved
    return shifted


def test_the_tolerance_follows_the_compute_dtypes():
    assert parity_tolerance(BF16, {FP32}) == Tolerance(torch.finfo(BF16).eps, reduced_precision=False)
    assert parity_tolerance(FP32, {FP32}) == Tolerance(torch.finfo(FP32).eps, reduced_precision=False)
    reduced = parity_tolerance(BF16, {BF16, FP32})
    assert reduced.reduced_precision and reduced.max_distance == 0.125
    assert [reduced.outliers_allowed(n) for n in (10, 100, 512)] == [1, 2, 10]
    assert parity_tolerance(BF16, {FP32}).outliers_allowed(512) == 0


def test_a_bf16_recomputation_in_forwards_of_another_shape_passes(demo_rows):
    """What live parity sees on CUDA: the shard's bf16 rows against one sample a forward, also in bf16."""
    verdict = outcome(demo_rows["bf16 single"], demo_rows["bf16 batched"], {BF16})
    assert not verdict.problems, verdict.problems
    # The units-of-rounding rule of fp32 compute would report this bf16 noise as a failure.
    assert outcome(demo_rows["bf16 single"], demo_rows["bf16 batched"], {FP32}).problems


def test_bf16_compute_against_fp32_compute_passes(demo_rows):
    """What the GPU-ready check's parity step compares: a CUDA (bf16) shard against a CPU (fp32) one."""
    verdict = outcome(demo_rows["bf16 batched"], demo_rows["fp32 batched"], {BF16, FP32})
    assert not verdict.problems, verdict.problems
    distances = {row["field"]: row["max_distance"] for row in verdict.fields if "max_distance" in row}
    assert 0 < distances["aux_hidden_states"] and 0 < distances["target_probs"] < 0.5


@pytest.mark.parametrize(
    "name, expected_fields",
    [
        ("shifted", {"aux_hidden_states", "target_probs"}),
        ("bf16 other aux layer", {"aux_hidden_states"}),
    ],
)
def test_a_real_error_fails_every_sample_under_bf16(demo_rows, name, expected_fields):
    live = demo_rows["bf16 single"]
    stored = shifted_by_one(demo_rows["bf16 batched"]) if name == "shifted" else demo_rows[name]
    problems = outcome(live, stored, {BF16}).problems
    for sample in range(SAMPLES):
        failed = {field for field in expected_fields if any(f"sample {sample} " in p and field in p for p in problems)}
        assert failed == expected_fields, (sample, problems)


def test_a_nan_at_one_position_fails_under_bf16(demo_rows):
    stored = copy.deepcopy(demo_rows["bf16 batched"])
    stored[2]["aux_hidden_states"][5, 3] = float("nan")
    [problem] = outcome(demo_rows["bf16 single"], stored, {BF16}).problems
    assert "sample 2 " in problem and "aux_hidden_states" in problem and "1 of " in problem


@pytest.mark.parametrize("format", ["automodel", "specforge"])
def test_live_parity_by_a_bf16_target_passes_a_cache_computed_in_fp32(tmp_path, tiny_chat_target, format):
    """The live parity job's own path: a CPU-built (fp32) cache re-checked by the target loaded in bf16."""
    rows = [conversation(i) for i in range(8)]
    cache = build_tiny_cache(tmp_path / "run", tiny_chat_target, rows, shard_size=4, format=format)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_target, dtype=BF16).eval()
    check_tiny_parity(cache, model, num_samples=4)
    result = json.loads(cache.parity.read_text())
    assert result["passed"], result["details"]
    assert result["figures"]["tolerance"].startswith("per position")


def test_live_parity_by_another_bf16_target_fails(tmp_path, tiny_chat_target):
    """A cache of one target checked against another (here: its weights re-drawn) fails under the bf16 rule."""
    cache = build_tiny_cache(tmp_path / "run", tiny_chat_target, [conversation(i) for i in range(8)], shard_size=4)
    other = AutoModelForCausalLM.from_pretrained(tiny_chat_target, dtype=BF16).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.copy_(torch.randn_like(parameter) * parameter.float().std().to(BF16))
    check_tiny_parity(cache, other, num_samples=4)
    result = json.loads(cache.parity.read_text())
    assert not result["passed"] and any("positions beyond tolerance" in line for line in result["details"])
