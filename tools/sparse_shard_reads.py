"""What a shard's commit digest and its verification read, on an 8B-shaped shard whose padding is holes.

Writes one shard of Llama-3.1-8B's layout (three aux layers of 4096, `--draft-vocab` ids, `seq_length`
2048, bf16) with the package's writer, every sample `--content` of its positions long (the rest padding,
left as holes), then measures, each on the file just written (in the page cache, as at the commit):
- a plain sha256 of the whole file (what the commit computed before `sparse_digest`), and the shard's
  digest: seconds and bytes read (/proc/self/io `rchar`);
- the verification (`verification.verify_shard`): seconds and bytes read.

    python -m tools.sparse_shard_reads --workdir /tmp/sparse --samples 16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eagle3_cache.provenance import file_sha256
from eagle3_cache.shard_format import ShardWriter
from eagle3_cache.shard_layout import ShardLayout
from eagle3_cache.sparse_digest import file_digest
from eagle3_cache.token_store import TokenBlock
from eagle3_cache.verification import verify_shard

SEQ_LENGTH, HIDDEN = 2048, 4096


def bytes_read() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))


def measured(step: Callable[[], Any]) -> tuple[Any, float, int]:
    """`step()`'s result, seconds and bytes read."""
    before, started = bytes_read(), time.perf_counter()
    result = step()
    return result, time.perf_counter() - started, bytes_read() - before


def written_shard(path: Path, layout: ShardLayout, samples: int, length: int) -> tuple[TokenBlock, str, int]:
    """The shard at `path`: random values over each sample's first `length` positions; its tokens, digest and
    the bytes written."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (samples, SEQ_LENGTH), generator=generator)
    attention_mask = (torch.arange(SEQ_LENGTH) < length).long().expand(samples, -1).contiguous()
    tokens = TokenBlock(input_ids * attention_mask, attention_mask, attention_mask)
    written = 0
    with ShardWriter(path, layout, samples) as writer:
        for sample in range(samples):
            rows = {
                "input_ids": torch.cat([tokens.input_ids[sample, 1:], torch.zeros(1, dtype=torch.long)]),
                "attention_mask": tokens.attention_mask[sample],
                "loss_mask": torch.cat([tokens.loss_mask[sample, 1:], torch.zeros(1, dtype=torch.long)]),
                "aux_hidden_states": torch.randn(length, 3 * HIDDEN, generator=generator).to(torch.bfloat16),
                "position_mask": torch.ones(length, 1, dtype=torch.bool),
                "target_probs": torch.rand(length, layout.draft_vocab_size, generator=generator).to(torch.bfloat16),
            }
            for name, values in rows.items():
                writer.write_row(sample, name, values)
                written += values.numel() * values.element_size()
        digest = writer.commit()
    # As the verification job reads them: numpy arrays.
    return (
        TokenBlock(*(getattr(tokens, name).numpy() for name in ("input_ids", "attention_mask", "loss_mask"))),
        digest,
        written,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--content", type=float, default=0.3, help="share of each sample's positions that is content")
    parser.add_argument("--draft-vocab", type=int, default=32000)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    layout = ShardLayout(SEQ_LENGTH, 3 * HIDDEN, args.draft_vocab, "bf16", 0)
    path = args.workdir / "shard-000000.safetensors"
    length = int(SEQ_LENGTH * args.content)
    (tokens, digest, written), seconds, _ = measured(lambda: written_shard(path, layout, args.samples, length))
    apparent = path.stat().st_size
    allocated = path.stat().st_blocks * 512
    print(
        f"shard: {apparent / 1e9:.2f} GB apparent, {allocated / 1e9:.2f} GB allocated, {written / 1e9:.2f} GB written"
    )
    print(f"(written in {seconds:.1f} s)")
    print("| step | seconds | GB read |")
    print("|---|---|---|")
    for name, step in (
        ("plain sha256 of the file (the commit before)", lambda: file_sha256(path)),
        ("the shard's digest (the commit now)", lambda: file_digest(path)),
        (
            "verification",
            lambda: verify_shard(path, layout, first_sample=0, tokens=tokens, recorded_digest=digest),
        ),
    ):
        _, seconds, read = measured(step)
        print(f"| {name} | {seconds:.2f} | {read / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
