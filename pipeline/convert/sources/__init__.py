"""Input corpora -> work units -> records.

A *work unit* is the slice of input that becomes one output shard (or a few):
a WebDataset tar, a row range of a Parquet or Arrow file, or a chunk of a folder's
sorted file list. Paths are local or any fsspec URL (s3://..., presigned
https://...). A unit keeps the URL it reads from; what a record or an error says
of it is its redact_url form.

- `records`: WorkUnit, Record, file-name rules, sidecars;
- `plan`: inputs -> units (detection of the layout), and the files no unit reads;
- `tar`, `parquet`, `arrow`, `folder`: one reader per unit kind ("unreadable": a file
  whose footer could not be read when planned, one counted skip).

`read_unit` adds what a unit carries besides its reader's records: its metadata sidecar
(joined by key) and its split (`plan.unit_split`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokshard.pipeline.convert.sources.arrow import read_arrow
from tokshard.pipeline.convert.sources.folder import read_folder
from tokshard.pipeline.convert.sources.parquet import _KEY_COLUMNS, read_parquet
from tokshard.pipeline.convert.sources.plan import (
    IGNORE_REASONS,
    INPUT_FORMATS,
    Plan,
    plan_sources,
    plan_units,
    unit_split,
)
from tokshard.pipeline.convert.sources.records import (
    IMAGE_EXTS,
    MEDIA_EXTS,
    SIDECAR_EXTS,
    VIDEO_EXTS,
    Record,
    WorkUnit,
    bare,
    clean_json,
    jsonable,
    plain_column,
    safe_key,
)
from tokshard.pipeline.convert.sources.tar import read_tar
from tokshard.pipeline.storage import redact_text, redact_url


def read_unreadable(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
    """A source file whose footer could not be read when the job was planned: one
    `unreadable_source` skip, with what reading it says now."""
    source = redact_url(unit.url)
    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f:
            if bare(unit.url).endswith(".arrow"):
                pa.ipc.open_stream(f).schema  # noqa: B018 (reading the schema is the check)
            else:
                pq.ParquetFile(f).metadata  # noqa: B018
        detail = "unreadable when the job was planned"
    except Exception as e:
        detail = str(e)
    stem = posixpath.basename(bare(unit.url)).rsplit(".", 1)[0]
    yield Record(f"{stem}#unreadable", None, source, skip="unreadable_source",
                 detail=redact_text(f"{source}: {detail}"))


READERS: dict[str, Callable[..., Iterator[Record]]] = {"wds": read_tar, "parquet": read_parquet,
                                                         "folder": read_folder, "arrow": read_arrow,
                                                         "unreadable": read_unreadable}


def read_unit(unit: WorkUnit, storage_options: dict | None = None, **columns: str | None) -> Iterator[Record]:
    """The records of `unit`, read by the reader of its kind (`columns`: the table readers'
    column choices), with the fields of its metadata sidecar and its split added to each
    record's meta (a record's own fields win)."""
    records = READERS[unit.kind](unit, storage_options, **columns)
    split = unit_split(unit)
    if not unit.metadata and split is None:
        yield from records
        return
    side: MetadataSidecar | None = None
    if unit.metadata:
        side = read_metadata_sidecar(unit.metadata, storage_options)
    for rec in records:
        if rec.skip is None:
            extra: dict[str, Any] | None = None
            if unit.metadata and side is None:
                rec.drop("invalid_metadata")
            elif side is not None:
                row = side.index.get(rec.key)
                if row is None and "/" in rec.key:  # a folder's key: 00000/000000012 -> 000000012
                    row = side.index.get(rec.key.rsplit("/", 1)[1])
                if row is not None:
                    extra = side.fields(row)
                    for reason in side.dropped.get(row, ()):
                        rec.drop(reason)
            if split is not None:
                extra = extra if extra is not None else {}
                extra["split"] = split
            if extra:
                rec.meta = {**extra, **rec.meta} if rec.meta else extra
        if split is not None and unit.kind != "arrow" and not rec.key.startswith(f"{split}/"):
            # Keys stay unique across splits (train/00000.tar and test/00000.tar name their
            # members alike); the Arrow reader prefixes its own (save_to_disk names files alike).
            rec.key = f"{split}/{rec.key}"
        yield rec


@dataclass
class MetadataSidecar:
    """A metadata sidecar table, column by column: a row's fields are made into a dict only
    when a sample joins it (fewer objects for the garbage collector to walk: with a dict per
    row, reading img2dataset's sidecars cost several times the join's own work in collection)."""
    names: list[str]
    columns: list[list[Any]]
    index: dict[str, int]                                  # key -> row (the first row of a key)
    dropped: dict[int, list[str]] = field(default_factory=dict)   # row -> what cleaning it dropped

    def fields(self, row: int) -> dict[str, Any]:
        return {name: col[row] for name, col in zip(self.names, self.columns)}


def read_metadata_sidecar(url: str, storage_options: dict | None) -> MetadataSidecar | None:
    """A metadata sidecar table, its values made valid JSON (clean_json: a non-finite float is
    null, counted on the sample the row joins); None when it cannot be parsed (each record
    then counts `invalid_metadata`). An error reaching it (OSError) fails the unit, to be retried."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            table = pq.read_table(f, use_threads=False)
    except (pa.ArrowException, ValueError):
        return None
    key_col = next((c for c in _KEY_COLUMNS if c in table.column_names), None)
    if key_col is None:
        return None
    side = MetadataSidecar(list(table.column_names), [], {})
    for col in table.columns:
        # A plain column (numbers, text) needs no per-value conversion, and only a column that
        # may hold what JSON cannot (nested values, a non-finite float) is cleaned value by value.
        plain = plain_column(col.type)
        values = col.to_pylist() if plain else [jsonable(v) for v in col.to_pylist()]
        if not plain or (pa.types.is_floating(col.type) and pc.all(pc.is_finite(col)).as_py() is False):
            for i, v in enumerate(values):
                probe = Record("", None, "")
                values[i] = clean_json(v, probe)
                if probe.dropped:
                    side.dropped.setdefault(i, []).extend(probe.dropped)
        side.columns.append(values)
    for i, key in enumerate(side.columns[side.names.index(key_col)]):
        k = safe_key(str(key)) if key is not None else None
        if k and k not in side.index:
            side.index[k] = i
    return side


__all__ = ["IGNORE_REASONS", "IMAGE_EXTS", "INPUT_FORMATS", "MEDIA_EXTS", "READERS", "SIDECAR_EXTS", "VIDEO_EXTS",
           "Plan", "Record", "WorkUnit", "plan_sources", "plan_units", "read_unit", "safe_key"]
