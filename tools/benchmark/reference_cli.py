"""NeMo Automodel 0.7.0's `precompute_eagle3` command line, run as is, with its target forward timed.

    python -m tools.benchmark.reference_cli STATS_JSON THREADS -- <precompute_eagle3's own flags>

Runs `nemo_automodel.components.speculative.precompute_eagle3.main` on those flags, so the cache
is the CLI's own: manifest, target embeddings and shards. Two things are swapped in its module,
neither changing what it computes: the target wrapper and `_compute_batch_cache` are timed (the
forward and the distribution), and on a CPU the model comes from plain transformers'
AutoModelForCausalLM, since the CLI's own loader needs CUDA (it loads in the dtype the CLI picks:
fp32 on a CPU). Writes the timings, the positions run through the target and the process's start
(interpreter and imports, up to `main`) to STATS_JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eagle3_cache.logs import process_age_seconds


def synchronized() -> None:
    """Wait for the GPU work queued so far, so that a clock read after it times that work."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_calls(function: Callable, stats: dict, key: str) -> Callable:
    """`function`, adding each call's seconds (the GPU work it queued included) to `stats[key]`."""

    def timed_function(*args: Any, **kwargs: Any) -> Any:
        synchronized()
        started = time.perf_counter()
        value = function(*args, **kwargs)
        synchronized()
        stats[key] += time.perf_counter() - started
        return value

    return timed_function


def instrument(module: Any, stats: dict, device: str) -> None:
    """Time the CLI's target forwards and distributions; on a CPU, load the model through transformers."""
    wrapper = module.HFEagle3TargetModel

    class TimedTarget(wrapper):
        def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
            stats["forwards"] += 1
            stats["positions"] += kwargs["input_ids"].numel()
            return timed_calls(super().generate_batch, stats, "forward_seconds")(*args, **kwargs)

    module.HFEagle3TargetModel = TimedTarget
    module._compute_batch_cache = timed_calls(module._compute_batch_cache, stats, "distribution_seconds")
    if device != "cuda":
        from transformers import AutoModelForCausalLM

        module.NeMoAutoModelForCausalLM = AutoModelForCausalLM
        stats["model_loader"] = "transformers.AutoModelForCausalLM"


def main(argv: Sequence[str]) -> int:
    """Run the CLI on the flags after `--`; write the stats whatever its outcome."""
    stats_path, threads, separator, *flags = argv
    if separator != "--":
        raise SystemExit(__doc__)
    torch.set_num_threads(int(threads))
    from nemo_automodel.components.speculative import precompute_eagle3

    stats = {
        "startup_seconds": process_age_seconds(),
        "forwards": 0,
        "positions": 0,
        "forward_seconds": 0.0,
        "distribution_seconds": 0.0,
        "model_loader": "NeMoAutoModelForCausalLM",
    }
    instrument(precompute_eagle3, stats, flags[flags.index("--device") + 1])
    try:
        return precompute_eagle3.main(list(flags))
    finally:
        Path(stats_path).write_text(json.dumps(stats))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
