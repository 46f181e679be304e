"""How validation scales with cores: every validation job of a cache of many shards, timed on 1 core and on 2.

    python -m tools.validation_scaling [--shards 32] [--rounds 3] [--quiet-load 1.0] [--workdir DIR]

Builds a cache once through the workflow, then times `snakemake --forcerun verify_shard parity`
(each shard re-verified, live parity, the commit and the report) with `--cores 1` and `--cores 2`,
back to back in each round, and prints each time, the load average around it, each round's ratio
and the median ratio. On a shared machine the load changes from round to round: the ratio of two
runs made under the same load is what to read, and `--quiet-load` waits before each run until the
1-minute load average is below it. The target is a
tiny random Llama carrying the demo model's tokenizer: its weights change nothing of what
validation costs, which follows from the cache's size and its number of shards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tools.benchmark.gpu_floor import llama_config
from tools.benchmark.workload import DEMO_CONVERSATIONS, REPO, demo_model, first_conversations

RUN = "scaling"
SNAKEMAKE = [
    str(Path(sys.executable).with_name("snakemake")),
    "--snakefile",
    str(REPO / "Snakefile"),
    "--profile",
    str(REPO / "profiles" / "local"),
]
VALIDATION_JOBS = ["--forcerun", "verify_shard", "parity"]


def random_target(directory: Path) -> Path:
    """The benchmark's tiny random Llama (8 layers, hidden size 64) with the demo model's tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not (directory / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(demo_model())
        config = llama_config(tiny=True)
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def write_config(work: Path, args: argparse.Namespace) -> Path:
    """The run's config: `args.shards` shards of `args.shard_size` demo conversations, on the CPU."""
    data = work / "conversations.jsonl"
    first_conversations(DEMO_CONVERSATIONS, args.shards * args.shard_size, data)
    run = {
        "target_model": str(random_target(work / "target")),
        "input_data": str(data),
        "seq_length": args.seq_length,
        "draft_vocab_size": args.draft_vocab_size,
        "shard_size": args.shard_size,
    }
    config = {"runs": {RUN: run}, "device": "cpu", "validation": {"num_samples": 8, "strict": False}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(work: Path, config: Path, cores: int, *args: str) -> float:
    """Run the workflow in `work` on `cores` cores; its wall time in seconds."""
    command = [*SNAKEMAKE, "-d", str(work), "--configfile", str(config), "--replace-workflow-config"]
    command += ["--cores", str(cores), "--set-threads", "compute_shard=1", "parity=1", *args]
    started = time.perf_counter()
    with open(work / "snakemake.log", "a") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {finished.returncode}); see {work / 'snakemake.log'}")
    return time.perf_counter() - started


def wait_for_quiet(load: float | None, timeout_s: float = 1800.0) -> None:
    """Wait until the 1-minute load average is below `load` (at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while load is not None and os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(5)


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Build once, then time the validation jobs with 1 and 2 cores, alternating."""
    config = write_config(work, args)
    print(f"Building {args.shards} shards in {work} ...", flush=True)
    snakemake(work, config, 2, "--rerun-incomplete")
    shard_bytes = sum(path.stat().st_size for path in (work / "results" / RUN / "shards").glob("shard-*"))
    times: dict[int, list[float]] = {1: [], 2: []}
    loads: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(args.rounds):
        for cores in (1, 2) if round_ % 2 == 0 else (2, 1):
            wait_for_quiet(args.quiet_load)
            load_before = os.getloadavg()[0]
            seconds = snakemake(work, config, cores, *VALIDATION_JOBS)
            times[cores].append(seconds)
            loads[cores].append((load_before + os.getloadavg()[0]) / 2)
            print(f"round {round_ + 1}: --cores {cores}: {seconds:.1f} s (load average {loads[cores][-1]:.1f})")
        print(f"round {round_ + 1}: 2 cores take {times[2][-1] / times[1][-1]:.2f}x the time of 1", flush=True)
    ratios = [two / one for one, two in zip(times[1], times[2], strict=True)]
    return {
        "shards": args.shards,
        "shard_bytes": shard_bytes,
        "seconds": times,
        "load_average": loads,
        "ratios_2_to_1": ratios,
        "median_ratio_2_to_1": statistics.median(ratios),
        "cpus": os.cpu_count(),
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.validation_scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3, help="timings per core count")
    parser.add_argument("--quiet-load", type=float, help="before each run, wait for a load average below this")
    parser.add_argument("--workdir", help="keep the cache here (reused when it is already built)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="validation-scaling-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        figures = measure(args, work)
    ratios = ", ".join(f"{ratio:.2f}" for ratio in figures["ratios_2_to_1"])
    print(
        f"{figures['shards']} shards, {figures['shard_bytes'] / 1e6:.0f} MB: on 2 cores validation takes "
        f"{figures['median_ratio_2_to_1']:.2f}x its time on 1 (median of {args.rounds} rounds: {ratios})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
