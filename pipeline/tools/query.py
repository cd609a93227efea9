"""SQL over a dataset's manifest with DuckDB: `shards`, `samples`, `dataset`.

- `shards`: the manifest, one row per shard (Arrow, zero-copy);
- `samples`: the per-sample index, `samples/*.parquet` read by DuckDB itself
  (so a large index is scanned lazily and filters are pushed down);
- `dataset`: one row: the dataset record's scalar fields, plus `record` (JSON);
- `labels`: (shard, label, count) for every labelled sample's label, per shard
  (`labels.parquet`, schema 1.2; empty for older datasets): label statistics at
  any scale without scanning the per-sample index.

Remote datasets (s3://...) go through the same fsspec filesystem as the rest
of tokshard, registered with DuckDB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokshard.errors import UsageError
from tokshard.pipeline.format.layout import DatasetLayout
from tokshard.pipeline.format.manifest import read_record
from tokshard.pipeline.storage import read_parquet_bytes

if TYPE_CHECKING:
    import duckdb

    from tokshard.schemas.records import DatasetRecord

FORMATS = ("table", "csv", "json")


def connect(url: str, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    return _connect(url, storage_options)[0]


def _connect(url: str, storage_options: dict | None,
             ) -> tuple[duckdb.DuckDBPyConnection, DatasetRecord, Callable[[str], str]]:
    """(connection with the views, dataset record, path of a shard's index file as DuckDB reads it)."""
    import duckdb
    import pyarrow as pa

    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    shards, info, record = read_record(layout, url)
    con = duckdb.connect()
    con.register("shards_arrow", shards)
    con.execute("CREATE VIEW shards AS SELECT * FROM shards_arrow")
    scalars = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}
    dataset = pa.Table.from_pylist([{**scalars, "record": json.dumps(record, sort_keys=True)}])
    con.register("dataset_arrow", dataset)
    con.execute("CREATE VIEW dataset AS SELECT * FROM dataset_arrow")
    remote = getattr(fs, "protocol", "file") not in ("file", ("file", "local"))

    def as_read(path: str) -> str:
        """A path as DuckDB reads it: through the registered fsspec filesystem when remote."""
        return fs.unstrip_protocol(path) if remote else path

    def index_file(shard: str) -> str:
        return as_read(layout.index(shard))

    if remote:
        con.register_filesystem(fs)
    index = as_read(layout.index_glob())
    if shards.num_rows:
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet({_literal(index)})")
    else:
        con.execute("CREATE VIEW samples AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS shard WHERE false")
    if info.labels:
        labels = _literal(as_read(layout.resolve(info.labels, "record.labels")))
        con.execute(f"CREATE VIEW labels AS SELECT * FROM read_parquet({labels})")
    else:
        con.execute("CREATE VIEW labels AS SELECT NULL::VARCHAR AS shard, NULL::BIGINT AS label, "
                    "NULL::BIGINT AS count WHERE false")
    return con, info, index_file


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run(url: str, sql: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, rows) of `sql` over the dataset's views."""
    import duckdb
    con = connect(url, storage_options)
    try:
        cur = con.execute(sql)
    except duckdb.Error as e:
        raise UsageError(f"query failed: {str(e).splitlines()[0]}") from None
    if cur.description is None:
        return [], []
    return [d[0] for d in cur.description], cur.fetchall()


def select_rows(url: str, where: str, storage_options: dict | None = None) -> list[tuple[str, int]]:
    """(shard, row) of every sample `where` (SQL over the sample index) selects.

    A predicate on `label` alone that a missing label cannot satisfy (`label IN
    (1, 2)`, `label BETWEEN 10 AND 20`) is first evaluated on labels.parquet, and
    only the index files of shards that hold a matching label are read: at
    200,000 shards that is the difference between one small file plus a few
    index files and 200,000 reads. Anything else scans the whole index.
    """
    import duckdb
    con, info, index_file = _connect(url, storage_options)
    try:
        source = "samples"
        shards = _shards_by_label(con, where) if info.labels else None
        if shards is not None:
            if not shards:
                return []
            source = "read_parquet([" + ", ".join(_literal(index_file(s)) for s in shards) + "])"
        return con.execute(f"SELECT shard, row FROM {source} WHERE {where} ORDER BY shard, row").fetchall()
    except duckdb.Error as e:
        raise UsageError(f"where={where!r} failed: {str(e).splitlines()[0]}") from None


def _shards_by_label(con: duckdb.DuckDBPyConnection, where: str) -> list[str] | None:
    """The shards whose labels can satisfy `where`, or None when the predicate is not
    about labels alone (or holds for a sample without a label, which labels.parquet omits)."""
    import duckdb
    try:
        row = con.execute(f"SELECT count(*) FROM (SELECT NULL::BIGINT AS label) WHERE {where}").fetchone()
        assert row is not None   # count(*) always returns a row
        if row[0]:
            return None
    except duckdb.BinderException:    # other columns: not a label-only predicate
        return None
    return [s for (s,) in con.execute(f"SELECT DISTINCT shard FROM labels WHERE {where} ORDER BY shard").fetchall()]


def lookup(url: str, key: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple]]:
    """Where `key` lives: its rows of the per-sample index.

    The manifest's per-shard key ranges route the lookup to the one or few
    index files that can hold the key, so it costs one small read however
    many shards there are (shards of pre-1.1 manifests, without ranges, are
    all searched).
    """
    import pyarrow.compute as pc

    from tokshard.schemas.v1 import SAMPLES
    layout = DatasetLayout.at(url, storage_options)
    shards, _, _ = read_record(layout, url)
    if "key_min" in shards.column_names:
        lo, hi = shards.column("key_min"), shards.column("key_max")
        hit = pc.or_kleene(pc.and_kleene(pc.less_equal(lo, key), pc.greater_equal(hi, key)), pc.is_null(lo))
        candidates = shards.filter(pc.fill_null(hit, True)).column("shard").to_pylist()
    else:
        candidates = shards.column("shard").to_pylist()
    rows = []
    for shard in candidates:
        data = layout.fs.cat_file(layout.index(shard))
        table = read_parquet_bytes(data, filters=[("key", "=", key)])
        rows += [tuple(r.values()) for r in table.to_pylist()]
    return list(SAMPLES.names), rows


def render(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "json":
        return json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1)
    if fmt == "csv":
        import csv
        import io
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    cells = [[str(c) for c in columns]] + [["NULL" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])
