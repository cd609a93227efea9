"""Input corpora -> work units -> records.

A *work unit* is the slice of input that becomes one output shard (or a few):
a WebDataset tar, a row range of a Parquet file, or a chunk of a folder's
sorted file list. Paths are local or any fsspec URL (s3://..., presigned
https://...). A unit keeps the URL it reads from; what a record or an error says
of it is its redact_url form.

- `records`: WorkUnit, Record, file-name rules, sidecars;
- `plan`: inputs -> units (detection of the layout);
- `tar`, `parquet`, `folder`: one reader per unit kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tokshard.pipeline.convert.sources.folder import read_folder
from tokshard.pipeline.convert.sources.parquet import read_parquet
from tokshard.pipeline.convert.sources.plan import INPUT_FORMATS, plan_units
from tokshard.pipeline.convert.sources.records import (
    IMAGE_EXTS,
    MEDIA_EXTS,
    SIDECAR_EXTS,
    VIDEO_EXTS,
    Record,
    WorkUnit,
    safe_key,
)
from tokshard.pipeline.convert.sources.tar import read_tar

READERS: dict[str, Callable[..., Iterator[Record]]] = {"wds": read_tar, "parquet": read_parquet,
                                                         "folder": read_folder}


def read_unit(unit: WorkUnit, storage_options: dict | None = None, **columns: str | None) -> Iterator[Record]:
    """The records of `unit`, read by the reader of its kind (`columns`: the parquet reader's
    column choices)."""
    yield from READERS[unit.kind](unit, storage_options, **columns)


__all__ = ["IMAGE_EXTS", "INPUT_FORMATS", "MEDIA_EXTS", "READERS", "SIDECAR_EXTS", "VIDEO_EXTS", "Record",
           "WorkUnit", "plan_units", "read_unit", "safe_key"]
