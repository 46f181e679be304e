"""The disk plan: what a run's cache takes on disk, exactly known once tokenization has run, against the free space.

Each file is sized two ways. Its apparent bytes are its size, exactly as `shard_layout` lays it
out. Its allocated bytes are the filesystem blocks its writes touch: the shard writer writes the
header, the token fields over the full seq_length, and the computed fields only over each
sample's content positions (`lengths` in the token store), so on a filesystem that keeps sparse
files the padding takes no blocks. In the specforge format a shard is a directory of sample
files, each as long as its sample and written in full (`specforge_sizes`): its apparent bytes
are theirs summed, its allocated bytes each one's whole blocks summed. The bytes still to write
(each file beyond what the file it replaces already takes, plus a bound on the manifest), with a
margin, must fit in the free space of the filesystem holding the cache directory (`disk_space`);
otherwise `refusal` says what to change.

It imports no torch, so that the plan job costs a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .disk_space import Filesystem, measure_filesystem, taken_bytes
from .errors import CacheConfigError
from .layout import (
    AUTOMODEL_FORMAT,
    EMBEDDINGS_FILE,
    SPECFORGE_FORMAT,
    VOCAB_MAPPING_FILE,
    draft_vocab_width,
    shard_dir_name,
    shard_file_name,
)
from .shard_layout import (
    TOKEN_FIELDS,
    ShardLayout,
    embeddings_bytes,
    is_topk,
    safetensors_header,
)
from .specforge_sizes import sample_file_bytes, vocab_mapping_bytes
from .token_store import read_tokenized_info
from .units import format_bytes

# A bound on a manifest: everything but the draft ids and the shard records, with room to spare,
# then per shard record, per file record (the specforge format's: name, tokens, size, sha256), and per
# draft id beyond its digits (indent and separator).
MANIFEST_FIXED_BYTES = 64 << 10
MANIFEST_SHARD_RECORD_BYTES = 512
MANIFEST_FILE_RECORD_BYTES = 256
MANIFEST_ID_OVERHEAD_BYTES = 6
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
    """Every shard of one cache, and the file beside them: the target embeddings, or the vocabulary mapping."""

    shards: list[FileCost]
    beside: FileCost

    @property
    def files(self) -> list[FileCost]:
        return [*self.shards, self.beside]

    @property
    def apparent_bytes(self) -> int:
        return sum(f.apparent_bytes for f in self.files)

    @property
    def allocated_bytes(self) -> int:
        return sum(f.allocated_bytes for f in self.files)


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


def whole_blocks_bytes(sizes: np.ndarray | int, block_size: int) -> int:
    """The bytes of the whole blocks files of these sizes take, each written in full."""
    return int(np.sum(-(-np.asarray(sizes) // block_size))) * block_size


def embeddings_cost(vocab_size: int, hidden_size: int, block_size: int) -> FileCost:
    """`target_embeddings.safetensors`, written in full."""
    size = embeddings_bytes(vocab_size, hidden_size)
    return FileCost(EMBEDDINGS_FILE, size, whole_blocks_bytes(size, block_size))


def specforge_shard_cost(index: int, lengths: np.ndarray, hidden_size: int, block_size: int) -> FileCost:
    """Shard directory `index` of the specforge format, a file per sample of these lengths.

    The directory's own blocks (its entries, 32 bytes a file on ext4) are left out: next to files of
    kilobytes to megabytes each, they are well within the plan's margin.
    """
    sizes = sample_file_bytes(np.asarray(lengths, dtype=np.int64), hidden_size)
    return FileCost(shard_dir_name(index), int(np.sum(sizes)), whole_blocks_bytes(sizes, block_size))


def vocab_mapping_cost(draft_vocab_size: int, target_vocab_size: int, block_size: int) -> FileCost:
    """`vocab_mapping.pt`, written in full."""
    size = vocab_mapping_bytes(draft_vocab_size, target_vocab_size)
    return FileCost(VOCAB_MAPPING_FILE, size, whole_blocks_bytes(size, block_size))


def manifest_bytes_bound(draft_vocab_size: int, target_vocab_size: int, shard_count: int, file_count: int) -> int:
    """At least the size of the run's `manifest.json` (indented JSON, one line per draft id); `file_count` is
    the number of files the manifest records one by one (none in the Automodel format)."""
    per_id = len(str(target_vocab_size - 1)) + MANIFEST_ID_OVERHEAD_BYTES
    records = shard_count * MANIFEST_SHARD_RECORD_BYTES + file_count * MANIFEST_FILE_RECORD_BYTES
    return MANIFEST_FIXED_BYTES + records + draft_vocab_size * per_id


@dataclass(frozen=True)
class Sizing:
    """What sizes a cache besides its layout: the samples of each shard, the target's widths, the block size."""

    shard_lengths: list[np.ndarray]
    target_vocab_size: int
    hidden_size: int
    block_size: int

    def cost(self, layout: ShardLayout) -> CacheCost:
        """The Automodel format's shards of this layout and the embeddings."""
        return CacheCost(
            [shard_cost(i, layout, lengths, self.block_size) for i, lengths in enumerate(self.shard_lengths)],
            embeddings_cost(self.target_vocab_size, self.hidden_size, self.block_size),
        )

    def specforge_cost(self, draft_vocab_size: int) -> CacheCost:
        """The specforge format's shard directories and vocabulary mapping."""
        return CacheCost(
            [
                specforge_shard_cost(i, lengths, self.hidden_size, self.block_size)
                for i, lengths in enumerate(self.shard_lengths)
            ],
            vocab_mapping_cost(draft_vocab_size, self.target_vocab_size, self.block_size),
        )

    def format_cost(self, output_format: str, layout: ShardLayout) -> CacheCost:
        """The cost in a run's format; `layout` is the Automodel layout of its settings."""
        if output_format == SPECFORGE_FORMAT:
            return self.specforge_cost(layout.draft_vocab_size)
        return self.cost(layout)

    def layout(self, seq_length: int, draft_vocab_size: int | None, dtype: str, topk: int) -> ShardLayout:
        width = draft_vocab_width(draft_vocab_size, self.target_vocab_size)
        return ShardLayout.for_target(seq_length, self.hidden_size, width, dtype, topk)


