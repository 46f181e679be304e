"""Phase timers: a shard job's timer adds up its phases; the no-timer default keeps nothing."""

from __future__ import annotations

import torch

from eagle3_cache.timing import NO_TIMER, PhaseTimer


def test_a_phase_timer_adds_up_each_phase():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("forward"):
            pass
    with timer.phase("write"):
        pass
    assert sorted(timer.seconds) == ["forward", "write"]
    assert all(seconds >= 0 for seconds in timer.seconds.values())


def test_the_no_timer_default_records_nothing():
    with NO_TIMER.phase("forward"):
        pass
    assert vars(NO_TIMER) == {}, "phases timed by nobody must not pile up in a process-wide object"
