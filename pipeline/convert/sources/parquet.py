"""Parquet files (img2dataset's parquet output, Hugging Face datasets' Parquet): a unit
is a row range, read through the row groups that hold it."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Columns:
    """Which columns of a table hold the image, caption, label and key (None: absent)."""
    image: str
    caption: str | None = None
    label: str | None = None
    key: str | None = None

    @classmethod
    def pick(cls, names: Sequence[str], source: str, image_column: str | None = None,
             caption_column: str | None = None, label_column: str | None = None,
             key_column: str | None = None) -> Columns:
        img_col = _pick(names, image_column, _IMAGE_COLUMNS)
        if img_col is None:
            raise SourceError(f"{source} has no image column (looked for {image_column or _IMAGE_COLUMNS})")
        return cls(img_col, _pick(names, caption_column, _CAPTION_COLUMNS),
                   _pick(names, label_column, _LABEL_COLUMNS), _pick(names, key_column, _KEY_COLUMNS))

    def names(self) -> list[str]:
        return [c for c in (self.image, self.caption, self.label, self.key) if c]


def read_parquet(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
                 caption_column: str | None = None, label_column: str | None = None,
                 key_column: str | None = None) -> Iterator[Record]:
    source = redact_url(unit.url)
    stem = posixpath.basename(bare(unit.url)).rsplit(".", 1)[0]
    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f:
            pf = pq.ParquetFile(f)
            cols = Columns.pick(pf.schema_arrow.names, source, image_column, caption_column, label_column,
                                key_column)
            table, first = read_rows(pf, unit.start, unit.stop, cols.names())
    except SourceError:
        raise
    except Exception as e:
        yield Record(f"{stem}#unreadable", None, source, skip="unreadable_source", detail=redact_text(str(e)))
        return
    yield from records_from_table(table.slice(unit.start - first, unit.stop - unit.start), cols, source, stem,
                                  unit.start)


def records_from_table(table: pa.Table, cols: Columns, source: str, stem: str, first_row: int) -> Iterator[Record]:
    """One record per row of `table` (rows `first_row`... of the source file `stem`): the
    row-to-sample rule shared by every tabular source (Parquet, Hugging Face Arrow files)."""
    images = table.column(cols.image).to_pylist()
    caps = table.column(cols.caption).to_pylist() if cols.caption else [None] * len(images)
    labs = table.column(cols.label).to_pylist() if cols.label else [None] * len(images)
    keys = table.column(cols.key).to_pylist() if cols.key else [None] * len(images)
    seen: set[str] = set()
    for i, (img, cap, lab, key) in enumerate(zip(images, caps, labs, keys)):
        key = safe_key(str(key)) if key is not None else f"{stem}/{first_row + i:09d}"
        if isinstance(img, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            img = img.get("bytes")
        rec = Record(key or f"{stem}/{first_row + i:09d}", img, source,
                     caption=cap if isinstance(cap, str) else None,
                     label=int(lab) if isinstance(lab, (int, float)) and lab == lab else None,
                     source_bytes=len(img) if img else 0)
        if img is None:
            rec.skip, rec.detail = "no_image", f"row {first_row + i}"
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


