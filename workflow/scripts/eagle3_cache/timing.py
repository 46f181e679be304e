"""Per-phase wall time for the shard job's log and stats."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch


class PhaseTimer:
    """Wall time per named phase; on CUDA it synchronizes so time lands on the phase that spent it."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start


NO_TIMER = PhaseTimer(torch.device("cpu"))
