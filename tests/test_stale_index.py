"""A stale or tampered sample index, and counts that lie: typed errors, never another sample.

The sample index (samples/NAME.parquet) is what `where=` on the loader and `lookup`
search; the shard is what they deliver. Every row they return is checked against the
shard itself (its key at that row), so an index whose rows were shifted, that names a
shard the manifest does not list or a row outside its shard is a `ManifestError` or a
`ShardError` naming the shard. The manifest's per-shard counts are summed without
wrapping and must match the record's totals.

Each tamper is applied to a copy of a committed golden dataset (tests/golden).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_manifest

import tokshard
from tokshard.errors import ManifestError, ShardError
from tokshard.jobs.cli import main
from tokshard.pipeline.tools.query import lookup, select_rows

GOLDEN = Path(__file__).parent / "golden" / "datasets"
# The golden dataset's shards: 000000 holds keys 00000000..00000004 (labels 0..4),
# 000001 holds part/000000000..part/000000002 (labels 2, 3, 4), 000002 is empty.
SHARD0 = [f"{i:08d}" for i in range(5)]
SHARD1 = [f"part/{i:09d}" for i in range(3)]


@pytest.fixture()
def ds(tmp_path) -> Path:
    dest = tmp_path / "root" / "ds"
    shutil.copytree(GOLDEN / "parquet-rans", dest)
    return dest


def _rewrite_index(ds: Path, shard: str, change) -> None:
    """Rewrite samples/SHARD.parquet with `change(rows)` applied to its rows (a list of dicts),
    and the manifest's digest of it with it: an author's consistent lie, which only the
    per-row check against the shard can catch (an index that differs from its digest is
    refused before it is parsed: tests/test_integrity.py)."""
    path = ds / "samples" / f"{shard}.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    _record_index_digest(ds, shard)


def _record_index_digest(ds: Path, shard: str) -> None:
    data = (ds / "samples" / f"{shard}.parquet").read_bytes()

    def rows(pylist):
        for r in pylist:
            if r["shard"] == shard:
                r["index_bytes"], r["index_sha256"] = len(data), hashlib.sha256(data).hexdigest()
    rewrite_manifest(ds, rows=rows)


def _shift_keys(rows: list[dict]) -> None:
    """The key column moved up by one row (the last row takes the first key): every row
    still names a real key of the shard, at the wrong row."""
    keys = [r["key"] for r in rows]
    for r, k in zip(rows, keys[1:] + keys[:1]):
        r["key"] = k


def _keys(ds: Path, where: str, **kw) -> list[str]:
    d = tokshard.open(str(ds))
    return [k for b in d.loader(4, shuffle=False, rank=0, world_size=1, where=where, **kw) for k in b["key"]]


def _cli_lookup(ds: Path, key: str, capsys) -> tuple[int, str, str]:
    code = main(["lookup", str(ds), key, "--format", "json"])
    out, err = capsys.readouterr()
    return code, out, err


# -- the healthy golden dataset ----------------------------------------------------------


def test_the_golden_dataset_gives_the_right_answers(ds, capsys):
    d = tokshard.open(str(ds))
    assert len(d) == 8 and d.shard_sizes.tolist() == [5, 3, 0]
    assert [k for _, k, _, _ in d] == SHARD0 + SHARD1
    for key, shard, row, sample_id in (("00000003", "000000", 3, 3), ("part/000000001", "000001", 1, 6)):
        batches = list(d.loader(4, rank=0, world_size=1, where=f"key = '{key}'"))
        assert [b["key"] for b in batches] == [[key]] and batches[0]["id"].tolist() == [sample_id]
        assert select_rows(str(ds), f"key = '{key}'") == [(shard, row)]
        columns, rows = lookup(str(ds), key)
        assert [(r["shard"], r["row"], r["key"]) for r in (dict(zip(columns, x)) for x in rows)] == [(shard, row, key)]
        code, out, _ = _cli_lookup(ds, key, capsys)
        assert code == 0 and json.loads(out)[0]["row"] == row
    # A label selection (routed through the label table) and a scan of the whole index.
    assert sorted(_keys(ds, "label IN (2, 3)")) == ["00000002", "00000003", "part/000000000", "part/000000001"]
    assert sorted(_keys(ds, "key LIKE 'part/%'")) == SHARD1
    assert _keys(ds, "key = 'no-such-key'") == []
    assert lookup(str(ds), "no-such-key")[1] == []
    assert main(["lookup", str(ds), "no-such-key"]) == 1


# -- a stale or tampered sample index ----------------------------------------------------


def test_an_index_with_shifted_keys_never_yields_another_sample(ds, capsys):
    _rewrite_index(ds, "000000", _shift_keys)
    # The index now says row 0 holds 00000001: selecting 00000001 must not deliver 00000000.
    for where in ("key = '00000001'", "key IN ('00000001', 'part/000000002')", "label = 1", "key LIKE '0%'"):
        with pytest.raises(ShardError, match="stale or tampered") as e:
            _keys(ds, where)
        assert e.value.shard == "000000"
        with pytest.raises(ShardError) as e:
            select_rows(str(ds), where)
        assert e.value.shard == "000000"
    # The rows of the untouched shard still select, exactly.
    assert _keys(ds, "key = 'part/000000002'") == ["part/000000002"]
    # lookup: the function, the CLI in process and `python -m tokshard lookup`.
    with pytest.raises(ShardError, match="row 0 holds key '00000000', the sample index says '00000001'") as e:
        lookup(str(ds), "00000001")
    assert e.value.shard == "000000"
    code, out, err = _cli_lookup(ds, "00000001", capsys)
    assert code == 2 and out == "" and err.startswith("tokshard: error: shard 000000: ")
    assert len(err.strip().splitlines()) == 1
    run = subprocess.run([sys.executable, "-m", "tokshard", "lookup", str(ds), "00000003"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "tokshard: error: shard 000000: row 2 holds key '00000002', the sample index says '00000003' "
        "(a stale or tampered index)"]
    assert lookup(str(ds), "part/000000001")[1][0][:3] == ("part/000000001", "000001", 1)


def test_a_whole_index_file_from_another_shard_is_refused(ds):
    # samples/000001.parquet replaced by shard 000000's index, relabelled: rows 0..2 of 000001
    # claim keys 00000000..00000002, which live in shard 000000.
    rows = pq.read_table(ds / "samples" / "000000.parquet").to_pylist()[:3]
    for r in rows:
        r["shard"] = "000001"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(ds / "samples" / "000001.parquet")),
                   ds / "samples" / "000001.parquet")
    _record_index_digest(ds, "000001")
    with pytest.raises(ShardError, match="stale or tampered") as e:
        _keys(ds, "key = '00000001'")   # two index rows claim it; one of them lies
    assert e.value.shard == "000001"
    # lookup routes by the manifest's key ranges to shard 000000's (honest) index alone:
    # exactly the right sample.
    assert [r[:3] for r in lookup(str(ds), "00000001")[1]] == [("00000001", "000000", 1)]


@pytest.mark.parametrize("name", ["999999", "../../outside", None])
def test_an_index_row_naming_an_unknown_shard_is_a_manifest_error(ds, capsys, name):
    def rename(rows):
        rows[2]["shard"] = name
    _rewrite_index(ds, "000000", rename)
    with pytest.raises(ManifestError, match="does not list"):
        _keys(ds, "key = '00000002'")
    with pytest.raises(ManifestError, match="does not list"):
        lookup(str(ds), "00000002")
    code, _, err = _cli_lookup(ds, "00000002", capsys)
    assert code == 2 and "does not list" in err and len(err.strip().splitlines()) == 1
    # Rows the predicate does not return are not judged.
    assert _keys(ds, "key = '00000001'") == ["00000001"]


def test_a_label_table_naming_an_unknown_shard_is_a_manifest_error(ds, tmp_path):
    outside = tmp_path / "root" / "outside.parquet"
    shutil.copy(ds / "samples" / "000000.parquet", outside)
    table = pq.read_table(ds / "labels.parquet")
    rows = table.to_pylist() + [{"shard": "../../outside", "label": 1, "count": 1}]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), ds / "labels.parquet")
    data = (ds / "labels.parquet").read_bytes()
    rewrite_manifest(ds, record=lambda meta: meta["files"].update(
        {"labels.parquet": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))
    with pytest.raises(ManifestError, match="does not list"):
        _keys(ds, "label = 1")
    assert sorted(_keys(ds, "label = 4")) == ["00000004", "part/000000002"]


@pytest.mark.parametrize("row", [5, 99, -1, None])
def test_an_index_row_outside_its_shard_is_a_shard_error(ds, capsys, row):
    def move(rows):
        rows[4]["row"] = row
    _rewrite_index(ds, "000000", move)
    with pytest.raises(ShardError, match="outside the shard's 5 samples") as e:
        _keys(ds, "key = '00000004'")
    assert e.value.shard == "000000"
    with pytest.raises(ShardError, match="outside the shard's 5 samples"):
        lookup(str(ds), "00000004")
    code, _, err = _cli_lookup(ds, "00000004", capsys)
    assert code == 2 and err.startswith("tokshard: error: shard 000000: ") and len(err.strip().splitlines()) == 1


def test_a_row_that_points_at_another_real_row_is_a_shard_error(ds):
    def swap(rows):
        rows[1]["row"], rows[3]["row"] = 3, 1
    _rewrite_index(ds, "000000", swap)
    with pytest.raises(ShardError, match="row 3 holds key '00000003', the sample index says '00000001'"):
        _keys(ds, "key = '00000001'")
    with pytest.raises(ShardError, match="row 3 holds key '00000003'"):
        lookup(str(ds), "00000001")


def test_a_damaged_shard_under_a_selection_is_skipped_or_raised_as_the_loader_is_told(ds):
    victim = ds / "shards" / "000001.parquet"
    data = bytearray(victim.read_bytes())
    data[200] ^= 1                               # same size, other bytes: a sha256 mismatch
    victim.write_bytes(bytes(data))
    d = tokshard.open(str(ds))
    with pytest.raises(ShardError, match="checksum") as e:
        d.loader(4, rank=0, world_size=1, where="label IN (2, 3)")
    assert e.value.shard == "000001"
    loader = d.loader(4, shuffle=False, rank=0, world_size=1, where="label IN (2, 3)", on_error="skip")
    assert [k for b in loader for k in b["key"]] == ["00000002", "00000003"]
    assert loader.skipped_shards == ["000001"]


# -- counts that lie -------------------------------------------------------------------


def test_counts_that_overflow_are_refused_at_open(ds):
    # Two shards near 2**63 and a third of 2: an int64 sum wraps to exactly 0 (an empty
    # epoch, exit 0); summed as Python ints it is refused. totals agree, so only the sum is wrong.
    sizes = [2**63 - 1, 2**63 - 1, 2]

    def counts(rows):
        for r, n in zip(rows, sizes):
            r["samples"] = n
    rewrite_manifest(ds, rows=counts, record=lambda rec: rec["totals"].update(samples=sum(sizes)))
    with pytest.raises(ManifestError, match="column samples"):
        tokshard.open(str(ds))
    # Just over the cap, and just under (then the totals decide).
    shutil.copy(GOLDEN / "parquet-rans" / "manifest.parquet", ds / "manifest.parquet")
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(samples=2**48),
                      record=lambda rec: rec["totals"].update(samples=2**48 + 3))
    with pytest.raises(ManifestError, match="more than"):
        tokshard.open(str(ds))


@pytest.mark.parametrize("samples", [-1, -(2**63)])
def test_a_negative_count_is_refused_at_open(ds, samples):
    rewrite_manifest(ds, rows=lambda rows: rows[1].update(samples=samples))
    with pytest.raises(ManifestError, match="manifest shard '000001': samples"):
        tokshard.open(str(ds))


@pytest.mark.parametrize("totals", [{"samples": 9}, {"samples": 7}, {"samples": 0}, {}])
def test_totals_that_disagree_with_the_shards_are_refused_at_open(ds, totals):
    def change(rec):
        del rec["totals"]["samples"]
        rec["totals"].update(totals)
    rewrite_manifest(ds, record=change)
    with pytest.raises(ManifestError, match="record.totals.samples"):
        tokshard.open(str(ds))


def test_a_count_that_disagrees_with_the_totals_is_refused_at_open(ds):
    # One shard claims a sample more than it holds; the record's totals still say 8.
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(samples=6))
    with pytest.raises(ManifestError, match="record.totals.samples is 8, the manifest's shards hold 9"):
        tokshard.open(str(ds))
    # With the totals changed too, the shard's token count (6 samples of 16 tokens?) still disagrees.
    rewrite_manifest(ds, record=lambda rec: rec["totals"].update(samples=9))
    with pytest.raises(ManifestError, match="6 samples of 16 tokens, but the tokens column says 80"):
        tokshard.open(str(ds))
    # All three changed consistently: it opens, and reading the shard finds the lie.
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(tokens=96))
    d = tokshard.open(str(ds))
    assert len(d) == 9
    with pytest.raises(ShardError, match="holds 5 samples, the manifest says 6"):
        d.shard(0)