def split_by_shard(lengths: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """The per-sample lengths of each shard."""
    return [lengths[start : start + shard_size] for start in range(0, len(lengths), shard_size)]


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
        grows = [
            max(0, self.filesystem.takes(f.apparent_bytes, f.allocated_bytes) - self.taken.get(f.file, 0))
            for f in cost.files
        ]
        return sum(grows) + self.manifest_bytes

    def required(self, cost: CacheCost) -> int:
        """The free space a cache of this cost needs: its bytes to write, plus the margin."""
        return math.ceil(self.to_write(cost) * (1 + self.margin))

    def fits(self, cost: CacheCost) -> bool:
        return self.required(cost) <= self.filesystem.free_bytes

    def fits_layout(self, layout: ShardLayout) -> bool:
        """Whether the Automodel format's cache of this layout fits."""
        return self.fits(self.sizing.cost(layout))


def storage_suggestions(key: str, layout: ShardLayout, budget: Budget) -> list[str]:
    """The smaller target distributions that make an Automodel cache fit, as settings under `key`."""
    if is_topk(layout.target_probs_topk, layout.draft_vocab_size):
        k = largest_fitting(
            1, layout.target_probs_topk - 1, lambda k: budget.fits_layout(replace(layout, target_probs_topk=k))
        )
        return [] if k is None else [f"{key}.target_probs_topk: {k} or less"]
    found = []
    if is_topk(COMPARISON_TOPK, layout.draft_vocab_size):
        topk = budget.sizing.cost(replace(layout, target_probs_topk=COMPARISON_TOPK))
        found.append(f"{key}.target_probs_topk: {COMPARISON_TOPK} (needs {format_bytes(budget.required(topk))})")
    width = largest_fitting(
        1, layout.draft_vocab_size - 1, lambda w: budget.fits_layout(replace(layout, draft_vocab_size=w))
    )
    if width is not None:
        found.append(f"{key}.draft_vocab_size: {width} or less")
    return found


def suggestions(run: str, output_format: str, layout: ShardLayout, budget: Budget) -> list[str]:
    """What to change for a run that does not fit: a smaller target distribution, or another filesystem.

    A specforge cache stores no target distribution, and the Automodel format of the same samples is
    larger, so for it only another filesystem helps.
    """
    found = [] if output_format == SPECFORGE_FORMAT else storage_suggestions(f"runs.{run}", layout, budget)
    required = budget.required(budget.sizing.format_cost(output_format, layout))
    found.append(f"results/ on a filesystem with {format_bytes(required)} free")
    found.append("plan.check_free_space: false to start anyway")
    return found


def alternative_topk(output_format: str, layout: ShardLayout) -> int:
    """The Automodel storage of the target distribution a run is compared with: the run's own for a specforge
    run (the other format at the same settings), else the other way: in full for a top-k run, else top-k."""
    if output_format == SPECFORGE_FORMAT:
        return layout.target_probs_topk
    return 0 if is_topk(layout.target_probs_topk, layout.draft_vocab_size) else COMPARISON_TOPK


def cost_figures(cost: CacheCost) -> dict[str, int]:
    """A cache's apparent and allocated bytes."""
    return {"apparent_bytes": cost.apparent_bytes, "allocated_bytes": cost.allocated_bytes}


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
    output_format = settings["format"]
    is_specforge = output_format == SPECFORGE_FORMAT
    cost = sizing.format_cost(output_format, layout)
    taken = taken_bytes(Path(cache_dir), [f.file for f in cost.files])
    manifest_bytes = manifest_bytes_bound(
        layout.draft_vocab_size, info.target_vocab_size, len(lengths), info.num_samples if is_specforge else 0
    )
    budget = Budget(sizing, filesystem, taken, manifest_bytes, check["margin"])
    topk = alternative_topk(output_format, layout)
    plan = {
        "run": run,
        "format": output_format,
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
            "format": AUTOMODEL_FORMAT,
            "target_probs_topk": topk,
            **cost_figures(sizing.cost(replace(layout, target_probs_topk=topk))),
        },
        "filesystem": asdict(filesystem),
        "to_write_bytes": budget.to_write(cost),
        "margin": check["margin"],
        "required_bytes": budget.required(cost),
        "fits": budget.fits(cost),
        "check_free_space": check["check_free_space"],
    }
    if not is_specforge:
        plan["specforge"] = cost_figures(sizing.specforge_cost(layout.draft_vocab_size))
    if not plan["fits"]:
        plan["suggestions"] = suggestions(run, output_format, layout, budget)
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


