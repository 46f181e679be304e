"""The validation report on a small real cache: a clean cache passes, each kind of damage fails its check.

Each test re-runs what the workflow's jobs do before the report (shard verification, live parity) on
the damaged cache, then the report from their records.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import runpy
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eagle3_cache.cache_dir import read_manifest
from eagle3_cache.layout import MANIFEST_FILE, shard_file_name
from eagle3_cache.parity import parity_sample_indices
from eagle3_cache.report_html import render_html
from eagle3_cache.shard_format import SAFETENSORS_DTYPES, read_shard_rows
from eagle3_cache.sparse_digest import file_digest
from eagle3_cache.validation import coverage_curve, failed_path
from helpers import (
    TinyCache,
    build_tiny_cache,
    check_tiny_parity,
    plan_namespace,
    validate_namespace,
    validated_tiny_cache,
    verify_tiny_cache,
)

REPO = Path(__file__).resolve().parents[1]
VALIDATE_SCRIPT = REPO / "workflow" / "scripts" / "validate.py"
PLAN_SCRIPT = REPO / "workflow" / "scripts" / "plan_disk.py"
SHARD_SIZE = 3
PARITY_SAMPLES = 4
# The random target's top-1 is spread over the whole vocabulary, so its draft vocabulary must be
# most of it for most supervised positions to train the draft.
DRAFT_VOCAB = 300
WORDS = "the quick brown fox jumps over the lazy dog hello there how are you today fine thanks".split()


def text(start: int, length: int) -> str:
    return " ".join(WORDS[(start + 3 * i) % len(WORDS)] for i in range(length))


# 8 samples in shards of 3, 3, 2: sample 5's user turn fills seq_length (truncated, nothing supervised),
# sample 6's assistant turn is cut.
ROWS = [
    {
        "messages": [
            {"role": "user", "content": text(i, 2 + i % 3)},
            {"role": "assistant", "content": text(2 * i, 3 + i)},
        ]
    }
    for i in range(8)
]
ROWS[5]["messages"][0]["content"] = text(1, 40)
ROWS[6]["messages"][1]["content"] = text(4, 40)
TRUNCATED, UNSUPERVISED = [5, 6], [5]


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, tiny_chat_target) -> TinyCache:
    run_dir = tmp_path_factory.mktemp("built") / "results" / "tiny"
    return build_tiny_cache(run_dir, tiny_chat_target, ROWS, shard_size=SHARD_SIZE, draft_vocab_size=DRAFT_VOCAB)


@pytest.fixture
def cache(built_cache, tmp_path) -> TinyCache:
    """A private copy of the built cache, free to damage."""
    return built_cache.copied_to(tmp_path)


def prepare(cache: TinyCache, model, num_samples: int = PARITY_SAMPLES) -> None:
    """The jobs the report reads: each shard's verification, live parity with `model` as the target."""
    verify_tiny_cache(cache)
    check_tiny_parity(cache, model, num_samples)


def validate(cache: TinyCache, model, *, num_samples: int = PARITY_SAMPLES, benchmarks: list[Path] = ()):
    """Every check on `cache`, with `model` as the live target."""
    return validated_tiny_cache(cache, model, num_samples, benchmarks)


def failed(report) -> set[str]:
    return {check.key for check in report.checks if not check.passed}


# --- Damage, written the way it happens: bytes changed in place ------------------------------


def element_offset(shard: Path, field: str, index: tuple[int, ...]) -> tuple[int, torch.dtype]:
    """The byte offset in the shard file of `field[index]` (a full index), and the field's dtype."""
    with open(shard, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(length))[field]
    dtype = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    flat = 0
    for position, size in zip(index, entry["shape"], strict=True):
        flat = flat * size + position
    return 8 + length + entry["data_offsets"][0] + flat * torch.empty((), dtype=dtype).element_size(), dtype


def overwrite_value(shard: Path, field: str, index: tuple[int, ...], value: float | bool) -> None:
    offset, dtype = element_offset(shard, field, index)
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes())


