"""How the workflow's cost grows with the data, on synthetic ShareGPT-like conversations.

For each size (`--conversations`, 10^3 and 10^4 by default; 10^6 is a flag away), with the tokenizer and
chat template of `--tokenizer`, on an 8B-shaped checkpoint whose weights are holes (tools/dry_run_reads.py):
- one tokenization job's rate: the whole data as one part, in a fresh process: real tokens per
  CPU-second, wall time and peak RSS;
- the workflow's tokenization (index, parts of `--part-size`, join) through Snakemake with `--cores 1`
  and with `--cores 2`: wall time of each and their ratio, and the largest peak RSS any of its jobs
  logged (each job's log ends with it);
- then, for the largest size, a dry run at each shard count of `--shards`: its seconds, and per job.

The scheduling cost per job of a real run is `python -m tools.scheduler_scaling`'s; the fixed-cost share
of a run is in its validation report (the cost check).

    python -m tools.scale_benchmark --tokenizer resources/models/SmolLM2-135M-Instruct --workdir /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.dry_run_reads import RUN, measured_dry_run, sparse_checkpoint, workdir_for

WORDS = (
    "the model reads every token of a conversation and the draft learns what the target would say next about "
    "gardens rivers trains music bread weather stars numbers history science cooking travel language code "
    "functions errors tests files folders questions answers reasons examples steps plans results notes"
).split()
SEQ_LENGTH = 2048


def synthetic_conversations(count: int, seed: int = 0) -> list[dict]:
    """ShareGPT-like chats: 1 to 3 exchanges, short questions and longer answers (about 460 tokens each)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    chats = []
    for _ in range(count):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(8, 60)}, {"role": "assistant", "content": text(40, 260)}]
        chats.append({"messages": messages})
    return chats


def tokenize_in_this_process(data: Path, tokenizer_dir: Path, output: Path) -> dict:
    """What the tokenize rule's work costs here: real tokens, CPU and wall seconds, peak RSS."""
    from transformers import AutoTokenizer

    from eagle3_cache.token_store import read_tokenized_info
    from eagle3_cache.tokenization import write_tokenized_store

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cpu, wall = time.process_time(), time.perf_counter()
    write_tokenized_store(
        output, tokenizer, len(tokenizer), input_data=str(data), split=None, shuffle_seed=None, seq_length=SEQ_LENGTH
    )
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tokens = int(read_tokenized_info(output).lengths.sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": tokens, "cpu_seconds": cpu, "wall_seconds": wall, "peak_rss_mb": peak_mb}


def measured_tokenization(data: Path, tokenizer_dir: Path, output: Path) -> dict:
    """`tokenize_in_this_process` in a fresh interpreter, so that each size has a peak RSS of its own."""
    command = [
        sys.executable,
        "-m",
        "tools.scale_benchmark",
        "--tokenize-one",
        str(data),
        str(tokenizer_dir),
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


TOKENIZED = f"results/{RUN}/tokenized.h5"
PEAK_RSS = re.compile(r"peak RSS (\d+) MB")


def workflow_tokenization(workdir: Path, data: Path, model: Path, part_size: int, cores: int) -> dict:
    """The workflow's tokenization of `data` in a fresh workdir with `cores`: wall seconds (Snakemake's start
    and input hashing included), parts, and the largest peak RSS a tokenization job logged."""
    workdir_for(workdir, model, seq_length=SEQ_LENGTH, tokenize_part_size=part_size)
    shutil.copy(data, workdir / "data" / "conversations.jsonl")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", str(cores), TOKENIZED],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    logs = sorted((workdir / "logs" / RUN).glob("*.log"))
    peaks = [int(match[1]) for log in logs if (match := PEAK_RSS.search(log.read_text()))]
    parts = len(list((workdir / "results" / RUN / "tokenized").glob("part-*.h5")))
    return {"wall_seconds": wall, "parts": parts, "max_job_rss_mb": max(peaks)}


def dry_runs(workdir: Path, shard_counts: list[int]) -> list[str]:
    """A dry run at each shard count, on `workdir`'s tokenized conversations; a table row each."""
    measured_dry_run(workdir)  # the first one hashes the checkpoint (results/.input_sha256.json)
    conversations = len((workdir / "data" / "conversations.jsonl").read_text().splitlines())
    rows = []
    for count in shard_counts:
        shard_size = max(1, -(-conversations // count))
        config_file = workdir / "config" / "config.yaml"
        config = json.loads(config_file.read_text())
        config["runs"][RUN]["shard_size"] = shard_size
        config_file.write_text(json.dumps(config))
        _, seconds = measured_dry_run(workdir)
        shards = -(-conversations // shard_size)
        rows.append(f"| {shards} | {2 * shards} | {seconds:.1f} | {1000 * seconds / (2 * shards):.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a model folder with a tokenizer and chat template")
    parser.add_argument("--workdir", type=Path, help="an empty or missing folder to build in")
    parser.add_argument("--conversations", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--part-size", type=int, default=2500, help="tokenize_part_size of the workflow's runs")
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--tokenize-one", nargs=3, metavar=("DATA", "TOKENIZER", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenize_one:
        print(json.dumps(tokenize_in_this_process(*map(Path, args.tokenize_one))))
        return
    if args.tokenizer is None or args.workdir is None:
        parser.error("--tokenizer and --workdir are required")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "llama-8b"
    if not model.exists():
        sparse_checkpoint(model, args.tokenizer.resolve())
    print(
        "| conversations | real tokens | one job: tokens per CPU-second | one job: peak RSS MB "
        "| parts | workflow wall s, cores 1 | cores 2 | ratio | largest job's peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for count in args.conversations:
        data = args.workdir / f"conversations-{count}.jsonl"
        data.write_text("".join(json.dumps(chat) + "\n" for chat in synthetic_conversations(count)))
        one = measured_tokenization(data, args.tokenizer.resolve(), args.workdir / f"tokenized-{count}.h5")
        runs = {
            cores: workflow_tokenization(
                args.workdir / f"work-{count}-{cores}", data, model.resolve(), args.part_size, cores
            )
            for cores in (1, 2)
        }
        walls = [runs[cores]["wall_seconds"] for cores in (1, 2)]
        print(
            f"| {count:,} | {one['tokens']:,} | {one['tokens'] / one['cpu_seconds']:,.0f} | {one['peak_rss_mb']:.0f} "
            f"| {runs[1]['parts']} | {walls[0]:.1f} | {walls[1]:.1f} | {walls[1] / walls[0]:.2f} "
            f"| {max(run['max_job_rss_mb'] for run in runs.values())} |",
            flush=True,
        )
    largest = args.workdir / f"work-{max(args.conversations)}-2"
    print(f"\nDry runs of the workflow over {max(args.conversations):,} tokenized conversations:")
    print("| shards | shard jobs | dry run s | ms per shard job |")
    print("|---|---|---|---|")
    for row in dry_runs(largest, args.shards):
        print(row, flush=True)


if __name__ == "__main__":
    main()
