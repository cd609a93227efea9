"""Source planning and reading: patterns, globs, fsspec URLs, keys."""

from __future__ import annotations

import fsspec
import pytest

from tokshard.errors import SourceError
from tokshard.pipeline.convert.sources import plan_units, read_unit, safe_key


def test_brace_patterns_and_globs_plan_one_unit_per_tar(photo_tars):
    n = len(list(photo_tars.glob("*.tar")))
    assert n >= 3
    brace = plan_units([f"{photo_tars}/{{00000..{n - 1:05d}}}.tar"], 100)
    glob = plan_units([f"{photo_tars}/*.tar"], 100)
    folder = plan_units([str(photo_tars)], 100)
    assert [u.url for u in brace] == [u.url for u in glob] == [u.url for u in folder]
    assert [u.index for u in folder] == list(range(n)) and {u.kind for u in folder} == {"wds"}


def test_missing_inputs_raise_source_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        plan_units([str(tmp_path / "nope")], 10)
    with pytest.raises(SourceError, match="no input matches"):
        plan_units([str(tmp_path / "*.tar")], 10)


def test_reads_tars_through_fsspec_url(photo_tars):
    fs = fsspec.filesystem("memory")
    for tar in sorted(photo_tars.glob("*.tar")):
        fs.pipe_file(f"/corpus/{tar.name}", tar.read_bytes())
    units = plan_units(["memory://corpus/{00000..00001}.tar"], 10)
    assert [u.url for u in units] == ["memory:///corpus/00000.tar", "memory:///corpus/00001.tar"]
    records = list(read_unit(units[0]))
    assert len(records) == 8 and all(r.skip is None and r.image[:2] == b"\xff\xd8" for r in records)
    assert all(r.caption.startswith("a photo:") and isinstance(r.label, int) and r.meta["key"] == r.key
               for r in records)


def test_parquet_and_folder_units_follow_shard_size(photo_parquet, photo_folder, photo_jpegs):
    n = len(photo_jpegs)
    pq_units = plan_units([str(photo_parquet)], 5)
    assert [(u.start, u.stop) for u in pq_units] == [(s, min(n, s + 5)) for s in range(0, n, 5)]
    assert sum(1 for u in pq_units for r in read_unit(u) if r.skip is None) == n
    folder_units = plan_units([str(photo_folder)], 5)
    assert sum(len(u.members) for u in folder_units) == n  # sidecars are not units' members


@pytest.mark.parametrize("name,key", [
    ("a/b.c", "a/b_c"), ("000001", "000001"), ("../x", None), ("/etc/passwd", None), ("a//b", None),
])
def test_safe_key(name, key):
    assert safe_key(name) == key


def test_convert_reads_and_writes_fsspec_urls(photo_tars, tokenizer_dir):
    """Sources and destination both through an fsspec URL (the in-memory filesystem)."""
    from conftest import convert_config

    from tokshard.pipeline.convert.job import convert
    from tokshard.pipeline.format.manifest import read_manifest

    fs = fsspec.filesystem("memory")
    for tar in sorted(photo_tars.glob("*.tar")):
        fs.pipe_file(f"/in/{tar.name}", tar.read_bytes())
    result = convert(convert_config(["memory://in/*.tar"], "memory://out", tokenizer_dir), quiet=True)
    table, meta = read_manifest("memory://out")
    assert meta["totals"]["samples"] == result["dataset"]["totals"]["samples"] > 0
    assert fs.exists("/out/tokenizer/model.safetensors")
    for row in table.to_pylist():
        assert fs.size(f"/out/{row['path']}") == row["stored_bytes"]


def test_parquet_units_read_only_their_row_groups_and_columns(tmp_path, photo_jpegs):
    """A 10-row-group file cut into units that straddle row groups: every row once, in
    order, with its own caption and label; a unit reads the groups that hold its rows,
    and only the columns it uses (not, e.g., LAION's embedding columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokshard.pipeline.convert.sources.parquet import read_rows as _read_rows
    rows = [(f"k{i:03d}", photo_jpegs[i % len(photo_jpegs)][1], i % 5) for i in range(70)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"key": [k for k, _, _ in rows], "jpg": [d for _, d, _ in rows],
                             "caption": [f"c{k}" for k, _, _ in rows], "label": [lab for _, _, lab in rows],
                             "embedding": [[0.5] * 8] * len(rows)}), path, row_group_size=7)
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 10
    table, first = _read_rows(pf, 15, 30, ["key", "label"])
    assert first == 14 and table.num_rows == 21 and table.column_names == ["key", "label"]
    assert table.slice(15 - first, 15).column("key").to_pylist() == [k for k, _, _ in rows[15:30]]
    units = plan_units([str(path)], 10)
    assert [(u.start, u.stop) for u in units] == [(s, min(s + 10, 70)) for s in range(0, 70, 10)]
    got = [(r.key, r.caption, r.label, r.image) for u in units for r in read_unit(u)]
    assert got == [(k, f"c{k}", lab, data) for k, data, lab in rows]
