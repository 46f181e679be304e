"""The --gpu-floor mode: our shards on a random Llama-3.1-8B (or tiny) model against this device's limits."""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .measure import MIB, tokens_per_s
from .ours import compute_our_shards
from .workload import Workload, run_child, workload_of

# The most of a shard job's time the model load should take, for the shard size the floor prints.
LOAD_SHARE = 0.05
# The forward budgets the floor runs: the default's (batch 4 x seq_length 2048) and config/README.md's
# suggestion for an 80 GB GPU.
FLOOR_BUDGETS = (8192, 65536)

if TYPE_CHECKING:
    from transformers import LlamaConfig


def run_floor(job: dict) -> dict:
    """A random-weight model of a real architecture through our shards, next to this device's limits."""
    from transformers import AutoModelForCausalLM

    from eagle3_cache.target import compute_dtype, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    config = llama_config(job["tiny"])
    output = Path(job["output"])
    load_seconds = measured_load(config, output.parent / "checkpoint", device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(device)).eval()
    # Untimed: the first forward picks kernels and grows the allocator's pool.
    compute_our_shards(model, workload, {**job, "shards": [0], "output": str(output.parent / "warm-up")})
    budgets = []
    for budget in FLOOR_BUDGETS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = compute_our_shards(
            model, workload, {**job, "tokens_per_forward": budget, "output": str(output / str(budget))}
        )
        budgets.append({"tokens_per_forward": budget, **run, **memory_peaks(device)})
    return {
        **budgets[0],
        "budgets": budgets,
        "load_seconds": load_seconds,
        "matmul_flops_per_s": matmul_rate(device, compute_dtype(device), size=512 if job["tiny"] else 8192),
        "disk_bytes_per_s": disk_write_rate(Path(job["output"]), (64 if job["tiny"] else 4096) * MIB),
        "linear_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        "attention_width": config.num_attention_heads * config.head_dim,
        "num_layers": config.num_hidden_layers,
    }


def memory_peaks(device: torch.device) -> dict[str, int]:
    """The GPU's peak allocated and reserved bytes since the last reset; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def measured_load(config: LlamaConfig, directory: Path, device: torch.device) -> float:
    """Seconds a shard job takes to load a checkpoint of `config` (`eagle3_cache.target.load_target`) onto
    `device`, from bf16 safetensors whose weights are holes: read at page-cache speed, with no disk, as a
    checkpoint the previous shard job left in the page cache."""
    from transformers import AutoModelForCausalLM

    from eagle3_cache.target import load_target
    from tools.dry_run_reads import write_sparse_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {
            name: list(tensor.shape) for name, tensor in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    write_sparse_safetensors(directory / "model.safetensors", shapes)
    started = time.perf_counter()
    model = load_target(str(directory), revision=None, trust_remote_code=False, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def budget_lines(run: dict) -> list[str]:
    """One line per forward budget the floor ran: real tokens/s, and on a GPU its peak memory."""
    lines = []
    for budget in run["budgets"]:
        memory = ""
        if "peak_reserved_bytes" in budget:
            memory = (
                f", peak {budget['peak_allocated_bytes'] / 2**30:.1f} GiB allocated, "
                f"{budget['peak_reserved_bytes'] / 2**30:.1f} GiB reserved"
            )
        lines.append(
            f"tokens_per_forward {budget['tokens_per_forward']}: {tokens_per_s(budget):.4g} real tokens/s{memory}"
        )
    return lines


def shard_size_for_load_share(run: dict, share: float) -> int:
    """The smallest shard_size at which the model load is at most `share` of a shard job's load and forwards,
    at the run's real tokens/s and real tokens per sample."""
    tokens_per_sample = run["real_tokens"] / run["samples"]
    return math.ceil((1 - share) / share * run["load_seconds"] * tokens_per_s(run) / tokens_per_sample)


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


def realistic_lengths(count: int, seq_length: int, rng: np.random.Generator) -> np.ndarray:
    """Chat-like content lengths: log-normal around a third of seq_length, a few truncated at it."""
    lengths = rng.lognormal(mean=np.log(seq_length / 3), sigma=0.7, size=count)
    return np.clip(lengths.astype(np.int64), 16, seq_length)


def write_random_store(path: Path, count: int, seq_length: int, vocab_size: int, seed: int = 0) -> None:
    """A tokenized store of random ids at realistic lengths; the first quarter of each row is the prompt."""
    from eagle3_cache.token_store import TokenizedSample, synthetic_header, write_tokenized

    rng = np.random.default_rng(seed)
    header = synthetic_header(
        seq_length, vocab_size, source={"input_data": "random", "split": None, "shuffle_seed": seed}
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
    workload = workload_of(args, "random " + ("tiny Llama" if args.tiny else "Llama-3.1-8B"), "random")
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
    for line in budget_lines(run):
        print(line)
    print(
        f"model load (page cache to {workload.device}) {run['load_seconds']:.1f}s: shard_size >= "
        f"{shard_size_for_load_share(run, LOAD_SHARE)} keeps it under {LOAD_SHARE:.0%} of a shard job"
    )
