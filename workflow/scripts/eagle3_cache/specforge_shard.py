"""A shard job in the specforge format: the shard's samples through the target, one file each, into a directory.

A shard is built in a staging directory beside the cache directory, not inside it (SpecForge would read
a half-written shard there), and renamed onto its final name whole.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import fsync_directory, fsync_file
from .cache_rows import CacheBatch, CacheSpec
from .errors import CacheConfigError
from .pipeline import ShardJob, ShardResult, stream_rows
from .shard_layout import ShardLayout
from .sparse_digest import bytes_digest
from .specforge_cache import records_digest
from .specforge_format import TARGET_REPR, lm_head_key, sample_tensors, serialized
from .specforge_layout import sample_file_name, staging_dir_for
from .target import hidden_size
from .timing import PhaseTimer
from .token_store import TokenBlock

# Threads writing, digesting and, at the commit, fsyncing sample files: each mostly waits on memory or disk,
# with the GIL released, beside the next sample's serialization (which holds it).
WRITE_THREADS = 4


class ShardDirectoryWriter:
    """Write one shard's sample files into a staging directory, in any order, then rename it into place.

    If `commit()` is never reached the staging directory is removed and nothing appears under the
    shard's name.
    """

    def __init__(self, shard_dir: str | os.PathLike, block: TokenBlock, first_sample: int):
        self.path = Path(shard_dir)
        self.staging = staging_dir_for(self.path)
        self.block = block
        self.first_sample = first_sample
        self.files: dict[int, dict[str, Any]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="sample-writer")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def write_batch(self, batch: CacheBatch, rows: list[int]) -> None:
        """Write one file per row of a host batch computed with `target_repr=TARGET_REPR`."""
        pending: dict[int, concurrent.futures.Future] = {}
        for i, row in enumerate(rows):
            length = int(batch.lengths[i])
            sample = sample_tensors(
                self.block.input_ids[row, :length],
                self.block.loss_mask[row, :length],
                batch.computed["final_hidden_state"][i, :length],
                batch.computed["aux_hidden_states"][i, :length],
            )
            name = sample_file_name(self.first_sample + row)
            data = serialized(sample)
            # Digest and write release the GIL: they run beside the next sample's serialization.
            pending[row] = self.pool.submit(self.stored_record, name, length, data)
        self.files.update({row: future.result() for row, future in pending.items()})

    def stored_record(self, name: str, length: int, data: bytes) -> dict[str, Any]:
        """The file written (made durable at the commit, all at once: the kernel writes it back meanwhile)
        and its record."""
        (self.staging / name).write_bytes(data)
        return {"file": name, "num_tokens": length, "bytes": len(data), "digest": bytes_digest(data)}

    def commit(self) -> list[dict[str, Any]]:
        """Make the sample files durable, then rename the staging directory onto the shard's name; returns the
        file records in sample order."""
        list(self.pool.map(fsync_file, (self.staging / record["file"] for record in self.files.values())))
        self.pool.shutdown()
        fsync_directory(self.staging)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging, self.path)
        fsync_directory(self.path.parent)
        return [self.files[row] for row in sorted(self.files)]

    def abort(self) -> None:
        """Drop the staging directory; the shard's name is never touched."""
        self.pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ShardDirectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(kw_only=True)
class SpecForgeShardResult(ShardResult):
    """A shard job's result in the specforge format: `ShardResult` plus what the manifest records."""

    hidden_size: int
    lm_head_key: str
    files: list[dict[str, Any]]


def compute_specforge_shard(
    model: nn.Module, spec: CacheSpec, layout: ShardLayout, job: ShardJob
) -> SpecForgeShardResult:
    """`compute_shard` for the specforge format: shard `job.shard_index` as the directory `job.shard_path`."""
    if spec.dtype != "bf16":
        raise CacheConfigError(
            f"the specforge format stores bf16 (SpecForge's TargetHead multiplies in bf16), not {spec.dtype}: "
            "set `dtype: bf16` for this run."
        )
    spec = dataclasses.replace(spec, target_repr=TARGET_REPR)
    timer = PhaseTimer(model.get_input_embeddings().weight.device)
    with timer.phase("read"):
        block = job.read_tokens()
    with ShardDirectoryWriter(job.shard_path, block, job.first_sample) as writer:
        streamed = stream_rows(model, spec, layout, job, block, writer.write_batch, timer)
        job.forwards_done()
        with timer.phase("commit"):
            files = writer.commit()
    return SpecForgeShardResult(
        bytes=sum(f["bytes"] for f in files),
        digest=records_digest(files),
        **streamed.result_fields(job, block, layout.seq_length, timer),
        hidden_size=hidden_size(model),
        lm_head_key=lm_head_key(model),
        files=files,
    )
