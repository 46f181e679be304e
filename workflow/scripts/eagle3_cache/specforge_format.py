"""SpecForge 0.2.0's offline EAGLE-3 format: one `torch.save` file per sample, one directory per shard.

A cache directory holds `shard-NNNNNN/` directories of `sample-NNNNNNNNN.ckpt` files, `vocab_mapping.pt`
(the file SpecForge's `model.vocab_mapping_path` names) and our `manifest.json`. Each sample file is a
plain dict in torch's default zipfile serialization (SpecForge memory-maps it):

    input_ids         [L]         int64  the tokens, unshifted
    loss_mask         [L]         int64  1 at supervised (assistant) tokens, unshifted
    hidden_state      [1, L, H]   bf16   the target's final decoder output after its final norm
    aux_hidden_state  [1, L, 3H]  bf16   the three aux layers' outputs, concatenated in layer order

L is the sample's real length: nothing is padded, and SpecForge shifts at read time. File names carry
zero-padded global sample indices, because SpecForge's reader walks the directory recursively and
orders the files by their absolute paths as strings.

A shard is built in a staging directory beside the cache directory, not inside it (SpecForge would read
a half-written shard there), and renamed onto its final name whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .atomic import torch_save_atomic, write_json_atomic
from .errors import CacheConfigError
from .manifest import checked_manifest
from .pipeline import ShardResult, stream_rows
from .shard_format import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    CacheProblem,
    ShardLayout,
    file_sha256,
    num_shards,
    read_manifest,
    safetensors_entries,
    samples_in_shard,
    shard_file_name,
    shard_indices_in,
)
from .target import CacheBatch, CacheSpec, hidden_size
from .timing import PhaseTimer
from .tokenized import TokenBlock, TokenizedInfo, read_token_block

log = logging.getLogger(__name__)

FORMAT = "specforge"
SPECFORGE_VERSION = "0.2.0"
VOCAB_MAPPING_FILE = "vocab_mapping.pt"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARD_DIR = re.compile(r"^shard-(\d{6})$")
SAMPLE_DIGITS = 9
# The empty file Snakemake leaves in a finished directory output (SpecForge reads only *.ckpt).
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"
STORED_DTYPE = torch.bfloat16
HIDDEN_KEYS = ("hidden_state", "aux_hidden_state")
# What the cache checker reads from the manifest.
REQUIRED_MANIFEST_KEYS = (
    "num_samples",
    "shard_size",
    "hidden_size",
    "selected_token_ids",
    "target_vocab_size",
    "vocab_mapping",
    "shards",
)
# Fields of Automodel's manifest that do not describe these files.
AUTOMODEL_ONLY_KEYS = ("format_version", "target_probs_topk")


def shard_dir_name(index: int) -> str:
    """`shard-000042`, the directory of shard 42."""
    return f"shard-{index:06d}"


def sample_file_name(index: int) -> str:
    """`sample-000004242.ckpt` for global sample 4242: zero-padded, so that string order is sample order."""
    if not 0 <= index < 10**SAMPLE_DIGITS:
        raise CacheConfigError(
            f"sample index {index} does not fit the {SAMPLE_DIGITS}-digit file names of the specforge format; "
            f"split the dataset into runs of fewer than {10**SAMPLE_DIGITS} samples."
        )
    return f"sample-{index:0{SAMPLE_DIGITS}d}.ckpt"


def staging_root(cache_dir: str | os.PathLike) -> Path:
    """`<cache dir>.staging`, where shard directories are built: beside the tree SpecForge walks."""
    cache_dir = Path(cache_dir)
    return cache_dir.with_name(cache_dir.name + ".staging")


def staging_dir_for(shard_dir: str | os.PathLike) -> Path:
    """Where one shard directory is built before it is renamed into place."""
    shard_dir = Path(shard_dir)
    return staging_root(shard_dir.parent) / shard_dir.name


def sample_tensors(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, hidden_state: torch.Tensor, aux_hidden_state: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One sample's file content from its `[L]` tokens and mask and `[L, H]`, `[L, 3H]` hidden states.

    Each tensor is copied into storage of its own: `torch.save` writes a view's whole underlying storage.
    """
    return {
        "input_ids": input_ids.to(torch.int64).clone(memory_format=torch.contiguous_format),
        "loss_mask": loss_mask.to(torch.int64).clone(memory_format=torch.contiguous_format),
        "hidden_state": hidden_state.unsqueeze(0).clone(memory_format=torch.contiguous_format),
        "aux_hidden_state": aux_hidden_state.unsqueeze(0).clone(memory_format=torch.contiguous_format),
    }


