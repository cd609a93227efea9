"""Everything a reader trusts is checked against the manifest (schema 1.3), and
`verify` finds every inconsistency, including ones a hostile author made
consistent by updating the digests.

Each test tampers with a copy of the committed golden dataset `parquet-rans`
(3 Parquet shards of 5, 3 and 0 samples, rans-ctx codec state, labels, a k-means tokenizer copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import break_one_payload, rewrite_manifest

import tokshard
from tokshard.errors import ManifestError, ShardError, UsageError
from tokshard.pipeline.tools import query
from tokshard.pipeline.tools.verify import DATASET_FILE, NOT_REPAIRABLE, repair, verify

GOLDEN = Path(__file__).parent / "golden" / "datasets"
pytestmark = pytest.mark.xdist_group("golden")     # the golden sources sit at one fixed path


@pytest.fixture()
def ds(tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(GOLDEN / "parquet-rans", out)
    return out


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _rewrite_index(ds: Path, shard: str, edit, *, update_manifest: bool) -> None:
    """Rewrite shard's sample index with `edit(table) -> table`; with `update_manifest`, the
    manifest's digest follows (a hostile author's consistent lie)."""
    path = ds / "samples" / f"{shard}.parquet"
    data = _parquet(edit(pq.read_table(path)))
    path.write_bytes(data)
    if update_manifest:
        def rows(pylist):
            for r in pylist:
                if r["shard"] == shard:
                    r["index_bytes"], r["index_sha256"] = len(data), hashlib.sha256(data).hexdigest()
        rewrite_manifest(ds, rows=rows)


def _golden_sources() -> None:
    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import make
    if make.SOURCE_ROOT.exists():
        shutil.rmtree(make.SOURCE_ROOT)
    shutil.copytree(Path(__file__).parent / "golden" / "source", make.SOURCE_ROOT)


def test_the_manifest_records_a_digest_of_every_file_a_reader_trusts(ds):
    from tokshard.pipeline.format.manifest import read_manifest
    table, record = read_manifest(str(ds))
    files = record["files"]
    tokenizer_files = sorted(p.relative_to(ds).as_posix() for p in (ds / "tokenizer").rglob("*") if p.is_file())
    assert tokenizer_files and sorted(files) == sorted(["codec/state.bin", "labels.parquet", *tokenizer_files])
    for rel, digest in files.items():
        assert digest == _digest((ds / rel).read_bytes()), rel
    for row in table.to_pylist():
        data = (ds / "samples" / f"{row['shard']}.parquet").read_bytes()
        assert {"bytes": row["index_bytes"], "sha256": row["index_sha256"]} == _digest(data)
    assert record["schema_version"] == "1.4"


def test_an_altered_index_is_a_shard_error_for_lookup_and_where_and_skip_counts_it(ds):
    key = tokshard.open(str(ds)).shard(1)["key"][0]
    _rewrite_index(ds, "000001", lambda t: t.set_column(4, "size", pa.array([7] * t.num_rows, pa.int64())),
                   update_manifest=False)
    with pytest.raises(ShardError, match="000001.*does not match the manifest"):
        query.lookup(str(ds), key)
    d = tokshard.open(str(ds))
    with pytest.raises(ShardError, match="000001"):
        d.loader(batch_size=4, where="size > 0")
    loader = d.loader(batch_size=4, where="size > 0", on_error="skip", shuffle=False)
    keys = [k for b in loader for k in b["key"]]
    expected = [k for i in (0, 2) for k in d.shard(i)["key"]]
    assert sorted(keys) == sorted(expected) and loader.skipped_shards == ["000001"]
    _, problems = verify(str(ds), quick=True)
    assert [(p.shard, p.path) for p in problems] == [("000001", "samples/000001.parquet")]


def test_an_altered_label_table_is_refused_by_query(ds):
    table = pq.read_table(ds / "labels.parquet")
    counts = table.column("count").to_pylist()
    counts[0] += 1
    (ds / "labels.parquet").write_bytes(_parquet(table.set_column(2, "count", pa.array(counts, pa.int64()))))
    with pytest.raises(ManifestError, match="record.labels"):
        query.run(str(ds), "SELECT * FROM labels")
    _, problems = verify(str(ds), quick=True)
    assert [(p.path, p.unit) for p in problems] == [("labels.parquet", DATASET_FILE)]


def test_a_codec_state_with_its_size_but_other_bytes_is_refused_at_open(ds):
    _flip(ds / "codec" / "state.bin", at=40)
    with pytest.raises(ManifestError, match="record.codec_state.*sha256"):
        tokshard.open(str(ds))
    _, problems = verify(str(ds))
    assert [(p.path, p.unit) for p in problems] == [("codec/state.bin", DATASET_FILE)]


def test_a_refitted_codec_state_repairs_it(ds):
    _flip(ds / "codec" / "state.bin", at=40)
    _golden_sources()
    _, problems = verify(str(ds))
    repair(str(ds), problems)
    assert verify(str(ds)) == (3, [])
    assert (ds / "codec" / "state.bin").read_bytes() == (GOLDEN / "parquet-rans" / "codec" / "state.bin").read_bytes()


@pytest.mark.parametrize("tamper", ["flip", "extra", "missing"])
def test_a_tokenizer_copy_that_differs_is_refused_and_not_repairable(ds, tamper):
    files = sorted(p for p in (ds / "tokenizer").rglob("*") if p.is_file())
    if tamper == "flip":
        _flip(files[0], at=len(files[0].read_bytes()) // 2)
    elif tamper == "extra":
        (ds / "tokenizer" / "extra.json").write_text("{}")
    else:
        files[-1].unlink()
    with pytest.raises(ManifestError, match="tokenizer copy does not match"):
        tokshard.open(str(ds)).tokenizer()
    _, problems = verify(str(ds), quick=True)
    assert problems and all(p.unit == NOT_REPAIRABLE for p in problems)
    with pytest.raises(UsageError, match="cannot be rebuilt from the sources"):
        repair(str(ds), problems)


def test_a_stray_index_file_adds_no_rows_and_verify_flags_it(ds):
    count = query.run(str(ds), "SELECT count(*) FROM samples")[1]
    stray = pq.read_table(ds / "samples" / "000000.parquet")
    (ds / "samples" / "999999.parquet").write_bytes(_parquet(stray))
    (ds / "shards" / "000009.parquet").write_bytes(b"left over")
    assert query.run(str(ds), "SELECT count(*) FROM samples")[1] == count
    _, problems = verify(str(ds), quick=True)
    assert sorted(p.path for p in problems) == ["samples/999999.parquet", "shards/000009.parquet"]
    _golden_sources()
    repair(str(ds), problems)
    assert verify(str(ds)) == (3, [])
    assert not (ds / "samples" / "999999.parquet").exists()


@pytest.mark.parametrize("lie", ["keys rotated", "row numbers", "labels", "other shard", "rows missing"])
def test_full_verify_finds_an_index_made_consistent_by_its_author(ds, lie):
    def edit(t: pa.Table) -> pa.Table:
        if lie == "keys rotated":
            keys = t.column("key").to_pylist()
            return t.set_column(0, "key", pa.array(keys[1:] + keys[:1]))
        if lie == "row numbers":
            return t.set_column(2, "row", pa.array(list(range(1, t.num_rows + 1)), pa.int64()))
        if lie == "labels":
            return t.set_column(5, "label", pa.array([7] * t.num_rows, pa.int64()))
        if lie == "other shard":
            return t.set_column(1, "shard", pa.array(["000000"] * t.num_rows))
        return t.slice(1)
    _rewrite_index(ds, "000001", edit, update_manifest=True)
    assert verify(str(ds), quick=True) == (3, [])     # the files match what the manifest says
    _, problems = verify(str(ds))
    assert [(p.shard, p.path) for p in problems] == [("000001", "shards/000001.parquet")]
    assert "sample index" in problems[0].what


def test_the_cli_verify_quick_checks_files_and_the_default_checks_contents(ds, capsys):
    from tokshard.jobs.cli import main
    _rewrite_index(ds, "000000", lambda t: t.set_column(0, "key", pa.array(t.column("key").to_pylist()[::-1])),
                   update_manifest=True)
    assert main(["verify", "--quick", str(ds)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 3 shards match the manifest (files only: --quick)"
    assert main(["verify", str(ds)]) == 1
    out = capsys.readouterr().out
    assert "shards/000000.parquet (shard 000000): sample index row 0 says key" in out
    assert "1 problem(s): 1 of 3 shards do not match the manifest" in out


def test_full_verify_finds_an_undecodable_payload_and_a_label_table_that_lies(ds):
    size = break_one_payload(ds / "shards" / "000000.parquet", row=1)
    data = (ds / "shards" / "000000.parquet").read_bytes()
    table = pq.read_table(ds / "labels.parquet")
    counts = table.column("count").to_pylist()
    counts[table.column("shard").to_pylist().index("000001")] += 1     # a shard whose contents are whole
    labels = _parquet(table.set_column(2, "count", pa.array(counts, pa.int64())))
    (ds / "labels.parquet").write_bytes(labels)

    def rows(pylist):
        for r in pylist:
            if r["shard"] == "000000":
                r["stored_bytes"], r["sha256"] = size, hashlib.sha256(data).hexdigest()

    def record(meta):
        meta["files"]["labels.parquet"] = _digest(labels)
    rewrite_manifest(ds, rows=rows, record=record)
    assert verify(str(ds), quick=True) == (3, [])
    _, problems = verify(str(ds))
    assert [(p.shard, p.path) for p in problems] == [("000000", "shards/000000.parquet"), ("-", "labels.parquet")]
    assert "sample row 1" in problems[0].what and "counts for shard" in problems[1].what


def test_a_manifest_whose_counts_lie_is_found_and_rewritten_by_repair(ds):
    rewrite_manifest(ds, rows=lambda rows: rows[0].update(samples=rows[0]["samples"] + 1))
    _, problems = verify(str(ds))
    assert [(p.path, p.unit) for p in problems] == [("manifest.parquet", DATASET_FILE)]
    assert "totals.samples" in problems[0].what
    _golden_sources()
    repair(str(ds), problems)
    assert (ds / "manifest.parquet").read_bytes() == (GOLDEN / "parquet-rans" / "manifest.parquet").read_bytes()


def test_query_sql_cannot_reach_files_outside_the_dataset(ds, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    for sql in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM read_parquet('{ds}/../secret.csv')",
                f"COPY (SELECT 1) TO '{tmp_path}/written.csv'", "SET enable_external_access = true"):
        with pytest.raises(UsageError):
            query.run(str(ds), sql)
    assert not (tmp_path / "written.csv").exists()
    with pytest.raises(UsageError):
        tokshard.open(str(ds)).loader(where=f"key IN (SELECT a::VARCHAR FROM read_csv('{secret}'))")
    assert query.run(str(ds), "SELECT count(*) FROM samples")[1][0][0] == len(tokshard.open(str(ds)))


def test_an_index_file_linked_outside_is_refused_by_query(ds, tmp_path):
    outside = tmp_path / "outside.parquet"
    shutil.copy(ds / "samples" / "000001.parquet", outside)
    (ds / "samples" / "000001.parquet").unlink()
    (ds / "samples" / "000001.parquet").symlink_to(outside)
    with pytest.raises(ManifestError, match="leaves the dataset root"):
        query.run(str(ds), "SELECT count(*) FROM samples")


def test_a_dataset_written_before_schema_1_3_reads_and_resumes(ds):
    """No digests recorded: files are read as they are (capped), verify checks what it can,
    and a resumed convert completes old receipts from the files they name."""
    def rows(pylist):
        for r in pylist:
            del r["index_bytes"], r["index_sha256"]

    def record(meta):
        del meta["files"]
        meta["schema_version"] = "1.2"
    table = pq.read_table(ds / "manifest.parquet")
    old = table.drop_columns(["index_bytes", "index_sha256"])
    pq.write_table(old, ds / "manifest.parquet")
    rewrite_manifest(ds, record=record)
    d = tokshard.open(str(ds))
    key = d.shard(1)["key"][0]
    assert query.lookup(str(ds), key)[1][0][1] == "000001"
    assert len(list(d)) == len(d) and d.tokenizer().vocab_size == d.vocab_size
    assert verify(str(ds)) == (3, [])
    for receipt in (ds / "_work" / "units").glob("*.json"):
        doc = json.loads(receipt.read_text())
        del doc["shard"]["index_bytes"], doc["shard"]["index_sha256"]
        receipt.write_text(json.dumps(doc, sort_keys=True))
    _golden_sources()
    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import make
    result = make.convert_golden("parquet-rans", ds, Path(__file__).parent / "golden" / "tokenizer")
    assert result["units_reused"] == 3
    assert (ds / "manifest.parquet").read_bytes() == (GOLDEN / "parquet-rans" / "manifest.parquet").read_bytes()


def test_query_lookup_where_and_verify_on_s3(ds, s3_bucket):
    """The same checks and the same DuckDB confinement through the registered fsspec filesystem."""
    fs, bucket, opts = s3_bucket
    fs.put(str(ds) + "/", f"{bucket}/ds/", recursive=True)
    url = f"s3://{bucket}/ds"
    local = query.run(str(ds), "SELECT key, shard, row FROM samples ORDER BY key")
    assert query.run(url, "SELECT key, shard, row FROM samples ORDER BY key", opts) == local
    key = local[1][0][0]
    assert query.lookup(url, key, opts)[1][0][0] == key
    d = tokshard.open(url, storage_options=opts)
    assert sorted(k for b in d.loader(batch_size=4, where="label IS NOT NULL") for k in b["key"]) == \
        sorted(k for b in tokshard.open(str(ds)).loader(batch_size=4, where="label IS NOT NULL") for k in b["key"])
    with pytest.raises(UsageError):
        query.run(url, f"SELECT * FROM read_parquet('s3://{bucket}/other/x.parquet')", opts)
    assert verify(url, opts) == (3, [])
    fs.pipe(f"{bucket}/ds/samples/000001.parquet", (ds / "samples" / "000000.parquet").read_bytes())
    _, problems = verify(url, opts, quick=True)
    assert [p.path for p in problems] == ["samples/000001.parquet"]
    with pytest.raises(ShardError, match="000001"):
        query.lookup(url, "part/000000001", opts)


def test_repair_says_which_sources_it_reads_and_takes_only_the_jobs_own(ds, tmp_path, capsys):
    from tokshard.jobs.cli import main
    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import make
    (ds / "shards" / "000001.parquet").unlink()
    _golden_sources()
    job = json.loads((ds / "_work" / "job.json").read_text())["config"]["sources"]
    assert main(["verify", str(ds), "--repair", "--sources", str(tmp_path)]) == 2
    assert "--sources must be the job's own sources" in capsys.readouterr().err
    assert not (ds / "shards" / "000001.parquet").exists()
    assert main(["verify", str(ds), "--repair"]) == 0
    err = capsys.readouterr().err
    assert f"repair re-reads the sources the dataset's job spec names: {', '.join(job)}" in err
    (ds / "shards" / "000001.parquet").unlink()
    assert main(["verify", str(ds), "--repair", "--sources", *job]) == 0
    assert "re-reads" not in capsys.readouterr().err
    assert (ds / "manifest.parquet").read_bytes() == (GOLDEN / "parquet-rans" / "manifest.parquet").read_bytes()
    assert str(make.SOURCE_ROOT) in job[0]
