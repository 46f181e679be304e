"""The disk plan: what a run's cache takes on disk, exactly known once tokenization has run, against the free space.

Each file is sized two ways. Its apparent bytes are its size, exactly as `shard_layout` lays it
out. Its allocated bytes are the filesystem blocks its writes touch: the shard writer writes the
header, the token fields over the full seq_length, and the computed fields only over each
sample's content positions (`lengths` in the token store), so on a filesystem that keeps sparse
files the padding takes no blocks. The bytes still to write (each file beyond what the file it
replaces already takes, plus a bound on the manifest), with a margin, must fit in the free space
of the filesystem holding the cache directory; otherwise `refusal` says what to change.

It imports no torch, so that the plan job costs a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheConfigError
from .layout import EMBEDDINGS_FILE, draft_vocab_width, shard_file_name
from .report_html import format_bytes
from .shard_layout import (
    TOKEN_FIELDS,
    ShardLayout,
    embeddings_bytes,
    is_topk,
    safetensors_header,
)
from .token_store import read_tokenized_info

# A bound on a manifest: everything but the draft ids and the shard records, with room to spare,
# then per shard record, and per draft id beyond its digits (indent and separator).
MANIFEST_FIXED_BYTES = 64 << 10
MANIFEST_SHARD_RECORD_BYTES = 512
MANIFEST_ID_OVERHEAD_BYTES = 6
# The sparse-file probe: a file this many blocks long with one block written.
PROBE_BLOCKS = 16
# The k of the top-k storage a run that stores full target_probs is compared with, and offered.
COMPARISON_TOPK = 64


@dataclass(frozen=True)
class FileCost:
    """One file of the cache: its size, and the bytes of the blocks its writes touch."""

    file: str
    apparent_bytes: int
    allocated_bytes: int


@dataclass(frozen=True)
class CacheCost:
    """Every shard and the embeddings file of one cache layout."""

    shards: list[FileCost]
    embeddings: FileCost

    @property
    def files(self) -> list[FileCost]:
        return [*self.shards, self.embeddings]

    @property
    def apparent_bytes(self) -> int:
        return sum(f.apparent_bytes for f in self.files)

    @property
    def allocated_bytes(self) -> int:
        return sum(f.allocated_bytes for f in self.files)


@dataclass(frozen=True)
class Filesystem:
    """The filesystem a cache directory lies on, as measured at its nearest existing directory."""

    path: str
    free_bytes: int
    block_size: int
    sparse_files: bool

    def takes(self, cost: FileCost) -> int:
        """The bytes a file takes here: its blocks touched when holes stay holes, else its size."""
        return cost.allocated_bytes if self.sparse_files else cost.apparent_bytes


# --- Sizing --------------------------------------------------------------------------------------


def written_ranges(layout: ShardLayout, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The byte ranges `[start, stop)` the shard writer writes into a shard, in file order.

    The header, then per field: the token fields in full for every sample, the computed fields
    over each sample's first `length` positions (`pipeline.write_batch_rows`).
    """
    header, offsets = safetensors_header(layout, len(lengths))
    samples = np.arange(len(lengths), dtype=np.int64)
    starts, stops = [np.zeros(1, dtype=np.int64)], [np.full(1, len(header), dtype=np.int64)]
    for field in layout.fields():
        first = len(header) + offsets[field.name] + samples * field.sample_bytes
        written = field.sample_bytes if field.name in TOKEN_FIELDS else lengths * field.position_bytes
        starts.append(first)
        stops.append(first + written)
    return np.concatenate(starts), np.concatenate(stops)


def blocks_touched(starts: np.ndarray, stops: np.ndarray, block_size: int) -> int:
    """How many blocks disjoint byte ranges, sorted by start, touch; a block two ranges share counts once."""
    written = stops > starts
    first, last = starts[written] // block_size, (stops[written] - 1) // block_size
    return int((last - first + 1).sum() - np.count_nonzero(first[1:] == last[:-1]))


def shard_cost(index: int, layout: ShardLayout, lengths: np.ndarray, block_size: int) -> FileCost:
    """Shard `index`, holding samples of these content lengths."""
    starts, stops = written_ranges(layout, np.asarray(lengths, dtype=np.int64))
    return FileCost(
        shard_file_name(index), layout.shard_bytes(len(lengths)), blocks_touched(starts, stops, block_size) * block_size
    )


