"""Compute one shard: length-bucketed batches through the target, rows streamed to disk by a writer thread.

The main thread only feeds the target. A bounded queue hands each finished batch to a writer
thread that scans it (`scan.ShardScan`, on the device it was computed on), copies it to the host
and writes its rows, so the checks and disk I/O overlap the next forward and at most a few batches
are ever in memory, whatever the shard size. A shard whose scan finds a problem is never committed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_json_atomic
from .cache_rows import CacheBatch, CacheSpec, compute_cache_batch, forward_width
from .errors import CacheConfigError, ShardScanError
from .gpu_lease import checked_cuda_devices
from .layout import samples_in_shard
from .provenance import ids_fingerprint, settings_fingerprint
from .scan import ShardScan
from .shard_format import ShardWriter
from .shard_layout import ShardLayout
from .target import hidden_size, load_target, model_identity, resolve_aux_layer_ids
from .timing import PhaseTimer
from .token_store import TokenBlock, read_token_block, read_tokenized_info, token_rows
from .vocab_selection import read_vocab_selection

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2


MAX_ROW_PADDING = 1 / 8


def forward_budget(tokens_per_forward: int | None, batch_size: int, seq_length: int) -> int:
    """Positions one forward may hold: `tokens_per_forward`, or what a padded batch of `batch_size` rows holds."""
    budget = batch_size * seq_length if tokens_per_forward is None else tokens_per_forward
    if budget < 1:
        raise CacheConfigError(
            f"tokens_per_forward must be at least 1, got {budget}. Fix `tokens_per_forward` in the run's config "
            "(or leave it out for batch_size × seq_length)."
        )
    return budget


def forward_batches(
    lengths: torch.Tensor, seq_length: int, tokens_per_forward: int, target_repr: str = "distribution"
) -> list[list[int]]:
    """Rows grouped into forwards of at most `tokens_per_forward` positions, longest rows first.

    Rows are sorted by length, so a forward's width (see `forward_width`) is that of its first row,
    and it takes the next rows while rows × width fits the budget and the width pads none of them
    by more than `MAX_ROW_PADDING` of its own; a row wider than the budget runs alone. Ties keep
    row order, so the grouping (and thus the bytes written) is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda row: (-int(lengths[row]), row))
    batches: list[list[int]] = []
    width = 0
    for row in order:
        own = forward_width(lengths[row : row + 1], seq_length, target_repr)
        if batches and (len(batches[-1]) + 1) * width <= tokens_per_forward and width <= own * (1 + MAX_ROW_PADDING):
            batches[-1].append(row)
        else:
            batches.append([row])
            width = own
    return batches


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


BatchWrite = Callable[[CacheBatch, list[int]], None]


def on_stream(stream: torch.cuda.Stream | None, ready: torch.cuda.Event | None, work, *args) -> None:
    """`work(*args)` on `stream` once `ready` has fired, off the compute stream (directly on the CPU)."""
    if stream is None:
        work(*args)
        return
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        work(*args)


class RowWriterThread:
    """Consumes finished batches from a bounded queue: scan, host copy, then `write(batch, rows)`."""

    def __init__(self, write: BatchWrite, scan: ShardScan, device: torch.device):
        self.write = write
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

    def stop(self) -> None:
        """End the thread once it has written what it holds, raising nothing: the caller is failing already,
        and must not close the shard under a write still running."""
        with contextlib.suppress(RuntimeError):  # the thread failed, and has ended
            self._put(None)
        self.thread.join()

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
                    self.write(batch, rows)
        except BaseException as error:  # handed to the main thread, which raises it
            self.error = error


@dataclass
class ForwardStats:
    """The positions the target ran per forward, against the budget."""

    budget: int
    forwards: int
    mean: float
    max: int


def forward_stats(positions: Sequence[int], budget: int) -> ForwardStats:
    """Count, mean and max of the positions per forward."""
    return ForwardStats(budget, len(positions), sum(positions) / len(positions), max(positions))


