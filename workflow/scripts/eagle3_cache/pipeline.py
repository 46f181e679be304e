"""Compute one shard: length-bucketed batches through the target, rows streamed to disk by a writer thread.

The main thread only feeds the target. A bounded queue hands each finished batch to a writer
thread that scans it (`scan.ShardScan`, on the device it was computed on), copies it to the host
and writes its rows, so the checks and disk I/O overlap the next forward and at most a few batches
are ever in memory, whatever the shard size. A shard whose scan finds a problem is never committed.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_json_atomic
from .cache_rows import CacheBatch, CacheSpec, compute_cache_batch
from .errors import CacheConfigError, ShardScanError
from .layout import samples_in_shard
from .provenance import ids_fingerprint, settings_fingerprint
from .scan import ShardScan
from .shard_format import ShardLayout, ShardWriter
from .target import hidden_size, load_target, model_identity, resolve_aux_layer_ids
from .timing import PhaseTimer
from .token_store import TokenBlock, read_token_block, read_tokenized_info
from .vocab import read_vocab_selection

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2


def length_buckets(lengths: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Rows grouped into batches of similar length, longest first, so trimming saves the most.

    Ties keep row order, so the grouping (and thus the bytes written) is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda row: (-int(lengths[row]), row))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_rows(block: TokenBlock, rows: list[int]) -> TokenBlock:
    """The selected rows of a token block."""
    index = torch.tensor(rows)
    return TokenBlock(
        input_ids=block.input_ids[index],
        attention_mask=block.attention_mask[index],
        loss_mask=block.loss_mask[index],
    )


def host_batch(batch: CacheBatch, ready: torch.cuda.Event | None, stream: torch.cuda.Stream | None) -> CacheBatch:
    """`batch` on the CPU; on CUDA copied on a side stream into pinned memory, off the compute stream."""
    if stream is None:
        return batch.cpu()
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        computed = {
            name: torch.empty(values.shape, dtype=values.dtype, pin_memory=True).copy_(values, non_blocking=True)
            for name, values in batch.computed.items()
        }
    stream.synchronize()
    return CacheBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, computed, batch.lengths)


def write_batch_rows(writer: ShardWriter, batch: CacheBatch, rows: list[int]) -> None:
    """Write each sample's full-width fields and the content prefix of its computed fields."""
    for i, row in enumerate(rows):
        length = int(batch.lengths[i])
        for name, values in batch.full_width_fields.items():
            writer.write_row(row, name, values[i])
        for name, values in batch.computed.items():
            writer.write_row(row, name, values[i, :length])


def on_stream(stream: torch.cuda.Stream | None, ready: torch.cuda.Event | None, work, *args) -> None:
    """`work(*args)` on `stream` once `ready` has fired, off the compute stream (directly on the CPU)."""
    if stream is None:
        work(*args)
        return
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        work(*args)


class RowWriterThread:
    """Consumes finished batches from a bounded queue: scan, host copy, then row writes."""

    def __init__(self, writer: ShardWriter, scan: ShardScan, device: torch.device):
        self.writer = writer
        self.scan = scan
        self.timer = PhaseTimer(torch.device("cpu"))
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def submit(self, batch: CacheBatch, rows: list[int]) -> None:
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self._put((batch, rows, ready))

    def finish(self) -> None:
        """Wait until every submitted batch is on disk; re-raise a writer failure."""
        self._put(None)
        self.thread.join()
        self._raise_if_failed()

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError("the shard writer thread failed") from self.error

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                batch, rows, ready = item
                with self.timer.phase("scan"):
                    on_stream(self.stream, ready, self.scan.add_batch, batch, rows)
                with self.timer.phase("copy"):
                    batch = host_batch(batch, ready, self.stream)
                with self.timer.phase("write"):
                    write_batch_rows(self.writer, batch, rows)
        except BaseException as error:  # handed to the main thread, which raises it
            self.error = error


