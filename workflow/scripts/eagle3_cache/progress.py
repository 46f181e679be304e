"""What a workflow has done so far, run by run, read from its files: for a user watching a long run, on
this machine or on a SLURM cluster (run it where the workflow's directory is, on the login node).

    python -m eagle3_cache.progress [--watch 60] [--window 600]

Per run: shards done (their stats written under the run's current settings) and verified against the
total, real tokens per second over the last `--window` seconds, an ETA at that rate, bytes written
against the disk plan, and whether the cache is committed; then the last Snakemake run's failed jobs,
each with its one-line error. No torch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import CACHE_SEMANTICS_VERSION
from .errors import stopping_on_config_errors
from .failures import failure_lines
from .input_digest import FileHashes, target_weights_sha256
from .layout import (
    CACHE_DIR,
    MANIFEST_FILE,
    PLAN,
    SHARD_DIR_NAME,
    SHARD_NAME,
    SHARD_SETTINGS,
    SHARD_STATS,
    SPECFORGE_FORMAT,
    VERIFIED,
    WEIGHTS_DIGEST,
    num_shards,
    shard_dir_name,
    shard_file_name,
    shard_id,
)
from .provenance import settings_fingerprint
from .units import format_bytes

CONFIG_FILE = "config/config.yaml"
SCHEMA_FILE = "workflow/schemas/config.schema.yaml"
SNAKEMAKE_LOGS = ".snakemake/log"


@dataclass(frozen=True)
class RunProgress:
    run: str
    total_shards: int | None  # None before the disk plan
    done: int
    verified: int
    real_tokens: int
    recent_tokens_per_second: float | None
    eta_seconds: float | None
    written_bytes: int
    planned_bytes: int | None
    committed: bool

    def line(self) -> str:
        if self.total_shards is None:
            return f"{self.run}: not planned yet (tokenization, vocabulary or disk plan still to run)"
        parts = [f"{self.run}: {self.done}/{self.total_shards} shards done, {self.verified} verified"]
        if self.recent_tokens_per_second is not None:
            parts.append(f"{self.recent_tokens_per_second:,.0f} real tokens/s lately")
        if self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds / 60:.1f} min")
        planned = f" of {format_bytes(self.planned_bytes)} planned" if self.planned_bytes else ""
        parts.append(f"{format_bytes(self.written_bytes)}{planned} written")
        parts.append("committed" if self.committed else "not committed")
        return "; ".join(parts)


def expected_fingerprint(settings: Mapping[str, Any]) -> str:
    """The settings fingerprint the run's shard jobs record now (what the shard rules' params give)."""
    shard_settings = {name: settings[name] for name in SHARD_SETTINGS}
    weights = target_weights_sha256(settings["target_model"], FileHashes())
    return settings_fingerprint(
        {**shard_settings, WEIGHTS_DIGEST: weights, "cache_semantics_version": CACHE_SEMANTICS_VERSION}
    )


def current_stats(run: str, settings: Mapping[str, Any], total: int) -> list[tuple[dict[str, Any], float]]:
    """Each shard's stats written under the run's current settings, whose shard is present, with the time
    it was written."""
    pattern, fingerprint = SHARD_STATS[settings["format"]], expected_fingerprint(settings)
    found = []
    for index in range(total):
        path = Path(pattern.format(run=run, shard=shard_id(index)))
        try:
            stats, written = json.loads(path.read_text()), path.stat().st_mtime
        except (OSError, ValueError):
            continue
        shard = Path(CACHE_DIR.format(run=run), stats_shard_name(stats, settings))
        if stats.get("settings_fingerprint") == fingerprint and shard.exists():
            found.append((stats, written))
    return found


def stats_shard_name(stats: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The shard's name in the cache directory: a file, or a specforge directory."""
    return (shard_dir_name if settings["format"] == SPECFORGE_FORMAT else shard_file_name)(stats["shard"])


def verified_count(run: str, stats: Sequence[Mapping[str, Any]]) -> int:
    """Shards whose verification record describes the bytes their stats describe."""
    count = 0
    for shard in stats:
        path = Path(VERIFIED.format(run=run, shard=shard_id(shard["shard"])))
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        count += not record.get("problems") and record.get("bytes") == shard["bytes"]
    return count


def run_progress(run: str, settings: Mapping[str, Any], now: float, window: float) -> RunProgress:
    """Where one run stands at `now`."""
    try:
        plan = json.loads(Path(PLAN.format(run=run)).read_text())
    except (OSError, ValueError):
        plan = None
    if plan is None:
        return RunProgress(run, None, 0, 0, 0, None, None, 0, None, False)
    total = num_shards(plan["num_samples"], settings["shard_size"])
    found = current_stats(run, settings, total)
    stats = [s for s, _ in found]
    real_tokens = sum(s["real_tokens"] for s in stats)
    recent = [(s, written) for s, written in found if written >= now - window]
    rate = None
    if recent:
        started = min(written - s["seconds"].get("total", 0.0) for s, written in recent)
        rate = sum(s["real_tokens"] for s, _ in recent) / max(now - max(started, now - window), 1e-9)
    done_samples = sum(s["num_samples"] for s in stats)
    eta = None
    if rate and done_samples and len(stats) < total:
        eta = (plan["num_samples"] - done_samples) * (real_tokens / done_samples) / rate
    planned = sum(f["apparent_bytes"] for f in plan["files"] if is_shard_name(f["file"]))
    return RunProgress(
        run,
        total,
        len(stats),
        verified_count(run, stats),
        real_tokens,
        rate,
        eta,
        sum(s["bytes"] for s in stats),
        planned or None,
        Path(CACHE_DIR.format(run=run), MANIFEST_FILE).exists(),
    )


def is_shard_name(name: str) -> bool:
    """Whether a disk plan entry is a shard (not the embeddings or the vocabulary mapping)."""
    return bool(SHARD_NAME.match(name) or SHARD_DIR_NAME.match(name))


def latest_snakemake_log(directory: Path = Path(SNAKEMAKE_LOGS)) -> Path | None:
    logs = sorted(directory.glob("*.snakemake.log"), key=os.path.getmtime) if directory.is_dir() else []
    return logs[-1] if logs else None


def report(config: dict[str, Any], now: float, window: float) -> list[str]:
    """The lines the command prints: a line per run, then the last run's failed jobs."""
    lines = [run_progress(run, settings, now, window).line() for run, settings in config["runs"].items()]
    log = latest_snakemake_log()
    failed = failure_lines([log]) if log else []
    if failed:
        lines.append(f"failed jobs in the last Snakemake run ({log}):")
        lines += [f"  {line}" for line in failed]
    return lines


def checked_run_config() -> dict[str, Any]:
    """The workflow's config as Snakemake reads it: the schema's defaults filled in."""
    import yaml

    from .startup import checked_config

    config = yaml.safe_load(Path(CONFIG_FILE).read_text())
    checked_config(config, SCHEMA_FILE)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch", type=float, help="print again every this many seconds")
    parser.add_argument("--window", type=float, default=600.0, help="seconds the recent rate is taken over")
    args = parser.parse_args()
    with stopping_on_config_errors():
        config = checked_run_config()
    while True:
        print("\n".join(report(config, time.time(), args.window)), flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)
        print()


if __name__ == "__main__":
    main()