@dataclass
class ShardResult:
    """What one shard job did, for the shard's stats file and the report."""

    num_samples: int
    first_sample: int
    bytes: int
    digest: str  # sparse_digest's
    real_tokens: int
    computed_tokens: int
    padded_tokens: int
    positions_per_forward: ForwardStats
    scan: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardJob:
    """Which shard of a tokenized dataset a job computes, how big its forwards are, and where the shard goes."""

    tokenized_path: str | Path
    num_samples: int
    shard_index: int
    shard_size: int
    batch_size: int
    shard_path: str | Path
    # Positions per forward; None: what a padded batch of `batch_size` rows holds.
    tokens_per_forward: int | None = None
    # Called once the forwards are done, before the commit: frees the job's GPU for the next job.
    forwards_done: Callable[[], None] = lambda: None

    @property
    def first_sample(self) -> int:
        return self.shard_index * self.shard_size

    @property
    def shard_samples(self) -> int:
        return samples_in_shard(self.shard_index, self.num_samples, self.shard_size)

    def read_tokens(self) -> TokenBlock:
        """The shard's rows of the token store."""
        return read_token_block(self.tokenized_path, self.first_sample, self.first_sample + self.shard_samples)

    def budget(self, seq_length: int) -> int:
        """Positions one forward may hold."""
        return forward_budget(self.tokens_per_forward, self.batch_size, seq_length)


@dataclass
class StreamedRows:
    """What `stream_rows` did: the positions of each forward within the budget, the scan of every row
    written, and the writer thread's seconds per phase."""

    positions: list[int]
    budget: int
    scan: ShardScan
    write_seconds: dict[str, float]

    def result_fields(self, job: ShardJob, block: TokenBlock, seq_length: int, timer: PhaseTimer) -> dict[str, Any]:
        """The `ShardResult` fields every output format fills alike."""
        return {
            "num_samples": job.shard_samples,
            "first_sample": job.first_sample,
            "real_tokens": int(block.attention_mask.sum()),
            "computed_tokens": sum(self.positions),
            "padded_tokens": job.shard_samples * seq_length,
            "positions_per_forward": forward_stats(self.positions, self.budget),
            "scan": self.scan.summary.to_json(),
            "seconds": {**timer.seconds, **self.write_seconds},
        }


# Writes one shard in an output format.
ShardComputer = Callable[[nn.Module, CacheSpec, ShardLayout, ShardJob], ShardResult]


def compute_shard(model: nn.Module, spec: CacheSpec, layout: ShardLayout, job: ShardJob) -> ShardResult:
    """Compute shard `job.shard_index` of a tokenized dataset and write it to `job.shard_path` atomically."""
    timer = PhaseTimer(model.get_input_embeddings().weight.device)
    with timer.phase("read"):
        block = job.read_tokens()
    with ShardWriter(job.shard_path, layout, job.shard_samples) as writer:
        streamed = stream_rows(model, spec, layout, job, block, functools.partial(write_batch_rows, writer), timer)
        job.forwards_done()
        # Timed apart: the disk catching up with the writes, then the digest and the rename.
        with timer.phase("fsync"):
            writer.sync()
        with timer.phase("commit"):
            digest = writer.commit()
    return ShardResult(bytes=writer.size, digest=digest, **streamed.result_fields(job, block, layout.seq_length, timer))


def stream_rows(
    model: nn.Module,
    spec: CacheSpec,
    layout: ShardLayout,
    job: ShardJob,
    block: TokenBlock,
    write: BatchWrite,
    timer: PhaseTimer,
) -> StreamedRows:
    """Every row of `block` (the job's shard) through the target in forwards within the job's budget, each
    finished batch scanned and handed to `write` on the writer thread; stops before the commit when the
    scan finds a problem."""
    budget = job.budget(layout.seq_length)
    scan = ShardScan(job.first_sample, block, layout.draft_vocab_size, layout.dtype)
    batches = forward_batches(block.attention_mask.sum(dim=1), layout.seq_length, budget, spec.target_repr)
    positions: list[int] = []
    started = time.perf_counter()
    writer_thread = RowWriterThread(write, scan, model.get_input_embeddings().weight.device)
    try:
        for done, rows in enumerate(batches, start=1):
            batch = compute_cache_batch(model, spec, token_rows(block, rows), timer=timer)
            positions.append(len(rows) * batch.computed["aux_hidden_states"].shape[1])
            writer_thread.submit(batch, rows)
            log_progress(done, len(batches), started)
    except BaseException:
        writer_thread.stop()
        raise
    with timer.phase("drain"):
        writer_thread.finish()
    refuse_failed_scan(scan, job.shard_path)
    return StreamedRows(positions, budget, scan, writer_thread.timer.seconds)


