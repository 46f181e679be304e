"""How fast a shard job's writer puts finished forwards on disk, with no model: bytes per second for both formats.

Feeds the writer the batches a forward of an 8B target would hand it (Llama-3.1-8B's widths: three aux
layers of 4096, a `--draft-vocab` distribution, bf16; `--rows` rows of `--length` content positions per
forward), through the shard job's own writer thread and queue, and times each format until its shard is
committed: the writes alone (page cache), then the commit (fsync, digest, rename). It prints the bytes per
second of each and the real tokens per second of the target the writer would keep up with.

    python -m tools.writer_throughput --workdir /tmp/writer
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import torch

from eagle3_cache.cache_rows import CacheBatch
from eagle3_cache.pipeline import RowWriterThread, write_batch_rows
from eagle3_cache.scan_summary import ScanSummary
from eagle3_cache.shard_format import ShardWriter
from eagle3_cache.shard_layout import ShardLayout
from eagle3_cache.specforge_shard import ShardDirectoryWriter
from eagle3_cache.token_store import TokenBlock

SEQ_LENGTH, HIDDEN = 2048, 4096


class NoScan:
    """The writer thread's scan, left out: on a GPU it runs on the device, not on the writer's CPU."""

    summary = ScanSummary()

    def add_batch(self, batch: CacheBatch, rows: list[int]) -> None:
        pass


def forwards(rows: int, length: int, forwards: int, draft_vocab: int) -> list[tuple[CacheBatch, list[int]]]:
    """`forwards` batches of `rows` rows, each `length` positions of content, as a forward hands them over."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (rows, SEQ_LENGTH), generator=generator)
    mask = (torch.arange(SEQ_LENGTH) < length).long().expand(rows, -1).contiguous()
    computed = {
        "aux_hidden_states": torch.randn(rows, length, 3 * HIDDEN, generator=generator).to(torch.bfloat16),
        "final_hidden_state": torch.randn(rows, length, HIDDEN, generator=generator).to(torch.bfloat16),
        "position_mask": torch.ones(rows, length, 1, dtype=torch.bool),
        "target_probs": torch.rand(rows, length, draft_vocab, generator=generator).to(torch.bfloat16),
    }
    lengths = torch.full((rows,), length)
    return [
        (CacheBatch(ids, mask, mask, computed, lengths), list(range(index * rows, (index + 1) * rows)))
        for index in range(forwards)
    ]


def automodel_batch(batch: CacheBatch) -> CacheBatch:
    computed = {name: values for name, values in batch.computed.items() if name != "final_hidden_state"}
    return CacheBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, computed, batch.lengths)


def specforge_batch(batch: CacheBatch) -> CacheBatch:
    keep = ("aux_hidden_states", "final_hidden_state")
    computed = {name: values for name, values in batch.computed.items() if name in keep}
    return CacheBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, computed, batch.lengths)


def timed_writes(write, commit, batches: list[tuple[CacheBatch, list[int]]]) -> tuple[float, float]:
    """Seconds to hand every batch to the writer thread and see it written, then to commit."""
    started = time.perf_counter()
    thread = RowWriterThread(write, NoScan(), torch.device("cpu"))
    for batch, rows in batches:
        thread.submit(batch, rows)
    thread.finish()
    written = time.perf_counter()
    commit()
    return written - started, time.perf_counter() - written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--forwards", type=int, default=4)
    parser.add_argument("--draft-vocab", type=int, default=32000)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    batches = forwards(args.rows, args.length, args.forwards, args.draft_vocab)
    samples, tokens = args.rows * args.forwards, args.rows * args.forwards * args.length
    print(f"{args.forwards} forwards of {args.rows} rows x {args.length} positions: {tokens:,} real tokens")
    print("| format | GB written | write s | GB/s | commit s | GB/s with commit | real tokens/s it keeps up with |")
    print("|---|---|---|---|---|---|---|")

    layout = ShardLayout(SEQ_LENGTH, 3 * HIDDEN, args.draft_vocab, "bf16", 0)
    with ShardWriter(args.workdir / "shard-000000.safetensors", layout, samples) as writer:
        write = functools.partial(write_batch_rows, writer)
        automodel = [(automodel_batch(batch), rows) for batch, rows in batches]
        write_s, commit_s = timed_writes(write, writer.commit, automodel)
    written = sum(v.numel() * v.element_size() for b, _ in automodel for v in b.computed.values())
    report("automodel", written, write_s, commit_s, tokens)

    ids = batches[0][0].input_ids.repeat(args.forwards, 1)
    block = TokenBlock(ids, batches[0][0].attention_mask.repeat(args.forwards, 1), ids)
    writer = ShardDirectoryWriter(args.workdir / "shard-000000", block, 0)
    specforge = [(specforge_batch(batch), rows) for batch, rows in batches]
    write_s, commit_s = timed_writes(writer.write_batch, writer.commit, specforge)
    written = sum(record["bytes"] for record in writer.files.values())
    report("specforge", written, write_s, commit_s, tokens)


def report(name: str, written: int, write_s: float, commit_s: float, tokens: int) -> None:
    total = write_s + commit_s
    print(
        f"| {name} | {written / 1e9:.2f} | {write_s:.2f} | {written / 1e9 / write_s:.2f} | {commit_s:.2f} "
        f"| {written / 1e9 / total:.2f} | {tokens / total:,.0f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
