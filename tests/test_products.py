"""The products a run makes before any shard, recorded as written: damage found by stat and bytes, and an
identical rebuild keeping the product's own mtime."""

import os
from pathlib import Path

from eagle3_cache.products import damage, record_path, record_product, set_aside, settle
from eagle3_cache.startup import set_aside_damaged_products

SECOND = 1_000_000_000


def made(path: Path, data: bytes, inputs=(), identity=None, at: int | None = None) -> Path:
    """`path` written through a temp file, as the producers write, then recorded."""
    path.with_name(path.name + ".tmp").write_bytes(data)
    os.replace(path.with_name(path.name + ".tmp"), path)
    if at is not None:
        os.utime(path, ns=(at, at))
    record_product(path, inputs, identity)
    return path


def test_an_untouched_product_is_not_damaged_and_is_not_read(tmp_path, monkeypatch):
    product = made(tmp_path / "vocab_selection.pt", b"x" * 100)
    monkeypatch.setattr("eagle3_cache.products.file_sha256", lambda path: (_ for _ in ()).throw(AssertionError))
    assert damage(product) is None


def test_truncated_or_overwritten_products_are_damaged(tmp_path):
    truncated = made(tmp_path / "tokenized.h5", b"x" * 100)
    os.truncate(truncated, 50)
    assert damage(truncated) == "50 bytes where 100 were written"
    overwritten = made(tmp_path / "plan.json", b"x" * 100)
    with open(overwritten, "r+b") as handle:
        handle.write(b"y")
    assert damage(overwritten) == "its bytes differ from those written"


def test_a_copied_or_touched_product_is_intact_and_gets_its_mtime_back(tmp_path):
    product = made(tmp_path / "tokenized.h5", b"x" * 100, at=5 * SECOND)
    os.utime(product)
    assert damage(product) is None
    assert product.stat().st_mtime_ns == 5 * SECOND
    assert damage(product) is None


def test_an_identical_rebuild_keeps_the_first_mtime_unless_an_input_is_newer(tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_text("{}")
    os.utime(source, ns=(SECOND, SECOND))
    product = made(tmp_path / "tokenized.h5", b"same", [source], at=5 * SECOND)
    made(product, b"same", [source])
    assert product.stat().st_mtime_ns == 5 * SECOND
    made(product, b"other", [source])
    assert product.stat().st_mtime_ns > 5 * SECOND
    first = product.stat().st_mtime_ns
    os.utime(source, ns=(first + SECOND, first + SECOND))
    made(product, b"other", [source])
    assert product.stat().st_mtime_ns > first


def test_an_input_touched_by_snakemake_counts_at_its_own_mtime(tmp_path):
    """The plan is made from the tokenized store after Snakemake touched the store's rebuild."""
    tokenized = made(tmp_path / "tokenized.h5", b"same", at=5 * SECOND)
    plan = made(tmp_path / "plan.json", b'{"free": 1}', [tokenized], identity="passed", at=6 * SECOND)
    made(tokenized, b"same")
    os.utime(tokenized)
    made(plan, b'{"free": 2}', [tokenized], identity="passed")
    settle([tokenized, plan])
    assert (tokenized.stat().st_mtime_ns, plan.stat().st_mtime_ns) == (5 * SECOND, 6 * SECOND)


def test_settle_leaves_a_product_another_writer_replaced(tmp_path):
    product = made(tmp_path / "tokenized.h5", b"x" * 10, at=5 * SECOND)
    (tmp_path / "new").write_bytes(b"y" * 10)
    os.replace(tmp_path / "new", product)
    settle([product])
    assert product.stat().st_mtime_ns != 5 * SECOND


def test_startup_sets_aside_each_damaged_product_keeping_its_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "results" / "demo"
    run_dir.mkdir(parents=True)
    selection = made(run_dir / "vocab_selection.pt", b"x" * 10)
    made(run_dir / "plan.json", b"{}")
    os.truncate(selection, 3)
    damaged, notes = set_aside_damaged_products(["demo"])
    assert damaged == ["results/demo/vocab_selection.pt"]
    assert notes == [
        "results/demo/vocab_selection.pt is damaged (3 bytes where 10 were written): moved aside to "
        "vocab_selection.pt.damaged. This run rebuilds it alone, before any job reads it; then run the workflow "
        "again to go on (what was made from it is kept if it comes out identical)."
    ]
    assert not selection.exists() and (run_dir / "vocab_selection.pt.damaged").read_bytes() == b"xxx"
    assert record_path(selection).exists()


def test_a_product_without_record_is_left_alone(tmp_path):
    product = tmp_path / "tokenized.h5"
    product.write_bytes(b"x")
    assert damage(product) is None
    assert set_aside(product).name == "tokenized.h5.damaged"
