"""The GPU-ready check's plumbing: every step on tiny models on the CPU, and its one-line stop without CUDA."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import PARITY_ROWS
from tools.gpu_check import main


@pytest.mark.slow
def test_tiny_check_runs_every_step_and_the_second_lease_waits_for_the_first(tiny_chat_target, tmp_path, capsys):
    conversations = tmp_path / "conversations.jsonl"
    conversations.write_text("".join(json.dumps(row) + "\n" for row in PARITY_ROWS * 2))
    out = tmp_path / "out"
    code = main(
        [
            *("--tiny", "--model", str(tiny_chat_target), "--conversations", str(conversations)),
            *("--num-samples", "8", "--seq-length", "48", "--draft-vocab-size", "64", "--out", str(out)),
        ]
    )
    report = json.loads((out / "gpu-check.json").read_text())
    assert code == 0, {name: step["summary"] for name, step in report["steps"].items()}
    assert list(report["steps"]) == ["floor", "parity", "leases"]
    floor = report["steps"]["floor"]
    assert "of the floor" in floor["summary"] and floor["run"]["load_seconds"] > 0
    assert re.search(r"model load [\d.]+s \(page cache to GPU\): shard_size >= \d+ keeps it under 5%", floor["summary"])
    parity = report["steps"]["parity"]
    assert (
        parity["parity"]["identical"] and parity["runs"]["device"]["samples"] == parity["runs"]["cpu"]["samples"] == 8
    )
    leases = report["steps"]["leases"]
    first, second = sorted(leases["jobs"], key=lambda job: job["leased_at"])
    assert first["gpus"] == second["gpus"] == ["0"] and leases["gpu_count"] == 1
    assert second["leased_at"] >= first["done_at"] and leases["second_waited_seconds"] > 0
    summary = (out / "gpu-check.txt").read_text()
    assert summary.startswith("gpu-check on CPU") and summary.count("PASS") == 4
    assert summary in capsys.readouterr().out
    assert not (out / "work").exists()


def test_without_cuda_it_stops_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith("gpu-check: no CUDA device") and "\n" not in message
    assert not (tmp_path / "out").exists()