def embeddings_cost(vocab_size: int, hidden_size: int, block_size: int) -> FileCost:
    """`target_embeddings.safetensors`, written in full."""
    size = embeddings_bytes(vocab_size, hidden_size)
    return FileCost(EMBEDDINGS_FILE, size, math.ceil(size / block_size) * block_size)


def manifest_bytes_bound(draft_vocab_size: int, target_vocab_size: int, shard_count: int) -> int:
    """At least the size of the run's `manifest.json` (indented JSON, one line per draft id)."""
    per_id = len(str(target_vocab_size - 1)) + MANIFEST_ID_OVERHEAD_BYTES
    return MANIFEST_FIXED_BYTES + shard_count * MANIFEST_SHARD_RECORD_BYTES + draft_vocab_size * per_id


@dataclass(frozen=True)
class Sizing:
    """What sizes a cache besides its layout: the samples of each shard, the target's widths, the block size."""

    shard_lengths: list[np.ndarray]
    target_vocab_size: int
    hidden_size: int
    block_size: int

    def cost(self, layout: ShardLayout) -> CacheCost:
        return CacheCost(
            [shard_cost(i, layout, lengths, self.block_size) for i, lengths in enumerate(self.shard_lengths)],
            embeddings_cost(self.target_vocab_size, self.hidden_size, self.block_size),
        )

    def layout(self, seq_length: int, draft_vocab_size: int | None, dtype: str, topk: int) -> ShardLayout:
        width = draft_vocab_width(draft_vocab_size, self.target_vocab_size)
        return ShardLayout.for_target(seq_length, self.hidden_size, width, dtype, topk)


def split_by_shard(lengths: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """The per-sample lengths of each shard."""
    return [lengths[start : start + shard_size] for start in range(0, len(lengths), shard_size)]


# --- The filesystem and what is already there ----------------------------------------------------


def nearest_existing_directory(path: str | os.PathLike) -> Path:
    """`path`, or its closest parent that exists (the cache directory does not before its first file)."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.is_dir())


def keeps_holes(directory: Path, block_size: int) -> bool:
    """Whether a file here keeps its never-written blocks as holes: a probe with one block written of many."""
    handle, name = tempfile.mkstemp(prefix=".sparse-probe-", dir=directory)
    try:
        os.ftruncate(handle, PROBE_BLOCKS * block_size)
        os.pwrite(handle, b"\1", PROBE_BLOCKS // 2 * block_size)
        os.fsync(handle)
        return os.fstat(handle).st_blocks * 512 < PROBE_BLOCKS * block_size
    finally:
        os.close(handle)
        os.unlink(name)


def measure_filesystem(cache_dir: str | os.PathLike) -> Filesystem:
    """Free space, block size and sparse-file support where the cache directory is (or will be)."""
    directory = nearest_existing_directory(cache_dir)
    block_size = os.statvfs(directory).f_frsize
    return Filesystem(str(directory), shutil.disk_usage(directory).free, block_size, keeps_holes(directory, block_size))


def taken_bytes(cache_dir: Path, names: list[str]) -> dict[str, int]:
    """The bytes the cache files of these names already in `cache_dir` take on disk."""
    paths = {name: cache_dir / name for name in names}
    return {name: path.stat().st_blocks * 512 for name, path in paths.items() if path.is_file()}


# --- The plan ------------------------------------------------------------------------------------


def model_config_file(target_model: str, revision: str | None) -> Path:
    """The target's `config.json`: in its directory, or from the hub cache (downloaded once, at `revision`)."""
    if Path(target_model).is_dir():
        return Path(target_model) / "config.json"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(target_model, "config.json", revision=revision))


