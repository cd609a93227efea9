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
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tokshard.errors import ManifestError, ShardError, UsageError
from tokshard.pipeline.format.integrity import file_problem, read_checked
from tokshard.pipeline.format.layout import INDEX_DIR, DatasetLayout
from tokshard.pipeline.format.manifest import read_valid
from tokshard.pipeline.storage import read_parquet_bytes
from tokshard.schemas.records import FileDigest

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.schemas.records import DatasetRecord

FORMATS = ("table", "csv", "json")
# where=: index files read concurrently (object stores are latency-bound), and filtered in
# groups so memory is bounded by a group (a shard's index is ~100 bytes a sample).
INDEX_READERS = 16
INDEX_GROUP = 256
# query's `samples` view: index files hashed before DuckDB scans them when all of them together
# are at most this (a few seconds); beyond, sizes here, sha256s in verify / where= / lookup.
QUERY_HASH_BYTES = 2**30
# labels.parquet: a row per (shard, label); a million shards of a thousand labels stay below.
MAX_LABELS_BYTES = 2**30


VIEWS = ("shards", "samples", "labels", "dataset")


def connect(url: str, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with every view of the dataset at `url`, confined to it."""
    return _connect(url, storage_options)[0]


def _connect(url: str, storage_options: dict | None, views: Iterable[str] | None = None,
             ) -> tuple[duckdb.DuckDBPyConnection, DatasetRecord]:
    """(connection with the views, dataset record). `views`: the file-backed views to make
    (`samples`, `labels`; None: all): each costs a listing or a checked read, so a query
    makes only those it names. `shards` and `dataset` are always there (in memory).

    The connection is confined to the dataset: DuckDB may read files under its root only,
    and may not write, attach, install or change that setting, so SQL (a `--where`
    included) cannot reach another file. The `samples` view reads only the index files
    of shards the manifest lists (a stray or orphaned file adds no rows); the label table
    is checked against its recorded size and sha256 before DuckDB reads it."""
    import duckdb
    import pyarrow as pa

    wanted = set(VIEWS if views is None else views)
    layout = DatasetLayout.at(url, storage_options)
    fs = layout.fs
    shards, info, record, _ = read_valid(layout, url)     # what open checks, query checks
    con = duckdb.connect()
    con.register("shards_arrow", shards)
    con.execute("CREATE VIEW shards AS SELECT * FROM shards_arrow")
    scalars = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}
    dataset = pa.Table.from_pylist([{**scalars, "record": json.dumps(record, sort_keys=True)}])
    con.register("dataset_arrow", dataset)
    con.execute("CREATE VIEW dataset AS SELECT * FROM dataset_arrow")
    as_read = _as_read(fs)
    if as_read is not None:
        con.register_filesystem(fs)
    else:
        as_read = str
    con.execute(f"SET allowed_directories = [{_literal(as_read(layout.root).rstrip('/') + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    if "labels" in wanted:
        _labels_view(con, layout, info, url)
    if "samples" in wanted and shards.num_rows:
        _check_index_files(layout, shards)
        folder = _literal(as_read(layout.resolve(INDEX_DIR)).rstrip("/") + "/")
        # Only the index files of listed shards, each row held to its file: it names the
        # file's shard and a row inside it (anything else stops the query with the reason).
        try:
            con.execute(
                f"CREATE VIEW samples AS SELECT * EXCLUDE (filename, _s, _n, _f) FROM read_parquet("
                f"{_literal(as_read(layout.index_glob()))}, filename = true) AS i "
                f"JOIN (SELECT shard AS _s, samples AS _n, {folder} || shard || '.parquet' AS _f FROM shards) AS m "
                "ON i.filename = m._f WHERE CASE "
                "WHEN i.shard IS DISTINCT FROM m._s THEN error('the sample index of shard ' || m._s || "
                "' holds a row naming shard ' || coalesce(i.shard, 'NULL') || ' (a stale or tampered index)') "
                "WHEN i.row IS NULL OR i.row < 0 OR i.row >= m._n THEN error('the sample index of shard ' || "
                "m._s || ' names row ' || coalesce(i.row::VARCHAR, 'NULL') || ', outside its ' || m._n || "
                "' samples (a stale or tampered index)') ELSE true END")
        except duckdb.Error as e:
            raise ManifestError(f"{url}: the sample index is unreadable ({str(e).splitlines()[0]})") from None
    elif "samples" in wanted:
        con.execute("CREATE VIEW samples AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS shard WHERE false")
    return con, info


def _as_read(fs: Any) -> Callable[[str], str] | None:
    """How DuckDB names a path of `fs`: through the registered fsspec filesystem (its URL)
    when remote; None for the local disk, which DuckDB reads itself."""
    if getattr(fs, "protocol", "file") in ("file", ("file", "local")):
        return None
    return fs.unstrip_protocol


def _labels_view(con: duckdb.DuckDBPyConnection, layout: DatasetLayout, info: DatasetRecord, url: str) -> None:
    """The `labels` view: labels.parquet, checked against the manifest's digest, read by
    DuckDB itself (at 200,000 shards it holds millions of rows: no copy through Python)."""
    import duckdb

    from tokshard.schemas.v1 import LABELS
    if not info.labels:
        con.execute("CREATE VIEW labels AS SELECT NULL::VARCHAR AS shard, NULL::BIGINT AS label, "
                    "NULL::BIGINT AS count WHERE false")
        return
    path = layout.resolve(info.labels, "record.labels")
    what = file_problem(layout, path, info.files.get(info.labels))
    if what == "missing":
        raise ManifestError(f"{url}: the label table {info.labels} is missing")
    if what:
        raise ManifestError(f"record.labels: {info.labels} has {what}")
    size = layout.fs.size(path)
    if size > MAX_LABELS_BYTES:
        raise ManifestError(f"record.labels: {info.labels} has {size} bytes, more than the {MAX_LABELS_BYTES} "
                            "a reader accepts")
    columns = ", ".join(f"{name}::{'VARCHAR' if name == 'shard' else 'BIGINT'} AS {name}" for name in LABELS.names)
    try:
        source = _literal((_as_read(layout.fs) or str)(path))
        con.execute(f"CREATE VIEW labels AS SELECT {columns} FROM read_parquet({source})")
    except duckdb.Error as e:
        raise ManifestError(f"{url}: the label table {info.labels} is unreadable ({str(e).splitlines()[0]})") from None


def _labels(layout: DatasetLayout, info: DatasetRecord, url: str) -> pa.Table:
    """The label table as Arrow, checked against the manifest's digest (`verify` compares it
    with the shards); an empty one before schema 1.2."""
    import pyarrow as pa

    from tokshard.schemas.v1 import LABELS
    if not info.labels:
        return LABELS.empty_table()
    try:
        data = read_checked(layout, info.labels, "record.labels", info.files.get(info.labels),
                            limit=MAX_LABELS_BYTES)
        table = read_parquet_bytes(data)
        return table.select(LABELS.names).cast(LABELS)
    except FileNotFoundError:
        raise ManifestError(f"{url}: the label table {info.labels} is missing") from None
    except (KeyError, pa.ArrowException) as e:
        raise ManifestError(f"{url}: the label table {info.labels} is unreadable ({type(e).__name__})") from None


def _check_index_files(layout: DatasetLayout, shards: pa.Table) -> None:
    """Before DuckDB scans them: every listed shard's index file exists with the size the
    manifest records (one listing of the folder, no read), and is not a link that leaves the
    root (DuckDB follows links). When all of them together are at most QUERY_HASH_BYTES,
    their sha256s are checked too (read in threads); larger indexes are checked by size here
    and by sha256 in `verify`, `where=` and `lookup`, which read them through the dataset."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from fsspec.implementations.local import LocalFileSystem
    folder = layout.resolve(INDEX_DIR)
    found: dict[str, int] = {}
    if isinstance(layout.fs, LocalFileSystem):
        if os.path.isdir(folder):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        layout.resolve(f"{INDEX_DIR}/{entry.name}", "sample index")
                    found[entry.name] = entry.stat().st_size
    else:
        try:
            found = {d["name"].rstrip("/").rsplit("/", 1)[-1]: int(d.get("size") or 0)
                     for d in layout.fs.ls(folder, detail=True)}
        except FileNotFoundError:
            pass
    names = shards.column("shard").to_pylist()
    has_digests = "index_sha256" in shards.column_names and "index_bytes" in shards.column_names
    sizes = shards.column("index_bytes").to_pylist() if has_digests else [None] * len(names)
    digests = shards.column("index_sha256").to_pylist() if has_digests else [None] * len(names)
    for name, size in zip(names, sizes):
        got = found.get(f"{name}.parquet")
        if got is None:
            raise ShardError(name, f"its sample index {INDEX_DIR}/{name}.parquet is missing (tokshard verify "
                             "--repair rebuilds it)")
        if size is not None and got != size:
            raise ShardError(name, f"its sample index has {got} bytes, the manifest says {size}")
    if not has_digests or sum(s or 0 for s in sizes) > QUERY_HASH_BYTES:
        return

    def check(item: tuple[str, Any, Any]) -> None:
        name, size, want = item
        what = None if want is None else file_problem(layout, layout.index(name), FileDigest(size, want))
        if what:
            raise ShardError(name, f"its sample index has {what}")
    with ThreadPoolExecutor(INDEX_READERS) as pool:
        list(pool.map(check, zip(names, sizes, digests)))


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run(url: str, sql: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, rows) of `sql` over the dataset's views."""
    import duckdb
    try:
        named: set[str] | None = set(duckdb.connect().get_table_names(sql)) & set(VIEWS)
    except duckdb.Error:
        named = None        # not parsed alone (several statements, ...): make every view
    con, _ = _connect(url, storage_options, named)
    try:
        cur = con.execute(sql)
    except duckdb.Error as e:
        raise UsageError(f"query failed: {str(e).splitlines()[0]}") from None
    if cur.description is None:
        return [], []
    return [d[0] for d in cur.description], cur.fetchall()


