"""The reference's side, in a child process: NeMo Automodel 0.7.0's precompute loop on the same workload."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .measure import current_rss_mib, stopwatch, timed
from .workload import SHUFFLE_SEED, Workload


class TimedBatches:
    """A data loader's batches, adding up the time spent producing them (for Automodel: tokenizing)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.seconds = 0.0

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch


def run_reference(job: dict) -> dict:
    """Automodel's precompute loop as its CLI `_run` assembles it, minus the manifest and embeddings.

    Its own model loader needs CUDA, so the model comes from plain transformers in the dtype
    `_run` picks (bf16 on CUDA, fp32 on CPU).
    """
    import logging

    from nemo_automodel.components.datasets.llm.eagle3 import build_eagle3_dataloader, build_eagle3_token_mapping
    from nemo_automodel.components.datasets.llm.eagle3_cache import DTYPE_MAP, write_shard
    from nemo_automodel.components.datasets.llm.offline_cache import write_cache_shards
    from nemo_automodel.components.speculative.eagle import HFEagle3TargetModel
    from nemo_automodel.components.speculative.precompute_eagle3 import _compute_batch_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eagle3_cache.target import compute_dtype, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    tokenizer = AutoTokenizer.from_pretrained(workload.model)
    model, load_seconds = timed(
        lambda: AutoModelForCausalLM.from_pretrained(workload.model, dtype=compute_dtype(device)).to(device)
    )
    loaded_rss = current_rss_mib()
    target = HFEagle3TargetModel(model, aux_layer_ids=None)
    dataloader = build_eagle3_dataloader(
        data_path=workload.conversations,
        tokenizer=tokenizer,
        seq_length=workload.seq_length,
        batch_size=workload.batch_size,
        shuffle=False,
        num_workers=0,
        split=None,
        distributed=False,
        shuffle_seed=SHUFFLE_SEED,
    )
    special_token_ids = [
        getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    ]
    (selected_ids, selected_mask), vocab_seconds = timed(
        lambda: build_eagle3_token_mapping(
            dataloader,
            target_vocab_size=int(model.config.vocab_size),
            draft_vocab_size=workload.draft_vocab_size,
            special_token_ids=special_token_ids,
        )
    )
    output = Path(job["output"])
    output.mkdir(parents=True, exist_ok=True)
    torch.save(selected_ids, output / "selected_token_ids.pt")
    selected_ids, selected_mask = selected_ids.to(device), selected_mask.to(device)
    counts = {"samples": 0, "real_tokens": 0}

    def compute_from_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts["samples"] += int(batch["input_ids"].shape[0])
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        with torch.no_grad():
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            target_batch = target.generate_batch(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"]
            )
            return _compute_batch_cache(target_batch, selected_ids, selected_mask, DTYPE_MAP[workload.dtype], 0)

    batches = TimedBatches(dataloader)
    with stopwatch() as elapsed:
        write_cache_shards(
            dataloader=batches,
            output_dir=str(output),
            shard_size=workload.shard_size,
            start_shard_index=0,
            compute_batch=compute_from_batch,
            write_shard_fn=write_shard,
            logger=logging.getLogger("reference"),
        )
    return {
        **counts,
        "computed_tokens": counts["samples"] * workload.seq_length,
        "seconds": elapsed.wall,
        "cpu_seconds": elapsed.cpu,
        "tokenize_in_loop_seconds": batches.seconds,
        "vocab_seconds": vocab_seconds,
        "load_seconds": load_seconds,
        "loaded_rss_mib": loaded_rss,
    }