def target_hidden_size(target_model: str, revision: str | None, trust_remote_code: bool) -> int:
    """The width of the target's decoder layers, read from its `config.json` without building the model."""
    try:
        config = json.loads(model_config_file(target_model, revision).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CacheConfigError(
            f"target_model {target_model!r} (revision {revision!r}): cannot read its config.json ({error}); "
            "check target_model and revision, and that the hub is reachable or the model is in its cache"
        ) from error
    text_config = config.get("text_config") or config
    if "hidden_size" in text_config:
        return int(text_config["hidden_size"])
    # Configs that name it otherwise (GPT-2's n_embd): transformers knows the aliases, at torch's import cost.
    from transformers import AutoConfig

    from .target import config_hidden_size

    return config_hidden_size(
        AutoConfig.from_pretrained(target_model, revision=revision, trust_remote_code=trust_remote_code)
    )


def largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in `[low, high]` that fits, for a `fits` true up to some value; None when none does."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Budget:
    """The room a run has: what sizes it, where it goes, what its files already take, the margin."""

    sizing: Sizing
    filesystem: Filesystem
    taken: dict[str, int]
    manifest_bytes: int
    margin: float

    def to_write(self, cost: CacheCost) -> int:
        """What the run will add: each file beyond what the file it replaces takes, and the manifest.

        Snakemake deletes a job's old output before the job starts, so a finished shard that is
        kept, or rewritten the same, needs no new space.
        """
        grows = [max(0, self.filesystem.takes(f) - self.taken.get(f.file, 0)) for f in cost.files]
        return sum(grows) + self.manifest_bytes

    def required(self, layout: ShardLayout) -> int:
        """The free space a run of this layout needs: its bytes to write, plus the margin."""
        return math.ceil(self.to_write(self.sizing.cost(layout)) * (1 + self.margin))

    def fits(self, layout: ShardLayout) -> bool:
        return self.required(layout) <= self.filesystem.free_bytes


def suggestions(run: str, layout: ShardLayout, budget: Budget) -> list[str]:
    """What to change for a run that does not fit: a smaller target distribution, or another filesystem."""
    key = f"runs.{run}"
    found = []
    if is_topk(layout.target_probs_topk, layout.draft_vocab_size):
        k = largest_fitting(
            1, layout.target_probs_topk - 1, lambda k: budget.fits(replace(layout, target_probs_topk=k))
        )
        if k is not None:
            found.append(f"{key}.target_probs_topk: {k} or less")
    else:
        topk = replace(layout, target_probs_topk=COMPARISON_TOPK)
        if is_topk(COMPARISON_TOPK, layout.draft_vocab_size):
            found.append(f"{key}.target_probs_topk: {COMPARISON_TOPK} (needs {format_bytes(budget.required(topk))})")
        width = largest_fitting(
            1, layout.draft_vocab_size - 1, lambda w: budget.fits(replace(layout, draft_vocab_size=w))
        )
        if width is not None:
            found.append(f"{key}.draft_vocab_size: {width} or less")
    found.append(f"results/ on a filesystem with {format_bytes(budget.required(layout))} free")
    found.append("plan.check_free_space: false to start anyway")
    return found


def alternative_topk(layout: ShardLayout) -> int:
    """The other way to store the target distribution, for comparison: in full for a top-k run, else top-k."""
    return 0 if is_topk(layout.target_probs_topk, layout.draft_vocab_size) else COMPARISON_TOPK


def plan_cache(
    run: str,
    tokenized: str | os.PathLike,
    cache_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    check: Mapping[str, Any],
    hidden_size: int,
) -> dict[str, Any]:
    """The disk plan of one run (the plan rule's `plan.json`).

    `settings` are the plan rule's params; `check` is the config's `plan` (margin, check_free_space).
    """
    info = read_tokenized_info(tokenized)
    filesystem = measure_filesystem(cache_dir)
    lengths = split_by_shard(info.lengths, settings["shard_size"])
    sizing = Sizing(lengths, info.target_vocab_size, hidden_size, filesystem.block_size)
    layout = sizing.layout(
        settings["seq_length"], settings["draft_vocab_size"], settings["dtype"], settings["target_probs_topk"]
    )
    cost = sizing.cost(layout)
    taken = taken_bytes(Path(cache_dir), [f.file for f in cost.files])
    manifest_bytes = manifest_bytes_bound(layout.draft_vocab_size, info.target_vocab_size, len(lengths))
    budget = Budget(sizing, filesystem, taken, manifest_bytes, check["margin"])
    alternative = sizing.cost(replace(layout, target_probs_topk=alternative_topk(layout)))
    plan = {
        "run": run,
        "cache_dir": str(cache_dir),
        "num_samples": info.num_samples,
        "hidden_size": hidden_size,
        "target_vocab_size": info.target_vocab_size,
        "layout": asdict(layout),
        "apparent_bytes": cost.apparent_bytes,
        "allocated_bytes": cost.allocated_bytes,
        "files": [{**asdict(f), "taken_bytes": taken.get(f.file, 0)} for f in cost.files],
        "manifest_bytes_bound": manifest_bytes,
        "alternative": {
            "target_probs_topk": alternative_topk(layout),
            "apparent_bytes": alternative.apparent_bytes,
            "allocated_bytes": alternative.allocated_bytes,
        },
        "filesystem": asdict(filesystem),
        "to_write_bytes": budget.to_write(cost),
        "margin": check["margin"],
        "required_bytes": budget.required(layout),
        "fits": budget.fits(layout),
        "check_free_space": check["check_free_space"],
    }
    if not plan["fits"]:
        plan["suggestions"] = suggestions(run, layout, budget)
    return plan


def refusal(plan: Mapping[str, Any]) -> str | None:
    """Why the run must not start, and what to change; None when it fits or the check is off."""
    if plan["fits"] or not plan["check_free_space"]:
        return None
    return (
        f"run {plan['run']!r}: the cache needs {format_bytes(plan['required_bytes'])} free "
        f"({format_bytes(plan['to_write_bytes'])} to write plus plan.margin {plan['margin']:.0%}) "
        f"but only {format_bytes(plan['filesystem']['free_bytes'])} is free "
        f"on the filesystem holding {plan['cache_dir']}. "
        f"Set one of: {'; '.join(plan['suggestions'])}."
    )


def storage_name(target_probs_topk: int, draft_vocab_size: int) -> str:
    """`top-64` or `full`: how a layout stores the target distribution."""
    return f"top-{target_probs_topk}" if is_topk(target_probs_topk, draft_vocab_size) else "full"


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The plan as log lines: the totals, the alternative, the free space, then each file."""
    layout, filesystem, alternative = plan["layout"], plan["filesystem"], plan["alternative"]
    width = layout["draft_vocab_size"]
    lines = [
        f"run {plan['run']}: {plan['num_samples']} samples, seq_length {layout['seq_length']}, "
        f"hidden size {plan['hidden_size']}, draft vocabulary {width}, {layout['dtype']}, "
        f"{storage_name(layout['target_probs_topk'], width)} target_probs",
        f"cache: {format_bytes(plan['apparent_bytes'])} apparent, "
        f"{format_bytes(plan['allocated_bytes'])} allocated in {filesystem['block_size']}-byte blocks",
        f"with {storage_name(alternative['target_probs_topk'], width)} target_probs instead: "
        f"{format_bytes(alternative['apparent_bytes'])} apparent, "
        f"{format_bytes(alternative['allocated_bytes'])} allocated",
        f"to write: {format_bytes(plan['to_write_bytes'])} (manifest bound included), "
        f"{format_bytes(plan['required_bytes'])} with the {plan['margin']:.0%} margin; "
        f"{format_bytes(filesystem['free_bytes'])} free at {filesystem['path']} "
        f"({'sparse files' if filesystem['sparse_files'] else 'no sparse files: apparent sizes count'}): "
        f"{'fits' if plan['fits'] else 'does NOT fit'}",
    ]
    lines += [
        f"{f['file']}: {f['apparent_bytes']:,} B apparent, {f['allocated_bytes']:,} B allocated"
        f"{f', replacing a file taking {format_bytes(taken)}' if (taken := f['taken_bytes']) else ''}"
        for f in plan["files"]
    ]
    return lines


def read_plan(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """A run's `plan.json`; None for no path."""
    return None if path is None else json.loads(Path(path).read_text())


def planned_figures(plan: Mapping[str, Any], measured_bytes: int, measured_allocated_bytes: int) -> dict[str, Any]:
    """The plan's sizes of the shards and embeddings, and how far the measured ones are from them."""
    return {
        "planned_bytes": plan["apparent_bytes"],
        "planned_allocated_bytes": plan["allocated_bytes"],
        "planned_bytes_error_share": measured_bytes / plan["apparent_bytes"] - 1,
        "planned_allocated_bytes_error_share": measured_allocated_bytes / plan["allocated_bytes"] - 1,
    }
