"""`convert --where`: keep only the source samples a SQL predicate selects.

The predicate sees one row per source sample: `key`, `caption`, `label`, and
every scalar field of the sample's JSON metadata under its own name (for
img2dataset/LAION shards: `similarity`, `punsafe`, `pwatermark`, `width`,
`height`, `url`, ...), e.g. `--where "similarity > 0.3 AND punsafe < 0.1"`.
It is evaluated by DuckDB on chunks of records before anything is decoded;
samples it drops are counted as `not_selected`, so the manifest says how
many the filter took out.
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


def _row(rec: Record) -> dict:
    row = {k: v for k, v in (rec.meta or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
    row.update(key=rec.key, caption=rec.caption, label=rec.label)
    return row


ROW = "_tokshard_row"


def _table(rows: list[dict]) -> pa.Table:
    import pyarrow as pa
    names = sorted({k for r in rows for k in r} - {ROW})
    columns: dict[str, Any] = {ROW: pa.array(range(len(rows)), pa.int64())}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: compare as text
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def select_records(records: Iterable[Record], where: str) -> Iterator[Record]:
    """Yield the records `where` keeps; dropped ones come back marked not_selected."""
    import duckdb
    con = duckdb.connect(config=SANDBOX)
    it = iter(records)
    while chunk := list(islice(it, CHUNK)):
        live = [i for i, r in enumerate(chunk) if not r.skip]
        keep: set[int] = set()
        if live:
            con.register("samples_chunk", _table([_row(chunk[i]) for i in live]))
            try:
                picked = con.execute(f"SELECT {ROW} FROM samples_chunk WHERE {where}").fetchall()
            except duckdb.Error as e:
                raise UsageError(f"--where failed on the samples of {chunk[0].source}: "
                                 f"{str(e).splitlines()[0]}") from None
            keep = {live[i] for (i,) in picked}
        for i, rec in enumerate(chunk):
            if not rec.skip and i not in keep:
                rec.skip, rec.detail, rec.image = "not_selected", where, None
            yield rec
