"""Parquet files (img2dataset's parquet output, Hugging Face datasets' Parquet): a unit
is a row range, read through the row groups that hold it."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import SourceError
from tokshard.pipeline.convert.sources.records import Record, WorkUnit, bare, safe_key
from tokshard.pipeline.storage import redact_text, redact_url

_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "bytes", "image_bytes")
_CAPTION_COLUMNS = ("caption", "txt", "text")
_LABEL_COLUMNS = ("label", "cls")
_KEY_COLUMNS = ("key", "id")


def _pick(names: Sequence[str], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit if explicit in names else None
    return next((c for c in candidates if c in names), None)


def read_parquet(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
                  caption_column: str | None = None, label_column: str | None = None,
                  key_column: str | None = None) -> Iterator[Record]:
    source = redact_url(unit.url)
    stem = posixpath.basename(bare(unit.url)).rsplit(".", 1)[0]
    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            img_col = _pick(names, image_column, _IMAGE_COLUMNS)
            if img_col is None:
                raise SourceError(f"{source} has no image column (looked for {image_column or _IMAGE_COLUMNS})")
            cap_col = _pick(names, caption_column, _CAPTION_COLUMNS)
            lab_col = _pick(names, label_column, _LABEL_COLUMNS)
            key_col = _pick(names, key_column, _KEY_COLUMNS)
            table, first = read_rows(pf, unit.start, unit.stop,
                                      [c for c in (img_col, cap_col, lab_col, key_col) if c])
    except SourceError:
        raise
    except Exception as e:
        yield Record(f"{stem}#unreadable", None, source, skip="unreadable_source", detail=redact_text(str(e)))
        return
    table = table.slice(unit.start - first, unit.stop - unit.start)
    images = table.column(img_col).to_pylist()
    caps = table.column(cap_col).to_pylist() if cap_col else [None] * len(images)
    labs = table.column(lab_col).to_pylist() if lab_col else [None] * len(images)
    keys = table.column(key_col).to_pylist() if key_col else [None] * len(images)
    seen: set[str] = set()
    for i, (img, cap, lab, key) in enumerate(zip(images, caps, labs, keys)):
        key = safe_key(str(key)) if key is not None else f"{stem}/{unit.start + i:09d}"
        if isinstance(img, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            img = img.get("bytes")
        rec = Record(key or f"{stem}/{unit.start + i:09d}", img, source,
                     caption=cap if isinstance(cap, str) else None,
                     label=int(lab) if isinstance(lab, (int, float)) and lab == lab else None,
                     source_bytes=len(img) if img else 0)
        if img is None:
            rec.skip, rec.detail = "no_image", f"row {unit.start + i}"
        elif rec.key in seen:
            rec.skip, rec.detail, rec.image = "duplicate_key", rec.key, None
        seen.add(rec.key)
        yield rec


def read_rows(pf: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> tuple[pa.Table, int]:
    """The row groups of `pf` that hold rows [start, stop), only `columns`, and the
    file row number of the table's first row: a unit of a multi-GB Parquet file of
    image bytes reads its own slice, not the whole file once per unit."""
    md, row = pf.metadata, 0
    groups: list[int] = []
    first: int | None = None
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns), start
    assert first is not None  # set with the first group kept
    # use_threads=False: pyarrow's thread pool, after reading through a Python file
    # object, can abort the interpreter at exit (apache/arrow#34314).
    return pf.read_row_groups(groups, columns=columns, use_threads=False), first