def serialized(sample: Mapping[str, torch.Tensor]) -> bytes:
    """`torch.save` bytes of a sample (zipfile serialization; the same tensors give the same bytes)."""
    buffer = io.BytesIO()
    torch.save(dict(sample), buffer)
    return buffer.getvalue()


def bytes_per_token(hidden_size: int) -> dict[str, int]:
    """What each key of a sample file takes per token (int64 ids and mask, bf16 hidden states)."""
    return {"input_ids": 8, "loss_mask": 8, "hidden_state": 2 * hidden_size, "aux_hidden_state": 6 * hidden_size}


def specforge_file_bytes(num_tokens: int, hidden_size: int) -> int:
    """A sample file's size for `num_tokens` tokens, to a few hundred bytes: its tensors plus the zip
    container, measured on a one-token sample of the same width."""
    one = sample_tensors(
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, hidden_size, dtype=torch.bfloat16),
        torch.zeros(1, 3 * hidden_size, dtype=torch.bfloat16),
    )
    return len(serialized(one)) + (num_tokens - 1) * sum(bytes_per_token(hidden_size).values())


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def write_batch(self, batch: CacheBatch, rows: list[int]) -> None:
        """Write one file per row of a host batch computed with `target_repr="hidden_state"`."""
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
            write_durably(self.staging / name, data)
            self.files[row] = {
                "file": name,
                "num_tokens": length,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }

    def commit(self) -> list[dict[str, Any]]:
        """Rename the staging directory onto the shard's name; returns the file records in sample order."""
        fsync_dir(self.staging)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging, self.path)
        fsync_dir(self.path.parent)
        return [self.files[row] for row in sorted(self.files)]

    def abort(self) -> None:
        """Drop the staging directory; the shard's name is never touched."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ShardDirectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def records_sha256(files: Sequence[Mapping[str, Any]]) -> str:
    """One digest for a shard directory: of its file records (names, sizes and sha256s) in order."""
    return hashlib.sha256(json.dumps(list(files), sort_keys=True).encode()).hexdigest()


@dataclass(kw_only=True)
class SpecForgeShardResult(ShardResult):
    """A shard job's result in the specforge format: `ShardResult` plus what the manifest records."""

    format: str = FORMAT
    hidden_size: int
    lm_head_key: str
    files: list[dict[str, Any]]


def compute_specforge_shard(
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
) -> SpecForgeShardResult:
    """`compute_shard` for the specforge format: shard `shard_index` as the directory `shard_path`."""
    if spec.dtype != "bf16":
        raise CacheConfigError(
            f"the specforge format stores bf16 (SpecForge's TargetHead multiplies in bf16), not {spec.dtype}: "
            "set `dtype: bf16` for this run."
        )
    spec = dataclasses.replace(spec, target_repr="hidden_state")
    timer = PhaseTimer(model.get_input_embeddings().weight.device)
    first = shard_index * shard_size
    count = samples_in_shard(shard_index, num_samples, shard_size)
    with timer.phase("read"):
        block = read_token_block(tokenized_path, first, first + count)
    with ShardDirectoryWriter(shard_path, block, first) as writer:
        computed_tokens, write_seconds = stream_rows(model, spec, block, writer.write_batch, batch_size, timer)
        with timer.phase("commit"):
            files = writer.commit()
    return SpecForgeShardResult(
        num_samples=count,
        first_sample=first,
        bytes=sum(f["bytes"] for f in files),
        sha256=records_sha256(files),
        real_tokens=int(block.attention_mask.sum()),
        computed_tokens=computed_tokens,
        padded_tokens=count * layout.seq_length,
        seconds={**timer.seconds, **write_seconds},
        hidden_size=hidden_size(model),
        lm_head_key=lm_head_key(model),
        files=files,
    )


# --- Reading and checking sample files ---------------------------------------------------------