def comparison_line(name: str, figures: Mapping[str, int]) -> str:
    """`in the ... instead: ... apparent, ... allocated`."""
    apparent, allocated = format_bytes(figures["apparent_bytes"]), format_bytes(figures["allocated_bytes"])
    return f"in {name} instead: {apparent} apparent, {allocated} allocated"


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The plan as log lines: the totals, the alternatives, the free space, then each file."""
    layout, filesystem, alternative = plan["layout"], plan["filesystem"], plan["alternative"]
    width = layout["draft_vocab_size"]
    stored = (
        "hidden states only"
        if plan["format"] == SPECFORGE_FORMAT
        else f"{storage_name(layout['target_probs_topk'], width)} target_probs"
    )
    lines = [
        f"run {plan['run']}: {plan['num_samples']} samples, {plan['format']} format, seq_length "
        f"{layout['seq_length']}, hidden size {plan['hidden_size']}, draft vocabulary {width}, {layout['dtype']}, "
        f"{stored}",
        f"cache: {format_bytes(plan['apparent_bytes'])} apparent, "
        f"{format_bytes(plan['allocated_bytes'])} allocated in {filesystem['block_size']}-byte blocks",
        comparison_line(
            f"the automodel format with {storage_name(alternative['target_probs_topk'], width)} target_probs",
            alternative,
        ),
        *([comparison_line("the specforge format", plan["specforge"])] if "specforge" in plan else []),
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
    """The plan's sizes of the shards and the file beside them, and how far the measured ones are from them."""
    return {
        "planned_bytes": plan["apparent_bytes"],
        "planned_allocated_bytes": plan["allocated_bytes"],
        "planned_bytes_error_share": measured_bytes / plan["apparent_bytes"] - 1,
        "planned_allocated_bytes_error_share": measured_allocated_bytes / plan["allocated_bytes"] - 1,
    }


def planned_summary(plan: Mapping[str, Any]) -> str:
    """The plan's prediction, for a disk check's summary."""
    return (
        f"the disk plan predicted {format_bytes(plan['apparent_bytes'])} "
        f"({format_bytes(plan['allocated_bytes'])} allocated)"
    )
