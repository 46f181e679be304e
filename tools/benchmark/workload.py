"""What every mode runs: the workload, the demo's model and conversations, and one run per child process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.layout import DEMO_MODEL

from .measure import log_tail

REPO = Path(__file__).resolve().parents[2]
DEMO_CONVERSATIONS = REPO / "config" / "demo" / "conversations.jsonl"
WORKFLOW_DEMO_MODEL = REPO / DEMO_MODEL
MODEL_CACHE = Path.home() / ".cache" / "eagle3-cache"
SHUFFLE_SEED = 42  # both CLIs' default; local JSON is never shuffled


@dataclass(frozen=True)
class Workload:
    """What both sides compute: the same model, conversations and settings."""

    model: str
    conversations: str
    seq_length: int
    draft_vocab_size: int
    dtype: str
    batch_size: int
    shard_size: int
    device: str
    threads: int  # torch intra-op threads in every run
    compute_dtype: str = "auto"  # ours only: the reference computes as Automodel does (our `auto`)


def run_child(kind: str, job: dict, work: Path) -> dict:
    """Run one job in a fresh Python process; its result plus the process's wall time."""
    name = f"{kind}-{len(list(work.glob('*.job.json')))}"
    job = {**job, "kind": kind, "result": str(work / f"{name}.result.json")}
    job_path = work / f"{name}.job.json"
    job_path.write_text(json.dumps(job))
    log_path = work / f"{name}.log"
    started = time.perf_counter()
    command = [sys.executable, "-m", "tools.benchmark", "--child", str(job_path)]
    with open(log_path, "w") as log:
        finished = subprocess.run(command, cwd=REPO, stdout=log, stderr=log)
    wall_seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(
            f"the {kind} run failed (exit {finished.returncode}); end of {log_path}:\n{log_tail(log_path)}"
        )
    return {**json.loads(Path(job["result"]).read_text()), "wall_seconds": wall_seconds}


def demo_model() -> str:
    """The demo model as a local checkpoint: the workflow's conversion, or ours cached in MODEL_CACHE."""
    from eagle3_cache.demo_model import convert_gguf, gguf_path

    if WORKFLOW_DEMO_MODEL.is_dir():
        return str(WORKFLOW_DEMO_MODEL)
    cached = MODEL_CACHE / WORKFLOW_DEMO_MODEL.name
    if not cached.is_dir():
        print(f"Converting the demo model once into {cached} ...", flush=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_path(), cached)
    return str(cached)


def first_conversations(source: Path, count: int, destination: Path) -> int:
    """Copy the first `count` rows of a conversations file as JSON Lines; returns how many there were."""
    from eagle3_cache.data import read_json_rows

    if not source.is_file():
        raise CacheConfigError(
            f"{source}: no such conversations file. Pass --conversations, or make the demo's with "
            "python -m tools.make_demo_conversations"
        )
    rows = read_json_rows(source)[:count]
    destination.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def prepared_jobs(workload: Workload, work: Path) -> tuple[dict, dict]:
    """Tokenize and select the vocabulary once; returns (job settings for our runs, prepare timings)."""
    job = {
        "workload": asdict(workload),
        "tokenized": str(work / "tokenized.h5"),
        "selection": str(work / "vocab_selection.pt"),
    }
    return job, run_child("prepare", job, work)


def workload_from(args: argparse.Namespace, work: Path) -> Workload:
    """The run's workload, with the conversations cut to `--num-samples` rows in `work`."""
    conversations = work / "conversations.jsonl"
    available = first_conversations(Path(args.conversations), args.num_samples, conversations)
    if available < args.num_samples:
        print(f"note: {args.conversations} has only {available} conversations", flush=True)
    model = args.model or demo_model()
    # Absolute, for the child processes run from the repository root.
    return workload_of(args, str(Path(model).resolve()) if Path(model).exists() else model, str(conversations))


def workload_of(args: argparse.Namespace, model: str, conversations: str) -> Workload:
    """The settings of `args` on `model` and `conversations`."""
    return Workload(
        model=model,
        conversations=conversations,
        seq_length=args.seq_length,
        draft_vocab_size=args.draft_vocab_size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        threads=args.threads,
        compute_dtype=args.compute_dtype,
    )