def read_sample_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A sample file as SpecForge loads it: memory-mapped, so only what is touched is read."""
    try:
        sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CacheConfigError(
            f"{path}: not a readable torch.save zip file ({error}). Delete its shard directory and rerun the workflow."
        ) from error
    if not isinstance(sample, dict):
        raise CacheConfigError(f"{path}: holds a {type(sample).__name__}, not a dict of tensors. Rebuild its shard.")
    return sample


def sample_problems(sample: Mapping[str, Any], *, num_tokens: int, hidden_size: int) -> list[str]:
    """How a loaded sample differs from what SpecForge reads: keys, dtypes, shapes, a 0/1 loss mask."""
    expected = {
        "input_ids": (torch.int64, (num_tokens,)),
        "loss_mask": (torch.int64, (num_tokens,)),
        "hidden_state": (STORED_DTYPE, (1, num_tokens, hidden_size)),
        "aux_hidden_state": (STORED_DTYPE, (1, num_tokens, 3 * hidden_size)),
    }
    problems = [f"missing key {key!r}" for key in expected if key not in sample]
    problems += [f"unexpected key {key!r}" for key in sample if key not in expected]
    for key, (dtype, shape) in expected.items():
        value = sample.get(key)
        if isinstance(value, torch.Tensor) and (value.dtype, tuple(value.shape)) != (dtype, shape):
            problems.append(f"{key}: stored {value.dtype} {list(value.shape)}, expected {dtype} {list(shape)}")
        elif key in sample and not isinstance(value, torch.Tensor):
            problems.append(f"{key}: a {type(value).__name__}, not a tensor")
    loss_mask = sample.get("loss_mask")
    if isinstance(loss_mask, torch.Tensor) and not ((loss_mask == 0) | (loss_mask == 1)).all():
        problems.append("loss_mask holds values other than 0 and 1")
    return problems


def nonfinite_values(sample: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many NaN or infinite values each hidden state holds."""
    return {key: int((~torch.isfinite(sample[key])).sum()) for key in HIDDEN_KEYS}


def sample_paths(cache_dir: Path, manifest: Mapping[str, Any]) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """Every sample file the manifest records, in sample order, with its record."""
    for shard in manifest["shards"]:
        for record in shard["files"]:
            yield cache_dir / shard["directory"] / record["file"], record


# --- The vocabulary mapping --------------------------------------------------------------------


def vocab_mapping(selected_token_ids: torch.Tensor, target_vocab_size: int) -> dict[str, torch.Tensor]:
    """SpecForge's `{"d2t": int64[Vd], "t2d": bool[V]}` for our draft vocabulary.

    SpecForge reads the draft's logit columns as the target ids `t2d` selects in ascending order
    (`target[..., t2d]`) and requires `nonzero(t2d) == d2t + arange(Vd)`, so draft id i is the i-th
    smallest of our selected ids: the same set as `vocab_selection.pt`, sorted by id.
    """
    ids = torch.sort(selected_token_ids.to(torch.int64)).values
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= target_vocab_size or torch.unique(ids).numel() != ids.numel():
        raise CacheConfigError(
            f"the draft vocabulary must be distinct ids in [0, {target_vocab_size}); rerun the select_vocab rule."
        )
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {"d2t": ids - torch.arange(ids.numel()), "t2d": t2d}


def write_vocab_mapping(path: str | os.PathLike, selected_token_ids: torch.Tensor, target_vocab_size: int) -> None:
    """`vocab_mapping.pt`, written from our vocabulary selection."""
    torch_save_atomic(path, vocab_mapping(selected_token_ids, target_vocab_size))


def vocab_mapping_problems(path: Path, selected_token_ids: Sequence[int], target_vocab_size: int) -> list[str]:
    """How a vocabulary mapping file differs from the one our selection gives."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        return [f"unreadable ({error})"]
    expected = vocab_mapping(torch.tensor(list(selected_token_ids)), target_vocab_size)
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        return [f"holds {sorted(saved) if isinstance(saved, dict) else type(saved).__name__}, expected d2t and t2d"]
    return [
        f"{key} differs from the manifest's selected_token_ids (stored {saved[key].dtype} {list(saved[key].shape)})"
        for key, want in expected.items()
        if saved[key].dtype != want.dtype or not torch.equal(saved[key], want)
    ]


# --- What SpecForge reads from the target directory --------------------------------------------


def lm_head_key(model: nn.Module) -> str:
    """The checkpoint key of the weight lm_head multiplies; for a tied model, the input embedding's key."""
    weight = model.get_output_embeddings().weight
    return next(name for name, parameter in model.named_parameters() if parameter is weight)


def write_weight_index(model_dir: str | os.PathLike) -> Path:
    """`model.safetensors.index.json` for a checkpoint saved as one `model.safetensors`.

    SpecForge's TargetHead finds lm_head_key only through an index; transformers still loads the
    single file (it looks for it before an index).
    """
    model_dir = Path(model_dir)
    entries = safetensors_entries(model_dir / SINGLE_WEIGHTS_FILE)
    index = {
        "metadata": {"total_size": max((entry["data_offsets"][1] for entry in entries.values()), default=0)},
        "weight_map": {name: SINGLE_WEIGHTS_FILE for name in sorted(entries)},
    }
    path = model_dir / WEIGHT_INDEX_FILE
    write_json_atomic(path, index)
    return path