def refuse_failed_scan(scan: ShardScan, shard_path: str | Path) -> None:
    """Stop before the commit when the shard's computed rows fail the scan, naming the field and first sample."""
    if problems := scan.summary.problems():
        raise ShardScanError(
            f"{Path(shard_path).name}: the computed rows fail the scan, so the shard was not written: "
            + "; ".join(problems)
            + ". NaN or Inf come from the target itself or from values beyond dtype fp16's range: "
            "try dtype bf16 or fp32, and run the target on the samples named."
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
    tokens_per_forward: int | None = None,
    compute: ShardComputer = compute_shard,
    start_seconds: float | None = None,
    leased_gpus: Sequence[str] = (),
    release_gpus: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """What a shard job does once it holds its devices: load the target, write the shard and its stats.

    `settings` are the shard rule's params; `batch_size` and `tokens_per_forward` are not among them,
    since they change speed and memory only. `compute` writes the shard in its output format;
    `start_seconds`, the process's start and imports, is recorded beside the load. On CUDA, the GPUs the
    target landed on must be the `leased_gpus` (`gpu_lease.checked_cuda_devices`). Once the forwards are
    done, the target leaves the GPU and `release_gpus` ends the job's lease, so that the commit's disk work
    holds no GPU. Returns the stats written to `stats_path`.
    """
    started = time.perf_counter()
    model = load_target(
        settings["target_model"],
        revision=settings["revision"],
        trust_remote_code=settings["trust_remote_code"],
        device=device,
        dtype=settings["compute_dtype"],
        num_gpus=num_gpus,
    )
    load_seconds = time.perf_counter() - started
    gpu_uuids = checked_cuda_devices(leased_gpus) if device.type == "cuda" else []
    computes_in = next(model.parameters()).dtype
    log.info("loaded %s on %s in %.1fs, computing in %s", settings["target_model"], device, load_seconds, computes_in)
    info = read_tokenized_info(tokenized_path)
    spec, layout = shard_spec_and_layout(
        model,
        selection_path,
        aux_layer_ids=settings["aux_layer_ids"],
        dtype=settings["dtype"],
        target_probs_topk=settings["target_probs_topk"],
        seq_length=settings["seq_length"],
    )
    job = ShardJob(
        tokenized_path,
        info.num_samples,
        shard_index,
        settings["shard_size"],
        batch_size,
        shard_path,
        tokens_per_forward,
        forwards_done=functools.partial(free_devices, model, device, release_gpus),
    )
    identity = model_identity(settings["target_model"], settings["revision"], model)
    # Read before the lease ends, which restores the variable.
    visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    result = compute(model, spec, layout, job)
    result.seconds["load"] = load_seconds
    if start_seconds is not None:
        result.seconds["start"] = start_seconds
    result.seconds["total"] = time.perf_counter() - started
    stats = {
        **asdict(result),
        "shard": shard_index,
        "aux_layer_ids": spec.aux_layer_ids,
        "aux_hidden_dim": layout.aux_hidden_dim,
        "target_vocab_size": spec.target_vocab_size,
        "selected_token_ids_sha256": ids_fingerprint(spec.selected_token_ids.tolist()),
        "settings_fingerprint": settings_fingerprint(settings),
        "model_identity": identity,
        "device": str(device),
        "compute_dtype": str(computes_in).removeprefix("torch."),
        "cuda_visible_devices": visible_devices,
        "gpu_uuids": gpu_uuids,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "batch_size": batch_size,
        "cuda_memory": cuda_memory_peaks() if device.type == "cuda" else [],
    }
    write_json_atomic(stats_path, stats)
    return stats


def cuda_memory_peaks() -> list[dict[str, int]]:
    """Per GPU of this job: the most memory its tensors held (allocated) and the most torch's allocator held
    from the driver (reserved, what other processes could not use)."""
    return [
        {
            "device": index,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(index),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(index),
        }
        for index in range(torch.cuda.device_count())
    ]


def free_devices(model: nn.Module, device: torch.device, release_gpus: Callable[[], None]) -> None:
    """Take the target's weights off the GPU (no copy: they become meta tensors) and return the memory, then
    end the job's lease; on the CPU only the lease (none) ends."""
    if device.type == "cuda":
        model.to_empty(device="meta")
        torch.cuda.empty_cache()
    release_gpus()


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
    aux_layers = resolve_aux_layer_ids(model, aux_layer_ids)
    spec = CacheSpec(aux_layers, torch.from_numpy(selected), target_vocab_size, dtype, target_probs_topk)
    layout = ShardLayout.for_target(seq_length, hidden_size(model), spec.draft_vocab_size, dtype, target_probs_topk)
    return spec, layout


def check_vocab_matches(model: nn.Module, target_vocab_size: int, selection_path: str | Path) -> None:
    """The draft vocabulary must index this target's logits."""
    logits_width = model.get_output_embeddings().weight.shape[0]
    if logits_width != target_vocab_size:
        raise CacheConfigError(
            f"{selection_path} was built for a {target_vocab_size}-token vocabulary, but the target's logits "
            f"have {logits_width}. Delete it (and tokenized.h5) so both are rebuilt for this target_model."
        )