def select_rows(url: str, where: str, storage_options: dict | None = None, *,
                dataset: TokenDataset | None = None, skip_unreadable: bool = False,
                unreadable: list[str] | None = None) -> list[tuple[str, int]]:
    """(shard, row) of every sample `where` (SQL over the sample index) selects.

    A predicate on `label` alone that a missing label cannot satisfy (`label IN
    (1, 2)`, `label BETWEEN 10 AND 20`) is first evaluated on labels.parquet, and
    only the index files of shards that hold a matching label are read: at
    200,000 shards that is the difference between one small file plus a few
    index files and 200,000 reads. Anything else scans the whole index.

    Each index file is read by the dataset (`TokenDataset.read_index`: its size and
    sha256 checked against the manifest) and filtered by DuckDB in groups, so memory
    stays bounded by a group, not the index. Every row is then checked against the
    shard it names (`check_rows`), so a stale or tampered index is a typed error, never
    another sample. `dataset` is the dataset at `url` when the caller has it open.
    With `skip_unreadable`, a shard whose index cannot be read selects nothing and is
    appended to `unreadable`; the rows of shards that cannot be read are kept unchecked
    (a loader with on_error="skip" drops those shards and counts them).
    """
    import duckdb
    import pyarrow as pa

    from tokshard.schemas.v1 import SAMPLES
    if dataset is None:
        from tokshard.pipeline.stream.dataset import TokenDataset
        dataset = TokenDataset(url, storage_options=storage_options)
    ds = dataset
    con, info = _connect(url, storage_options, views=())
    try:
        con.register("index_group", SAMPLES.empty_table())     # the predicate binds, or fails now
        con.execute(f"SELECT shard, row, key FROM index_group WHERE {where}").fetchall()
        routed = _shards_by_label(con, where, url, info.labels,
                                  lambda: _labels_view(con, ds.layout, info, url)) if info.labels else None
    except duckdb.Error as e:
        raise UsageError(f"where={where!r} failed: {str(e).splitlines()[0]}") from None
    number = {name: i for i, name in enumerate(ds.shard_names)}
    todo = sorted((number[s] for s in routed) if routed is not None else range(ds.num_shards),
                  key=lambda i: ds.shard_names[i])

    def read(i: int) -> pa.Table | None:
        try:
            return ds.read_index(i).select(SAMPLES.names).cast(SAMPLES)
        except ShardError:
            if skip_unreadable:
                return None
            raise
        except (KeyError, pa.ArrowException) as e:
            if skip_unreadable:
                return None
            raise ShardError(ds.shard_names[i], f"its sample index does not have the index columns "
                             f"({type(e).__name__})") from None

    def checked(i: int) -> bool:
        """Shard `i`'s index file matches its digest (on a local disk, where DuckDB then reads
        the same file itself, in parallel, faster than parsing it here)."""
        try:
            ds.index_bytes(i)
            return True
        except ShardError:
            if skip_unreadable:
                return False
            raise

    def select(source: str) -> list[tuple[str, int, str]]:
        return con.execute(f"SELECT shard, row, key FROM {source} WHERE {where} ORDER BY shard, row").fetchall()

    local = _as_read(ds.layout.fs) is None
    found: list[tuple[str, int, str]] = []
    with ThreadPoolExecutor(INDEX_READERS) as pool:
        for start in range(0, len(todo), INDEX_GROUP):
            group = todo[start:start + INDEX_GROUP]
            if local:
                ok = [i for i, good in zip(group, pool.map(checked, group)) if good]
                if unreadable is not None:
                    unreadable += [ds.shard_names[i] for i in sorted(set(group) - set(ok))]
                if not ok:
                    continue
                files = ", ".join(_literal(ds.layout.index(ds.shard_names[i])) for i in ok)
                try:
                    found += select(f"read_parquet([{files}])")
                    continue
                except duckdb.Error:
                    group = ok      # a file DuckDB cannot read: each parsed here, to name it
            tables = []
            for i, table in zip(group, pool.map(read, group)):
                if table is None:
                    if unreadable is not None:
                        unreadable.append(ds.shard_names[i])
                else:
                    tables.append(table)
            if not tables:
                continue
            con.register("index_group", pa.concat_tables(tables))
            try:
                found += select("index_group")
            except duckdb.Error as e:
                raise UsageError(f"where={where!r} failed: {str(e).splitlines()[0]}") from None
            con.unregister("index_group")
    if not found:
        return []
    check_rows(ds, found, skip_unreadable=skip_unreadable)
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
    rows = list(rows)
    number = ds.shard_numbers({shard for shard, _, _ in rows if isinstance(shard, str)})
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
            keys = ds.read_keys(i)
        except ShardError:
            if skip_unreadable:
                continue
            raise
        for row, key in checks:
            if keys[row] != key:
                raise ShardError(ds.shard_names[i], f"row {row} holds key {keys[row]!r:.60}, the sample index "
                                 f"says {key!r:.60} (a stale or tampered index)")
    return out


def _shards_by_label(con: duckdb.DuckDBPyConnection, where: str, url: str, labels: str,
                     make_view: Callable[[], None]) -> list[str] | None:
    """The shards whose labels can satisfy `where`, or None when the predicate is not
    about labels alone (or holds for a sample without a label, which labels.parquet omits).
    Each is one the manifest lists: the label table (at `labels`; its view made by
    `make_view`, only when it is needed) never names a file to read."""
    import duckdb
    try:
        # fetchall, not fetchone: an unfinished result would block the connection's next use.
        (count,), = con.execute(f"SELECT count(*) FROM (SELECT NULL::BIGINT AS label) WHERE {where}").fetchall()
        if count:
            return None
    except duckdb.BinderException:    # other columns: not a label-only predicate
        return None
    make_view()
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
    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.schemas.v1 import SAMPLES
    ds = TokenDataset(url, storage_options=storage_options)
    rows = []
    for i in ds.shards_for_key(key):
        # Checked against the manifest's digest (schema 1.3) before it is parsed.
        table = ds.read_index(i, filters=[("key", "=", key)])
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
