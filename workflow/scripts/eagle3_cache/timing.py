"""Per-phase wall time for the shard job's log and stats."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    """Wall time per named phase.

    On CUDA it waits for the current stream, so time lands on the phase that queued the work; it
    does not wait for other streams, so the writer's side-stream copies keep overlapping.
    """

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.synchronize:
            torch.cuda.current_stream().synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.current_stream().synchronize()
            self.seconds[name] += time.perf_counter() - start


class NullTimer:
    """A timer for callers that time nothing: its phases record nothing, anywhere."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NO_TIMER = NullTimer()
