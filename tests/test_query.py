"""tokshard query / verify on real converted datasets."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

import tokshard
from tokshard.errors import ShardError
from tokshard.jobs.cli import main
from tokshard.pipeline.tools.query import run, select_rows
from tokshard.pipeline.tools.verify import verify


@pytest.fixture()
def dataset(tmp_path, loader_datasets):
    dest = tmp_path / "ds"
    shutil.copytree(loader_datasets[("parquet", "zstd")], dest)
    return dest


def test_sql_over_shards_samples_and_dataset(dataset, capsys):
    ds = tokshard.open(dataset)
    _, rows = run(str(dataset), "SELECT count(*), sum(samples), sum(stored_bytes) FROM shards")
    assert rows == [(ds.num_shards, len(ds), int(ds.shard_bytes.sum()))]
    labels = {}
    for _, _, _, label in ds:
        labels[label] = labels.get(label, 0) + 1
    _, rows = run(str(dataset), "SELECT label, count(*) FROM samples GROUP BY label")
    assert dict(rows) == labels
    # The same histogram from labels.parquet, per shard, without the sample index.
    _, rows = run(str(dataset), "SELECT label, sum(count) FROM labels GROUP BY label")
    assert dict(rows) == {k: v for k, v in labels.items() if k is not None} and len(rows) > 1
    per_shard = {}
    for i, name in enumerate(ds.shard_names):
        for label in ds.shard(i)["label"]:
            if label is not None:
                per_shard[(name, label)] = per_shard.get((name, label), 0) + 1
    _, rows = run(str(dataset), "SELECT shard, label, count FROM labels")
    assert {(s, lab): c for s, lab, c in rows} == per_shard
    key = ds.shard(3)["key"][4]
    _, rows = run(str(dataset), f"SELECT shard, row FROM samples WHERE key = '{key}'")
    assert rows == [(ds.shard_names[3], 4)]
    _, rows = run(str(dataset), "SELECT format, json_extract_string(record, '$.codec.name') FROM dataset")
    assert rows == [("parquet", "zstd")]

    assert main(["query", str(dataset), "SELECT shard, samples FROM shards ORDER BY shard LIMIT 2",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [{"shard": n, "samples": int(s)} for n, s in zip(ds.shard_names[:2], ds.shard_sizes[:2])]
    assert main(["query", str(dataset), "SELECT shard FROM shards LIMIT 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["shard", ds.shard_names[0]]
    assert main(["query", str(dataset), "SELECT count(*) AS n FROM shards"]) == 0
    assert capsys.readouterr().out.split() == ["n", "-", str(ds.num_shards)]


def test_bad_sql_missing_or_newer_manifest_are_one_line_errors(dataset, tmp_path, capsys):
    assert main(["query", str(dataset), "SELEC * FROM shards"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokshard: error: query failed: Parser Error") and "\n" not in err
    assert main(["query", str(tmp_path / "nowhere"), "SELECT 1"]) == 2
    assert "no manifest" in capsys.readouterr().err
    from tokshard.schemas.v1 import METADATA_KEY
    table = pq.read_table(dataset / "manifest.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY]) | {"schema_version": "2.0"}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}),
                   dataset / "manifest.parquet")
    assert main(["query", str(dataset), "SELECT 1"]) == 2
    assert "newer than this tokshard supports" in capsys.readouterr().err


def test_verify_finds_and_repairs_bad_shards(dataset, capsys):
    original = {p.name: p.read_bytes() for p in (dataset / "shards").iterdir()}
    manifest = (dataset / "manifest.parquet").read_bytes()
    derived = {p: (dataset / p).read_bytes() for p in ("labels.parquet", "samples/000007.parquet")}
    assert main(["verify", str(dataset)]) == 0
    assert capsys.readouterr().out.startswith("ok: 9 shards")
    (dataset / "shards" / "000002.parquet").unlink()
    victim = dataset / "shards" / "000005.parquet"
    data = bytearray(victim.read_bytes())
    data[100] ^= 1                                   # same size, other bytes
    victim.write_bytes(bytes(data))
    (dataset / "samples" / "000007.parquet").unlink()   # the lookup/selection index of a good shard
    (dataset / "labels.parquet").write_bytes(b"not parquet")
    checked, problems = verify(str(dataset))
    assert checked == 9 and [(p.shard, p.what.split()[0]) for p in problems] == [
        ("000002", "missing"), ("000005", "sha256"), ("000007", "sample"), ("-", "record.labels:")]
    assert main(["verify", str(dataset)]) == 1
    assert "4 problem(s): 3 of 9 shards do not match the manifest, and dataset files" in capsys.readouterr().out
    assert main(["verify", str(dataset), "--repair"]) == 0
    assert "repaired 4 of 4" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (dataset / "shards").iterdir()} == original
    assert (dataset / "manifest.parquet").read_bytes() == manifest
    assert {p: (dataset / p).read_bytes() for p in derived} == derived


def test_lookup_routes_a_key_to_its_shard(dataset, capsys):
    ds = tokshard.open(dataset)
    table = pq.read_table(dataset / "manifest.parquet")
    lo, hi = table.column("key_min").to_pylist(), table.column("key_max").to_pylist()
    for i in range(ds.num_shards):
        keys = ds.shard(i)["key"]
        assert (lo[i], hi[i]) == (min(keys), max(keys))
    from tokshard.pipeline.tools.query import lookup
    key = ds.shard(6)["key"][2]
    columns, rows = lookup(str(dataset), key)
    assert len(rows) == 1 and dict(zip(columns, rows[0]))["shard"] == ds.shard_names[6]
    assert dict(zip(columns, rows[0]))["row"] == 2
    assert main(["lookup", str(dataset), "no-such-key"]) == 1
    # Routed: the other shards' index files are not read at all.
    for p in (dataset / "samples").glob("*.parquet"):
        if p.stem != ds.shard_names[6] and not (lo[int(p.stem)] <= key <= hi[int(p.stem)]):
            p.unlink()
    assert lookup(str(dataset), key)[1] == rows
    assert main(["lookup", str(dataset), key, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["key"] == key


def test_label_selections_read_only_the_shards_that_hold_the_labels(dataset):
    def scan(where):
        return sorted(run(str(dataset), f"SELECT shard, row FROM samples WHERE {where}")[1])
    wanted = "label IN (1, 4)"
    rows = select_rows(str(dataset), wanted)
    assert rows == scan(wanted) and rows
    for where in ("label IS NULL OR label = 2", "label > 1 AND key LIKE '%0%'", "label = -12345"):
        assert select_rows(str(dataset), where) == scan(where)
    # Index files of shards without label 1 or 4 are never opened: remove them and the
    # label-only selection is unchanged, while a predicate on other columns needs them all.
    holding = {s for (s,) in run(str(dataset), f"SELECT DISTINCT shard FROM labels WHERE {wanted}")[1]}
    others = [p for p in (dataset / "samples").glob("*.parquet") if p.stem not in holding]
    assert others
    for p in others:
        p.unlink()
    assert select_rows(str(dataset), wanted) == rows
    assert select_rows(str(dataset), "label = -12345") == []
    # Any other predicate reads every index file: a missing one is a ShardError, or, when
    # unreadable shards are skipped, selects nothing and is named.
    with pytest.raises(ShardError, match="sample index"):
        select_rows(str(dataset), "key LIKE '%'")
    unreadable: list[str] = []
    assert {s for s, _ in select_rows(str(dataset), "key LIKE '%'", skip_unreadable=True,
                                      unreadable=unreadable)} == holding
    assert sorted(unreadable) == sorted(p.stem for p in others)