def target_dir_problems(model_dir: str | os.PathLike, key: str) -> list[str]:
    """What SpecForge's TargetHead would reject in a local target directory: config, index, lm_head_key."""
    model_dir = Path(model_dir)
    problems = [] if (model_dir / "config.json").is_file() else [f"{model_dir}: no config.json"]
    indexes = sorted(model_dir.glob("*.index.json"))
    if len(indexes) != 1:
        problems.append(
            f"{model_dir}: {len(indexes)} *.index.json files, SpecForge needs exactly one "
            "(for a single model.safetensors, write one with eagle3_cache.specforge_format.write_weight_index)"
        )
    elif key not in json.loads(indexes[0].read_text()).get("weight_map", {}):
        problems.append(f"{indexes[0]}: no {key!r} in its weight_map, which SpecForge's lm_head_key must name")
    return problems


# --- The manifest and the cache checker ---------------------------------------------------------


def shard_record(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of one shard directory."""
    return {
        "directory": shard_dir_name(stats["shard"]),
        "num_samples": stats["num_samples"],
        "num_files": len(stats["files"]),
        "bytes": stats["bytes"],
        "files": stats["files"],
    }


def specforge_manifest(
    cache_dir: Path,
    settings: Mapping[str, Any],
    stats: Sequence[Mapping[str, Any]],
    selected_token_ids: list[int],
    target_vocab_size: int,
    info: TokenizedInfo,
) -> dict[str, Any]:
    """Our manifest of a specforge cache: the checks and provenance of `checked_manifest`, with the shard
    directories, file counts and a sha256 per file; files of the other format are removed."""
    other = [s["shard"] for s in stats if s.get("format") != FORMAT]
    if other:
        raise CacheConfigError(
            f"{cache_dir}: the stats of shards {other} are not of the specforge format. "
            "Rerun with --forcerun compute_specforge_shard."
        )
    mapping = cache_dir / VOCAB_MAPPING_FILE
    problems = vocab_mapping_problems(mapping, selected_token_ids, target_vocab_size)
    if problems:
        raise CacheConfigError(f"{mapping}: {problems[0]}. Delete it and run the workflow again.")
    manifest = checked_manifest(cache_dir, settings, stats, selected_token_ids, target_vocab_size, info)
    remove_stale_specforge_files(cache_dir, len(stats))
    for key in AUTOMODEL_ONLY_KEYS:
        del manifest[key]
    manifest.update(
        {
            "format": FORMAT,
            "specforge_version": SPECFORGE_VERSION,
            "hidden_size": stats[0]["hidden_size"],
            "lm_head_key": stats[0]["lm_head_key"],
            "vocab_mapping": {"file": VOCAB_MAPPING_FILE, "sha256": file_sha256(mapping), "draft_ids": "ascending"},
            "num_files": sum(len(s["files"]) for s in stats),
            "shards": [shard_record(s) for s in stats],
        }
    )
    return manifest


def shard_dir_indices_in(cache_dir: Path) -> list[int]:
    """The shard directories present in a cache directory, sorted."""
    return sorted(int(m.group(1)) for p in cache_dir.iterdir() if p.is_dir() and (m := SHARD_DIR.match(p.name)))


def remove_paths(paths: Sequence[Path]) -> None:
    """Delete files and directory trees, logging each."""
    for path in paths:
        log.info("removing stale %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_stale_specforge_files(cache_dir: Path, shard_count: int) -> None:
    """Delete shard directories beyond the current count, staging leftovers, and the Automodel format's files."""
    stale = [cache_dir / shard_dir_name(i) for i in shard_dir_indices_in(cache_dir) if i >= shard_count]
    stale += [cache_dir / shard_file_name(i) for i in shard_indices_in(cache_dir)]
    stale += [path for path in (cache_dir / EMBEDDINGS_FILE, staging_root(cache_dir)) if path.exists()]
    remove_paths(stale)


def remove_specforge_files(cache_dir: Path) -> None:
    """Delete what the specforge format left in a cache directory that now holds the Automodel format."""
    stale = [cache_dir / shard_dir_name(i) for i in shard_dir_indices_in(cache_dir)]
    stale += [path for path in (cache_dir / VOCAB_MAPPING_FILE, staging_root(cache_dir)) if path.exists()]
    remove_paths(stale)


def manifest_format(cache_dir: str | os.PathLike) -> str:
    """The output format a cache directory's manifest records: "automodel" when it records none (as
    Automodel's own manifests do) or cannot be read, which the Automodel checks then report."""
    try:
        return read_manifest(cache_dir).get("format", "automodel")
    except (OSError, json.JSONDecodeError):
        return "automodel"


def manifest_record_problems(manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The manifest must be ours, of the specforge format, and its records must cover every sample in order."""
    if manifest.get("format") != FORMAT:
        return [CacheProblem(MANIFEST_FILE, f"format {manifest.get('format')!r}, expected {FORMAT!r}")]
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        return [CacheProblem(MANIFEST_FILE, f"missing field {key!r}") for key in missing]
    n, size = int(manifest["num_samples"]), int(manifest["shard_size"])
    expected = [
        (shard_dir_name(i), [sample_file_name(g) for g in range(i * size, i * size + samples_in_shard(i, n, size))])
        for i in range(num_shards(n, size))
    ]
    got = [(s["directory"], [f["file"] for f in s["files"]]) for s in manifest["shards"]]
    if got != expected:
        return [CacheProblem(MANIFEST_FILE, "shard records do not cover samples 0..num_samples-1 in order")]
    return []


def cache_entry_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """Shard directories missing or not recorded, stray entries, stray or missing files inside a shard."""
    recorded = {s["directory"]: {f["file"] for f in s["files"]} for s in manifest["shards"]}
    present = {p.name for p in cache_dir.iterdir()}
    problems = [CacheProblem(name, "missing") for name in sorted(recorded.keys() - present)]
    known = recorded.keys() | {MANIFEST_FILE, VOCAB_MAPPING_FILE}
    stray = sorted(present - known)
    problems += [CacheProblem(name, "stray file or directory (SpecForge may read it)") for name in stray]
    if VOCAB_MAPPING_FILE not in present:
        problems.append(CacheProblem(VOCAB_MAPPING_FILE, "missing"))
    for directory, files in recorded.items():
        if directory in present:
            inside = {p.name for p in (cache_dir / directory).iterdir()}
            problems += [CacheProblem(f"{directory}/{name}", "missing") for name in sorted(files - inside)]
            stray = sorted(inside - files - {SNAKEMAKE_TIMESTAMP})
            problems += [CacheProblem(f"{directory}/{name}", "stray file") for name in stray]
    return problems


def sample_file_problems(
    path: Path, record: Mapping[str, Any], hidden_size: int, verify_hashes: bool
) -> list[str]:
    """One sample file against its manifest record: size, sha256, and the layout SpecForge reads."""
    if path.stat().st_size != record["bytes"]:
        return [f"{path.stat().st_size} bytes, manifest says {record['bytes']}"]
    if verify_hashes and file_sha256(path) != record["sha256"]:
        return ["sha256 differs from the manifest (corrupted or replaced)"]
    try:
        sample = read_sample_file(path)
    except CacheConfigError as error:
        return [str(error)]
    return sample_problems(sample, num_tokens=int(record["num_tokens"]), hidden_size=hidden_size)


def check_specforge_cache(cache_dir: str | os.PathLike, verify_hashes: bool = True) -> list[CacheProblem]:
    """Everything wrong with a specforge cache directory; empty when it is complete and intact."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / MANIFEST_FILE).exists():
        return [CacheProblem(MANIFEST_FILE, "missing: the cache is incomplete (the manifest is written last)")]
    try:
        manifest = read_manifest(cache_dir)
    except json.JSONDecodeError as error:
        return [CacheProblem(MANIFEST_FILE, f"not valid JSON: {error}")]
    problems = manifest_record_problems(manifest)
    if problems:
        return problems
    problems = cache_entry_problems(cache_dir, manifest)
    for path, record in sample_paths(cache_dir, manifest):
        if path.exists():
            name = f"{path.parent.name}/{path.name}"
            found = sample_file_problems(path, record, int(manifest["hidden_size"]), verify_hashes)
            problems += [CacheProblem(name, problem) for problem in found]
    mapping = cache_dir / VOCAB_MAPPING_FILE
    if mapping.exists():
        found = vocab_mapping_problems(mapping, manifest["selected_token_ids"], int(manifest["target_vocab_size"]))
        if verify_hashes and file_sha256(mapping) != manifest["vocab_mapping"]["sha256"]:
            found.append("sha256 differs from the manifest (corrupted or replaced)")
        problems += [CacheProblem(VOCAB_MAPPING_FILE, problem) for problem in found]
    return problems