@dataclass
class ShardResult:
    """What one shard job did, for the shard's stats file and the report."""

    num_samples: int
    first_sample: int
    bytes: int
    sha256: str
    real_tokens: int
    computed_tokens: int
    padded_tokens: int
    scan: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def compute_shard(
    model: nn.Module,
    spec: CacheSpec,
    layout: ShardLayout,
    *,
    tokenized_path: str | Path,
    num_samples: int,
    shard_index: int,
    shard_size: int,
    batch_size: int,
    shard_path: str | Path,
) -> ShardResult:
    """Compute shard `shard_index` of a tokenized dataset and write it to `shard_path` atomically."""
    device = model.get_input_embeddings().weight.device
    timer = PhaseTimer(device)
    first = shard_index * shard_size
    count = samples_in_shard(shard_index, num_samples, shard_size)
    with timer.phase("read"):
        block = read_token_block(tokenized_path, first, first + count)
    lengths = block.attention_mask.sum(dim=1)
    buckets = length_buckets(lengths, batch_size)
    scan = ShardScan(first, block, layout.draft_vocab_size, spec.cache_dtype)
    computed_tokens = 0
    started = time.perf_counter()
    with ShardWriter(shard_path, layout, count) as writer:
        writer_thread = RowWriterThread(writer, scan, device)
        for done, rows in enumerate(buckets, start=1):
            batch = compute_cache_batch(model, spec, token_rows(block, rows), timer=timer)
            computed_tokens += len(rows) * batch.computed["aux_hidden_states"].shape[1]
            writer_thread.submit(batch, rows)
            log_progress(done, len(buckets), started)
        with timer.phase("drain"):
            writer_thread.finish()
        if problems := scan.summary.problems():
            raise ShardScanError(
                f"{Path(shard_path).name}: the computed rows fail the scan, so the shard was not written: "
                + "; ".join(problems)
                + ". NaN or Inf come from the target itself or from values beyond dtype fp16's range: "
                "try dtype bf16 or fp32, and run the target on the samples named."
            )
        with timer.phase("commit"):
            sha256 = writer.commit()
    seconds = {**timer.seconds, **writer_thread.timer.seconds}
    return ShardResult(
        num_samples=count,
        first_sample=first,
        bytes=writer.size,
        sha256=sha256,
        real_tokens=int(lengths.sum()),
        computed_tokens=computed_tokens,
        padded_tokens=count * layout.seq_length,
        scan=scan.summary.to_json(),
        seconds=dict(seconds),
    )


def log_progress(done: int, total: int, started: float) -> None:
    """A progress line with an ETA, about ten per shard."""
    if done == total or done % max(1, total // 10) == 0:
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total - done)
        log.info("batch %d/%d, %.1fs elapsed, ETA %.1fs", done, total, elapsed, eta)


def run_shard_job(
    settings: Mapping[str, Any],
    *,
    tokenized_path: str | Path,
    selection_path: str | Path,
    shard_index: int,
    batch_size: int,
    device: torch.device,
    num_gpus: int,
    shard_path: str | Path,
    stats_path: str | Path,
) -> dict[str, Any]:
    """What a shard job does once it holds its devices: load the target, write the shard and its stats.

    `settings` are the shard rule's params. Returns the stats written to `stats_path`.
    """
    started = time.perf_counter()
    model = load_target(
        settings["target_model"],
        revision=settings["revision"],
        trust_remote_code=settings["trust_remote_code"],
        device=device,
        num_gpus=num_gpus,
    )
    load_seconds = time.perf_counter() - started
    log.info("loaded %s on %s in %.1fs", settings["target_model"], device, load_seconds)
    info = read_tokenized_info(tokenized_path)
    spec, layout = shard_spec_and_layout(
        model,
        selection_path,
        aux_layer_ids=settings["aux_layer_ids"],
        dtype=settings["dtype"],
        target_probs_topk=settings["target_probs_topk"],
        seq_length=settings["seq_length"],
    )
    result = compute_shard(
        model,
        spec,
        layout,
        tokenized_path=tokenized_path,
        num_samples=info.num_samples,
        shard_index=shard_index,
        shard_size=settings["shard_size"],
        batch_size=batch_size,
        shard_path=shard_path,
    )
    result.seconds["load"] = load_seconds
    result.seconds["total"] = time.perf_counter() - started
    stats = {
        **asdict(result),
        "shard": shard_index,
        "aux_layer_ids": spec.aux_layer_ids,
        "aux_hidden_dim": layout.aux_hidden_dim,
        "target_vocab_size": spec.target_vocab_size,
        "selected_token_ids_sha256": ids_fingerprint(spec.selected_token_ids.tolist()),
        "settings_fingerprint": settings_fingerprint(settings),
        "model_identity": model_identity(settings["target_model"], settings["revision"], model),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "batch_size": batch_size,
    }
    write_json_atomic(stats_path, stats)
    return stats


def shard_spec_and_layout(
    model: nn.Module,
    selection_path: str | Path,
    *,
    aux_layer_ids: Sequence[int] | None,
    dtype: str,
    target_probs_topk: int,
    seq_length: int,
) -> tuple[CacheSpec, ShardLayout]:
    """What the shards of a cache hold for this target and draft vocabulary, and their layout."""
    selected, target_vocab_size = read_vocab_selection(selection_path)
    check_vocab_matches(model, target_vocab_size, selection_path)
    spec = CacheSpec(resolve_aux_layer_ids(model, aux_layer_ids), selected, target_vocab_size, dtype, target_probs_topk)
    layout = ShardLayout(seq_length, 3 * hidden_size(model), spec.draft_vocab_size, dtype, target_probs_topk)
    return spec, layout


def check_vocab_matches(model: nn.Module, target_vocab_size: int, selection_path: str | Path) -> None:
    """The draft vocabulary must index this target's logits."""
    logits_width = model.get_output_embeddings().weight.shape[0]
    if logits_width != target_vocab_size:
        raise CacheConfigError(
            f"{selection_path} was built for a {target_vocab_size}-token vocabulary, but the target's logits "
            f"have {logits_width}. Delete it (and tokenized.h5) so both are rebuilt for this target_model."
        )