def rerecord_hashes(cache: TinyCache) -> None:
    """Make the stats and the manifest agree with the shards again: damage done before hashing, as a buggy build
    would do it."""
    manifest = read_manifest(cache.cache_dir)
    for record, stats_path in zip(manifest["shards"], cache.stats, strict=True):
        record["digest"] = file_digest(cache.cache_dir / record["file"])
        stats_path.write_text(json.dumps({**json.loads(stats_path.read_text()), "digest": record["digest"]}))
    (cache.cache_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


# --- The checks --------------------------------------------------------------------------------


def test_a_clean_cache_passes_every_check(cache, target_model):
    benchmark = cache.run_dir / "shard-000000.tsv"  # as the compute_shard rule's benchmark directive names it
    benchmark.write_text("s\th:m:s\tmax_rss\tmax_vms\n1.5\t0:00:01\t812.3\tNA\n")
    report = validate(cache, target_model, benchmarks=[benchmark])
    assert failed(report) == set(), [c.summary for c in report.checks]
    parity = report.check("parity")
    assert parity.figures["samples_checked"] == PARITY_SAMPLES
    assert {s["shard"] for s in parity.series["samples"]} == {0, 1, 2}
    supervision = report.check("supervision")
    assert supervision.series["truncated_samples"] == TRUNCATED
    assert supervision.series["unsupervised_samples"] == UNSUPERVISED
    cost = report.check("cost").series["shards"]
    assert cost[0]["max_rss_mb"] == pytest.approx(812.3) and cost[1]["max_rss_mb"] is None
    disk = report.check("disk").figures
    assert disk["shard_bytes"] == sum(p.stat().st_size for p in cache.cache_dir.glob("shard-*"))


def test_a_topk_cache_passes_every_check(tmp_path, tiny_chat_target, target_model):
    topk_cache = build_tiny_cache(
        tmp_path, tiny_chat_target, ROWS, shard_size=SHARD_SIZE, draft_vocab_size=DRAFT_VOCAB, target_probs_topk=5
    )
    report = validate(topk_cache, target_model)
    assert failed(report) == set(), [c.summary for c in report.checks]


def test_a_draft_vocabulary_missing_most_target_predictions_fails_supervision(tmp_path, tiny_chat_target, target_model):
    small = build_tiny_cache(tmp_path, tiny_chat_target, ROWS, shard_size=SHARD_SIZE, draft_vocab_size=64)
    report = validate(small, target_model, num_samples=0)
    assert failed(report) == {"supervision"}
    assert report.check("supervision").figures["in_draft_share"] < 0.5


def test_flipped_bytes_fail_the_checksum(cache, target_model):
    shard = cache.cache_dir / shard_file_name(1)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = validate(cache, target_model, num_samples=0)
    assert "integrity" in failed(report)
    assert any("digest" in line and shard.name in line for line in report.check("integrity").details)


def test_a_value_beyond_tolerance_fails_live_parity(cache, target_model):
    sample, position = 3, 2  # shard 1, row 0: in the parity set
    assert sample in parity_sample_indices(8, SHARD_SIZE, PARITY_SAMPLES, seed=0)
    shard = cache.cache_dir / shard_file_name(1)
    offset, _ = element_offset(shard, "aux_hidden_states", (0, position, 7))
    stored = torch.frombuffer(bytearray(shard.read_bytes()[offset : offset + 2]), dtype=torch.bfloat16)
    overwrite_value(shard, "aux_hidden_states", (0, position, 7), float(stored) + 0.5)
    rerecord_hashes(cache)
    report = validate(cache, target_model)
    assert failed(report) == {"parity"}
    [problem] = report.check("parity").details
    assert f"sample {sample} " in problem and "aux_hidden_states" in problem and f"position {position}" in problem


def test_a_deleted_shard_fails_completeness_and_still_gives_a_report(cache, target_model):
    (cache.cache_dir / shard_file_name(1)).unlink()
    report = validate(cache, target_model)
    assert {"integrity", "sanity"} <= failed(report)
    assert any(shard_file_name(1) in line and "missing" in line for line in report.check("integrity").details)
    assert "FAIL" in render_html(report)


@pytest.mark.parametrize(
    "field, position, value, problem",
    [
        ("target_probs", 3, float("nan"), "target_probs: 1 NaN or Inf values, first in sample 4"),
        ("aux_hidden_states", 39, 1.0, "aux_hidden_states: 1 padding positions (attention_mask 0) holding nonzero"),
        ("position_mask", 0, True, "position_mask: 1 positions set outside the shifted loss_mask, first in sample 4"),
        ("input_ids", 2, 7, "samples whose ids or masks are not the tokenized rows: 4"),
    ],
)
def test_damage_outside_the_parity_samples_fails_the_sanity_check(cache, target_model, field, position, value, problem):
    sample, shard = 4, cache.cache_dir / shard_file_name(1)  # row 1 of shard 1, not recomputed
    assert sample not in parity_sample_indices(8, SHARD_SIZE, PARITY_SAMPLES, seed=0)
    stored = read_shard_rows(shard, [1])
    assert not stored["attention_mask"][0, 39] and not stored["loss_mask"][0, 0]  # padding; unsupervised
    overwrite_value(shard, field, (1, position, 0)[: stored[field].dim()], value)
    rerecord_hashes(cache)
    report = validate(cache, target_model)
    assert failed(report) == {"sanity"}
    assert any(problem in line for line in report.check("sanity").details), report.check("sanity").details
    json.dumps(report.to_json(), allow_nan=False)  # a NaN's infinite sum error is written as text


def test_parity_samples_are_distinct_seeded_and_spread_over_the_shards():
    picks = parity_sample_indices(num_samples=100, shard_size=10, count=8, seed=3)
    assert len(set(picks)) == 8 and len({p // 10 for p in picks}) == 8
    assert picks == parity_sample_indices(100, 10, 8, seed=3) != parity_sample_indices(100, 10, 8, seed=4)
    assert parity_sample_indices(num_samples=5, shard_size=2, count=8, seed=0) == [0, 1, 2, 3, 4]


def test_the_coverage_curve_rises_to_one_and_holds_the_chosen_size():
    counts = torch.tensor([0, 50, 30, 0, 15, 5]).numpy()
    curve = coverage_curve(counts, marked_size=3)
    assert [3, 0.95] in curve and curve[-1] == [6, 1.0]
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(curve))


# --- The HTML ----------------------------------------------------------------------------------


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_html_parses_and_fetches_nothing(cache, target_model):
    (cache.cache_dir / shard_file_name(2)).unlink()
    document = render_html(validate(cache, target_model))
    parser = TagCollector()
    parser.feed(document)
    parser.close()
    names = [tag for tag, _ in parser.tags]
    assert "script" not in names and "link" not in names and "img" not in names and "iframe" not in names
    references = [attrs.get(key) for _, attrs in parser.tags for key in ("src", "href") if attrs.get(key)]
    assert all(reference.startswith("#") for reference in references), references
    assert names.count("svg") == 3 and "url(" not in document and "@import" not in document
    assert "http" not in document.lower()


# --- The rule script ---------------------------------------------------------------------------


def validate_rule_namespace(cache: TinyCache, strict: bool) -> SimpleNamespace:
    """The `snakemake` object Snakemake's `script:` directive gives validate.py, with its disk plan made."""
    namespace = plan_namespace(cache)
    runpy.run_path(str(PLAN_SCRIPT), init_globals={"snakemake": namespace})
    return validate_namespace(cache, strict)


def run_rule_script(cache: TinyCache, model, strict: bool) -> SimpleNamespace:
    """The jobs before the report, then validate.py as Snakemake runs it; returns its outputs."""
    prepare(cache, model, num_samples=2)
    snakemake = validate_rule_namespace(cache, strict)
    runpy.run_path(str(VALIDATE_SCRIPT), init_globals={"snakemake": snakemake})
    return snakemake.output


def test_strict_mode_fails_the_job_retires_the_manifest_and_keeps_the_report(cache, target_model):
    (cache.cache_dir / shard_file_name(0)).unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_rule_script(cache, target_model, strict=True)
    kept = failed_path(cache.run_dir / "validation_report.html")
    message = str(exit_info.value.code)
    assert "Complete and intact" in message and str(kept) in message and "validation.strict: false" in message
    assert kept.exists() and failed_path(cache.run_dir / "validation.json").exists()
    assert not (cache.run_dir / "validation_report.html").exists()
    assert not (cache.cache_dir / MANIFEST_FILE).exists()


def test_lenient_mode_writes_the_marked_report_and_a_pass_clears_old_failures(cache, target_model):
    shard = cache.cache_dir / shard_file_name(0)
    saved = shard.read_bytes()
    shard.unlink()
    output = run_rule_script(cache, target_model, strict=False)
    assert "Complete and intact" in json.loads(Path(output.json).read_text())["failed_checks"]
    assert "FAIL" in Path(output.report).read_text()
    assert (cache.cache_dir / MANIFEST_FILE).exists()
    kept = failed_path(Path(output.report))
    kept.write_text("left by an earlier failure")
    shard.write_bytes(saved)
    run_rule_script(cache, target_model, strict=True)
    assert json.loads(Path(output.json).read_text())["passed"] and not kept.exists()


class OpenedFiles:
    """The names of the files opened in a directory while it is watched (Linux inotify, through libc)."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20
    EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

    def __init__(self, directory: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(directory).encode(), self.IN_OPEN | self.IN_ACCESS) < 0:
            pytest.skip(f"inotify is not available here: errno {ctypes.get_errno()}")

    def __enter__(self) -> OpenedFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)

    def names(self) -> set[str]:
        """The files opened since the last call."""
        names = set()
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, 1 << 16):
                offset = 0
                while offset < len(data):
                    *_, length = self.EVENT.unpack_from(data, offset)
                    start = offset + self.EVENT.size
                    names.add(data[start : start + length].rstrip(b"\0").decode())
                    offset = start + length
        return names - {""}  # "" is the directory itself, listed


def bytes_read_by_this_process() -> int:
    """`rchar` of /proc/self/io: every byte this process has read through read() and its kin."""
    line = next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))
    return int(line.split()[1])


def test_the_report_job_opens_no_shard_and_reads_less_than_one(cache, target_model, capsys):
    prepare(cache, target_model, num_samples=2)
    snakemake = validate_rule_namespace(cache, strict=True)
    shard_bytes = sorted(path.stat().st_size for path in cache.cache_dir.glob("shard-*"))
    with OpenedFiles(cache.cache_dir) as watch:
        (cache.cache_dir / shard_file_name(0)).read_bytes()
        assert watch.names() == {shard_file_name(0)}  # the watch sees a shard being read
        before = bytes_read_by_this_process()
        runpy.run_path(str(VALIDATE_SCRIPT), init_globals={"snakemake": snakemake})
        read = bytes_read_by_this_process() - before
        opened = watch.names()
    assert json.loads(Path(snakemake.output.json).read_text())["passed"]
    assert opened <= {MANIFEST_FILE}
    with capsys.disabled():
        print(f"\nreport job: {read:,} bytes read in all; the shards hold {sum(shard_bytes):,}")
    assert read < shard_bytes[-1]


# --- A look at it in a browser -----------------------------------------------------------------


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1200,2400",
]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_report_renders_in_headless_chromium(cache, target_model, tmp_path):
    """Also a way to look at a report: REPORT_SCREENSHOT=out.png keeps the screenshot."""
    html_path = tmp_path / "report.html"
    html_path.write_text(render_html(validate(cache, target_model)))
    screenshot = Path(os.environ.get("REPORT_SCREENSHOT", tmp_path / "report.png"))
    command = ["chromium", *CHROMIUM_FLAGS, f"--screenshot={screenshot}", html_path.as_uri()]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    assert screenshot.stat().st_size > 10_000


def test_the_cost_check_gives_the_fixed_cost_share_of_shard_job_time():
    """Start and imports plus the model load, over all the shard jobs' time (start included)."""
    from eagle3_cache.cost import cost_check
    from eagle3_cache.results import CheckResult

    def stats(shard: int, start: float, load: float, total: float) -> dict:
        seconds = {"start": start, "load": load, "total": total, "forward": total - load}
        return {"shard": shard, "num_samples": 4, "seconds": seconds, "real_tokens": 100}

    shards = [stats(0, 1.0, 3.0, 16.0), stats(1, 1.0, 3.0, 20.0)]
    shards[0]["computed_tokens"] = shards[1]["computed_tokens"] = 10
    shards[0]["padded_tokens"] = shards[1]["padded_tokens"] = 20
    parity = CheckResult("parity", True, "", {"gpu_seconds": 0.0})
    check = cost_check(shards, [], 2, [], parity)
    assert check.figures["fixed_share"] == pytest.approx(8 / 38)
    assert check.figures["load_share"] == pytest.approx(6 / 38)
    assert "fixed cost (start and imports, model load) is 21% of shard-job time (the load alone 16%)" in check.summary
