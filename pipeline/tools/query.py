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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tokshard.errors import ManifestError, ShardError, UsageError
from tokshard.pipeline.format.layout import DatasetLayout
from tokshard.pipeline.format.manifest import read_record
from tokshard.pipeline.storage import read_parquet_bytes

if TYPE_CHECKING:
    import duckdb

    from tokshard.pipeline.stream.dataset import TokenDataset
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


def select_rows(url: str, where: str, storage_options: dict | None = None, *,
                dataset: TokenDataset | None = None, skip_unreadable: bool = False) -> list[tuple[str, int]]:
    """(shard, row) of every sample `where` (SQL over the sample index) selects.

    A predicate on `label` alone that a missing label cannot satisfy (`label IN
    (1, 2)`, `label BETWEEN 10 AND 20`) is first evaluated on labels.parquet, and
    only the index files of shards that hold a matching label are read: at
    200,000 shards that is the difference between one small file plus a few
    index files and 200,000 reads. Anything else scans the whole index.

    Every row is checked against the shard it names (`check_rows`), so a stale or
    tampered index is a typed error, never another sample. `dataset` is the dataset
    at `url` when the caller has it open; `skip_unreadable` keeps, unchecked, the rows
    of shards that cannot be read (a loader with on_error="skip" drops those shards).
    """
    import duckdb
    con, info, index_file = _connect(url, storage_options)
    try:
        source = "samples"
        shards = _shards_by_label(con, where, url, info.labels) if info.labels else None
        if shards is not None:
            if not shards:
                return []
            source = "read_parquet([" + ", ".join(_literal(index_file(s)) for s in shards) + "])"
        found = con.execute(f"SELECT shard, row, key FROM {source} WHERE {where} ORDER BY shard, row").fetchall()
    except duckdb.Error as e:
        raise UsageError(f"where={where!r} failed: {str(e).splitlines()[0]}") from None
    if not found:
        return []
    if dataset is None:
        from tokshard.pipeline.stream.dataset import TokenDataset
        dataset = TokenDataset(url, storage_options=storage_options)
    check_rows(dataset, found, skip_unreadable=skip_unreadable)
    return [(shard, row) for shard, row, _ in found]


def check_rows(ds: TokenDataset, rows: Iterable[tuple[Any, Any, Any]], *,
               skip_unreadable: bool = False) -> list[tuple[int, int]]:
    """(shard number in manifest order, row) of each sample-index row (shard, row, key),
    checked against the shard itself: the shard is one the manifest lists, the row is
    inside it and the shard holds the row's key at that row. Anything else is a
    `ManifestError` (unknown shard) or a `ShardError` naming the shard: an index that is
    stale or was tampered with never selects another sample.

    Only the shards that rows name are read (their key column is what is compared);
    with `skip_unreadable`, the rows of a shard that cannot be read are returned unchecked.
    """
    number = {name: i for i, name in enumerate(ds.shard_names)}
    out: list[tuple[int, int]] = []
    wanted: dict[int, list[tuple[int, Any]]] = {}
    for shard, row, key in rows:
        i = number.get(shard) if isinstance(shard, str) else None
        if i is None:
            raise ManifestError(f"{ds.url}: the sample index names shard {shard!r:.40}, "
                                "which the manifest does not list (a stale or tampered index)")
        size = int(ds.shard_sizes[i])
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < size:
            raise ShardError(ds.shard_names[i], f"the sample index names row {row!r:.40} for key {key!r:.60}, "
                             f"outside the shard's {size} samples (a stale or tampered index)")
        out.append((i, row))
        wanted.setdefault(i, []).append((row, key))
    for i, checks in sorted(wanted.items()):
        try:
            keys = ds.read_shard(i)["key"]
        except ShardError:
            if skip_unreadable:
                continue
            raise
        for row, key in checks:
            if keys[row] != key:
                raise ShardError(ds.shard_names[i], f"row {row} holds key {keys[row]!r:.60}, the sample index "
                                 f"says {key!r:.60} (a stale or tampered index)")
    return out


def _shards_by_label(con: duckdb.DuckDBPyConnection, where: str, url: str, labels: str) -> list[str] | None:
    """The shards whose labels can satisfy `where`, or None when the predicate is not
    about labels alone (or holds for a sample without a label, which labels.parquet omits).
    Each is one the manifest lists: the label table (at `labels`) never names a file to read."""
    import duckdb
    try:
        row = con.execute(f"SELECT count(*) FROM (SELECT NULL::BIGINT AS label) WHERE {where}").fetchone()
        assert row is not None   # count(*) always returns a row
        if row[0]:
            return None
    except duckdb.BinderException:    # other columns: not a label-only predicate
        return None
    shards = [s for (s,) in con.execute(f"SELECT DISTINCT shard FROM labels WHERE {where} ORDER BY shard").fetchall()]
    listed = {s for (s,) in con.execute("SELECT shard FROM shards").fetchall()}
    unknown = [s for s in shards if s not in listed]
    if unknown:
        raise ManifestError(f"{url}: {labels} names shard {unknown[0]!r:.40}, which the manifest does not list")
    return shards


def lookup(url: str, key: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple]]:
    """Where `key` lives: its rows of the per-sample index.

    The manifest's per-shard key ranges route the lookup to the one or few
    index files that can hold the key, so it costs one small read however
    many shards there are (shards of pre-1.1 manifests, without ranges, are
    all searched). Each row found is checked against the shard it names
    (`check_rows`): a stale or tampered index is a typed error, never another sample.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.schemas.v1 import SAMPLES
    ds = TokenDataset(url, storage_options=storage_options)
    shards, layout = ds.manifest, ds.layout
    if "key_min" in shards.column_names:
        lo, hi = shards.column("key_min"), shards.column("key_max")
        try:
            hit = pc.or_kleene(pc.and_kleene(pc.less_equal(lo, key), pc.greater_equal(hi, key)), pc.is_null(lo))
        except pa.ArrowException as e:
            raise ManifestError(f"{url}: the manifest's key_min/key_max columns are damaged ({e})") from None
        candidates = shards.filter(pc.fill_null(hit, True)).column("shard").to_pylist()
    else:
        candidates = shards.column("shard").to_pylist()
    rows = []
    for shard in candidates:
        try:
            data = layout.fs.cat_file(layout.index(shard))
            table = read_parquet_bytes(data, filters=[("key", "=", key)])
        except FileNotFoundError:
            raise ShardError(shard, "its sample index is missing (tokshard verify --repair rebuilds it)") from None
        except pa.ArrowException as e:
            raise ShardError(shard, f"its sample index is unreadable ({type(e).__name__})") from None
        # By name, not position: a rewritten index file may order or omit its columns differently.
        rows += [tuple(r.get(c) for c in SAMPLES.names) for r in table.to_pylist()]
    shard_at, row_at, key_at = (SAMPLES.names.index(c) for c in ("shard", "row", "key"))
    check_rows(ds, [(r[shard_at], r[row_at], r[key_at]) for r in rows])
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
