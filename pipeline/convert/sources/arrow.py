"""Arrow IPC files (Hugging Face `save_to_disk`: `data-00000-of-00001.arrow`, stream
format; the file format is read too): a unit is a row range, like a Parquet unit, and its
rows become records by the same rule (`parquet.records_from_table`)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import SourceError
from tokshard.pipeline.convert.sources.parquet import Columns, class_names_of, hf_features, records_from_table
from tokshard.pipeline.convert.sources.plan import unit_split
from tokshard.pipeline.convert.sources.records import Record, WorkUnit, bare
from tokshard.pipeline.storage import redact_text, redact_url


def read_arrow(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
               caption_column: str | None = None, label_column: str | None = None,
               key_column: str | None = None) -> Iterator[Record]:
    source = redact_url(unit.url)
    stem = posixpath.basename(bare(unit.url)).rsplit(".", 1)[0]
    split = unit_split(unit)
    if split is not None:   # save_to_disk names every split's files alike: keys stay apart
        stem = f"{split}/{stem}"
    try:
        fs, path = fsspec.core.url_to_fs(unit.url, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):   # memory-mapped: the rows outside the range are not read
            with pa.memory_map(path, "r") as src:
                table = read_arrow_rows(src, unit.start, unit.stop)
        else:
            with fs.open(path, "rb") as f:
                table = read_arrow_rows(pa.PythonFile(f, mode="r"), unit.start, unit.stop)
        cols = Columns.pick(table.schema.names, source, image_column, caption_column, label_column, key_column,
                            hf_features(table.schema))
    except SourceError:
        raise
    except Exception as e:
        yield Record(f"{stem}#unreadable", None, source, skip="unreadable_source", detail=redact_text(str(e)))
        return
    # Every other column is carried into meta; ClassLabel names and image paths (resolved
    # against the file's folder) as in a Hugging Face Parquet file.
    yield from records_from_table(table, cols, source, stem, unit.start,
                                  label_names=class_names_of(table.schema).get(cols.label or ""),
                                  image_root=posixpath.dirname(bare(unit.url)), storage_options=storage_options)


def read_arrow_rows(src: Any, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of an Arrow IPC stream or file, every column (the record batches
    that hold them; the batches after `stop` are not read)."""
    head = src.read(6)
    src.seek(0)
    batches: list[pa.RecordBatch] = []
    row = first = 0
    if head == b"ARROW1":
        reader = pa.ipc.open_file(src)
        schema = reader.schema
        source: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        stream = pa.ipc.open_stream(src)
        schema = stream.schema
        source = iter(stream)
    for batch in source:
        if row >= stop:
            break
        if row + batch.num_rows > start:
            if not batches:
                first = row
            batches.append(batch)
        row += batch.num_rows
    table = pa.Table.from_batches(batches, schema=schema)
    return table.slice(max(0, start - first), max(0, stop - start))


def arrow_schema_of(url: str, storage_options: dict | None = None) -> pa.Schema:
    """The schema of the Arrow file `url` (its schema message only)."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            src = pa.PythonFile(f, mode="r")
            head = src.read(6)
            src.seek(0)
            return pa.ipc.open_file(src).schema if head == b"ARROW1" else pa.ipc.open_stream(src).schema
    except Exception as e:
        raise SourceError(redact_text(f"cannot read the Arrow schema of {url}: {e}")) from e

