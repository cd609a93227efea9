"""`convert --where`: keep only the source samples a SQL predicate selects.

The predicate sees one row per source sample: `key`, `caption`, `label`, and
every scalar field of the sample's JSON metadata under its own name (for
img2dataset/LAION shards: `similarity`, `punsafe`, `pwatermark`, `width`,
`height`, `url`, ...), e.g. `--where "similarity > 0.3 AND punsafe < 0.1"`.
It is evaluated by DuckDB on chunks of records before anything is decoded;
samples it drops are counted as `not_selected`, so the manifest says how
many the filter took out.

Types: a field has one type per work unit (number, boolean or text), set by the
first chunk of the unit that holds a value of it: number if any sample there has a
number, else boolean if any has one, else text. A sample whose value is of another
type is seen by the predicate as NULL, with a `mixed_type` drop counted on it (its
stored metadata keeps the value). Nested values (objects, lists) are not columns.
A column the predicate names that no sample of a unit has fails that unit once with
a UsageError naming it (a deterministic error: never retried); one that only some
samples have is NULL for the others. Field names are case-insensitive to DuckDB:
of two that differ only in case, the first in sorted order is the column.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from tokshard.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from tokshard.pipeline.convert.sources import Record

CHUNK = 512
# The predicate is data, often from a job config: the connection it runs in can
# read no file, write none, load no extension, and cannot be reconfigured.
SANDBOX: dict[str, str | bool | int | float | list[str]] = {"enable_external_access": False, "lock_configuration": True}


def check_predicate(where: str) -> None:
    """Fail early on SQL that cannot be valid whatever the metadata holds."""
    import duckdb
    try:
        duckdb.connect(config=SANDBOX).execute(
            f"SELECT 1 FROM (SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS caption, NULL::BIGINT AS label) "
            f"WHERE {where}")
    except duckdb.BinderException:
        pass  # a column not known yet: it comes from the samples' metadata
    except duckdb.Error as e:
        raise UsageError(f"--where is not valid: {str(e).splitlines()[0]}") from None


def referenced_columns(where: str) -> set[str] | None:
    """The column names `where` refers to (lower case), or None when DuckDB cannot say."""
    import json

    import duckdb
    try:
        out = duckdb.connect(config=SANDBOX).execute(
            "SELECT json_serialize_sql(?)", [f"SELECT 1 FROM {TABLE} WHERE {where}"]).fetchone()
        tree = json.loads(out[0]) if out else None
    except (duckdb.Error, ValueError, TypeError):
        return None
    if not isinstance(tree, dict) or tree.get("error"):
        return None
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class") == "COLUMN_REF" and node.get("column_names"):
                parts = [str(p) for p in node["column_names"]]
                names.add((parts[1] if len(parts) > 1 and parts[0].lower() == TABLE else parts[0]).lower())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return names


_BUILTIN = ("key", "caption", "label")


def _row(rec: Record) -> dict:
    row = {k: v for k, v in (rec.meta or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
    row.update(key=rec.key, caption=rec.caption, label=rec.label)
    return row


ROW = "_tokshard_row"
TABLE = "samples_chunk"
_INT64 = (-(2**63), 2**63 - 1)


def _kind(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "text"


class _Types:
    """The type of each field over one unit: set by its first chunk, kept for the rest."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}

    def settle(self, rows: list[dict], recs: list[Record]) -> None:
        """Fix new fields' types from this chunk; null (and count `mixed_type` on) values of another type."""
        for name in sorted({k for r in rows for k in r} - set(_BUILTIN)):
            kinds = {_kind(r.get(name)) for r in rows} - {None}
            if name not in self.kinds and kinds:
                self.kinds[name] = next(k for k in ("number", "bool", "text") if k in kinds)
            want = self.kinds.get(name)
            if want is None or kinds <= {want}:
                continue
            for r, rec in zip(rows, recs):
                k = _kind(r.get(name))
                if k is not None and k != want:
                    r[name] = None
                    rec.drop("mixed_type")


def _column(values: list[Any]) -> pa.Array:
    import pyarrow as pa
    if any(isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1] for v in values):
        values = [None if v is None else float(v) for v in values]   # beyond int64: compare as a double
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # (a rule above missed a case): text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _table(rows: list[dict], wanted: set[str] | None = None) -> pa.Table:
    """The chunk as a table: one column per field (a field named by the predicate but absent
    from every row of the chunk: a column of NULLs)."""
    import pyarrow as pa
    names, taken = [], set()
    for name in sorted({k for r in rows for k in r} - {ROW}):
        if name.lower() not in taken:       # DuckDB's names are case-insensitive
            taken.add(name.lower())
            names.append(name)
    columns: dict[str, Any] = {ROW: pa.array(range(len(rows)), pa.int64())}
    for name in names:
        columns[name] = _column([r.get(name) for r in rows])
    for name in sorted((wanted or set()) - taken - {ROW}):
        columns[name] = pa.nulls(len(rows))
    return pa.table(columns)


def select_records(records: Iterable[Record], where: str) -> Iterator[Record]:
    """Yield the records `where` keeps; dropped ones come back marked not_selected."""
    import duckdb
    con = duckdb.connect(config=SANDBOX)
    wanted = referenced_columns(where)
    types = _Types()
    seen: set[str] = set()
    source = None
    it = iter(records)
    while chunk := list(islice(it, CHUNK)):
        live = [i for i, r in enumerate(chunk) if not r.skip]
        keep: set[int] = set()
        if live:
            source = chunk[live[0]].source
            rows = [_row(chunk[i]) for i in live]
            types.settle(rows, [chunk[i] for i in live])
            seen.update(k.lower() for r in rows for k in r)
            con.register(TABLE, _table(rows, wanted))
            try:
                picked = con.execute(f"SELECT {ROW} FROM {TABLE} WHERE {where}").fetchall()
            except duckdb.Error as e:
                raise UsageError(f"--where failed on the samples of {chunk[0].source}: "
                                 f"{str(e).splitlines()[0]}") from None
            keep = {live[i] for (i,) in picked}
        for i, rec in enumerate(chunk):
            if not rec.skip and i not in keep:
                rec.skip, rec.detail, rec.image = "not_selected", where, None
            yield rec
    missing = sorted((wanted or set()) - seen - {ROW})
    if source is not None and missing:
        raise UsageError(f"--where names {', '.join(repr(m) for m in missing)}, which no sample of {source} has")
