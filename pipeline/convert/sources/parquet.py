"""Parquet files (img2dataset's parquet output, Hugging Face datasets' Parquet): a unit
is a row range, read through the row groups that hold it.

What a row becomes (`records_from_table`, shared with every tabular source):

- the image: the image column's bytes; a Hugging Face `Image()` value `{bytes, path}`
  without bytes is read from `path`, resolved against the folder of the Parquet file
  (through fsspec, so `s3://` works). A path must stay inside that folder: an absolute
  path outside it, one with `..`, a URL, or a symlink out of the folder is that sample's
  `unsafe_key` skip; a path that cannot be read is its `unreadable_source` skip;
- caption, label and key from their columns (`Columns`); a label must be an integer in
  int64 range (an integral float is taken as one): a NaN or infinite float is stored as
  null with a `nonfinite_number` drop, anything else that is not an integer (a
  fraction, a huge number, a string that is not one of the column's ClassLabel names)
  as null with a `bad_label` drop;
- every other column goes into the sample's `meta` (and so is usable in `--where`), as
  JSON (`records.clean_json`): timestamps, dates and times as ISO strings, decimals as
  numbers, non-finite floats as null with a `nonfinite_number` drop. Two kinds of column are not carried,
  each counted once per sample as an `unknown_member` drop: columns holding bytes
  (a second image, audio, raw blobs: not JSON) and numeric vectors (list columns of
  floats: embeddings, tens of kB of JSON a sample).

Hugging Face writes its features into the schema's metadata (key `huggingface`):
an `Image()` column there is the image column when none is named, a lone `ClassLabel`
column the label column, and `class_names` reads the ClassLabel names for the
dataset record.
"""

from __future__ import annotations

import decimal
import json
import math
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import SourceError
from tokshard.pipeline.convert.sources.records import (
    Record,
    WorkUnit,
    bare,
    clean_json,
    decode_text,
    jsonable,
    plain_column,
    safe_key,
    utf8_text,
)
from tokshard.pipeline.storage import redact_text, redact_url

_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "bytes", "image_bytes")
# video2dataset's parquet output names a column by its encode format (`mp4`).
_VIDEO_COLUMNS = ("mp4", "video", "webm", "mkv")
_MEDIA_COLUMNS = _IMAGE_COLUMNS + _VIDEO_COLUMNS
_CAPTION_COLUMNS = ("caption", "txt", "text")
_LABEL_COLUMNS = ("label", "cls")
_KEY_COLUMNS = ("key", "id")
_HF_KEY = b"huggingface"
_INT64 = (-(2**63), 2**63 - 1)
# Path-only images are fetched this many at a time (fs.cat: concurrent on object stores).
FETCH_BLOCK = 64


def _pick(names: Sequence[str], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit if explicit in names else None
    return next((c for c in candidates if c in names), None)


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The Hugging Face features a Parquet schema's metadata records ({} if none or unreadable)."""
    raw = (schema.metadata or {}).get(_HF_KEY)
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {}
    return features if isinstance(features, dict) else {}


def _features_of(features: dict[str, Any], kind: str) -> list[str]:
    return [c for c, f in features.items() if isinstance(f, dict) and f.get("_type") == kind]


def class_names_of(schema: pa.Schema) -> dict[str, list[str]]:
    """{column: names} of the schema's Hugging Face ClassLabel columns."""
    features = hf_features(schema)
    out = {}
    for col in _features_of(features, "ClassLabel"):
        names = features[col].get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            out[utf8_text(col)[0]] = [utf8_text(n)[0] for n in names]   # (JSON escapes can spell lone surrogates)
    return out


def schema_of(url: str, storage_options: dict | None = None) -> pa.Schema:
    """The Arrow schema of the Parquet file `url` (its footer only)."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return pq.ParquetFile(f).schema_arrow
    except Exception as e:
        raise SourceError(redact_text(f"cannot read Parquet metadata of {url}: {e}")) from e


def class_names(url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """{column: names} of the Hugging Face ClassLabel columns of the Parquet file `url`
    (its footer only; {} for a file without them)."""
    return class_names_of(schema_of(url, storage_options))


@dataclass(frozen=True)
class Columns:
    """Which columns of a table hold the image, caption, label and key (None: absent);
    `video`: the image column holds videos (a Hugging Face `Video()` or a video format's name)."""
    image: str
    caption: str | None = None
    label: str | None = None
    key: str | None = None
    video: bool = False

    @classmethod
    def pick(cls, names: Sequence[str], source: str, image_column: str | None = None,
             caption_column: str | None = None, label_column: str | None = None,
             key_column: str | None = None, features: dict[str, Any] | None = None) -> Columns:
        """Named columns first, then (for a Hugging Face file, `features`) its Image feature,
        then its Video feature, then the usual names; a lone ClassLabel column is the label
        when no usual name is there."""
        features = features or {}
        hf_videos = [c for c in _features_of(features, "Video") if c in names]
        hf_media = [c for c in _features_of(features, "Image") if c in names] + hf_videos
        img_col = _pick(names, image_column, (*hf_media[:1], *_MEDIA_COLUMNS))
        if img_col is None:
            raise SourceError(f"{source} has no image column (looked for {image_column or _MEDIA_COLUMNS})")
        label = _pick(names, label_column, _LABEL_COLUMNS)
        hf_labels = [c for c in _features_of(features, "ClassLabel") if c in names]
        if label is None and not label_column and len(hf_labels) == 1:
            label = hf_labels[0]
        return cls(img_col, _pick(names, caption_column, _CAPTION_COLUMNS), label,
                   _pick(names, key_column, _KEY_COLUMNS), video=img_col in hf_videos or img_col in _VIDEO_COLUMNS)

    def names(self) -> list[str]:
        return [c for c in (self.image, self.caption, self.label, self.key) if c]


def _has_binary(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t):
        return True
    return any(_has_binary(t.field(i).type) for i in range(t.num_fields))


def _is_vector(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_floating(t.value_type))


def meta_columns(schema: pa.Schema, cols: Columns) -> tuple[list[str], list[str]]:
    """(columns carried into each sample's meta, columns left out): every column not
    used as image, caption, label or key; bytes and float vectors are left out."""
    used = set(cols.names())
    carried: list[str] = []
    left: list[str] = []
    for f in schema:
        if f.name in used:
            continue
        (left if _has_binary(f.type) or _is_vector(f.type) else carried).append(f.name)
    return carried, left


def read_parquet(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
                 caption_column: str | None = None, label_column: str | None = None,
                 key_column: str | None = None) -> Iterator[Record]:
    source = redact_url(unit.url)
    stem = posixpath.basename(bare(unit.url)).rsplit(".", 1)[0]
    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            cols = Columns.pick(schema.names, source, image_column, caption_column, label_column,
                                key_column, hf_features(schema))
            carried, left = meta_columns(schema, cols)
            table, first = read_rows(pf, unit.start, unit.stop, cols.names() + carried)
    except SourceError:
        raise
    except Exception as e:
        yield Record(f"{stem}#unreadable", None, source, skip="unreadable_source", detail=redact_text(str(e)))
        return
    names = class_names_of(schema).get(cols.label or "")
    yield from records_from_table(table.slice(unit.start - first, unit.stop - unit.start), cols, source, stem,
                                  unit.start, meta=carried, left_out=len(left), label_names=names,
                                  image_root=_folder(unit.url), storage_options=storage_options)


def _folder(url: str) -> str:
    """The folder of a file URL (an HTTP(S) URL's query dropped: its signature is the file's)."""
    return posixpath.dirname(bare(url))


def records_from_table(table: pa.Table, cols: Columns, source: str, stem: str, first_row: int, *,
                       meta: Sequence[str] | None = None, left_out: int = 0,
                       label_names: Sequence[str] | None = None, image_root: str | None = None,
                       storage_options: dict | None = None) -> Iterator[Record]:
    """One record per row of `table` (rows `first_row`... of the source file `stem`): the
    row-to-sample rule shared by every tabular source (Parquet, Hugging Face Arrow files).

    `meta`: the columns carried into each record's meta (None: every column `meta_columns`
    carries); `left_out`: how many columns were not carried (an `unknown_member` drop each,
    per sample); `label_names`: the label column's ClassLabel names (a label given as one
    of them is its index); `image_root`: the folder an image path is read against (None:
    a path-only image is a `no_image` skip)."""
    if meta is None:
        meta, left = meta_columns(table.schema, cols)
        left_out = len(left)
    n = table.num_rows
    images = table.column(cols.image).to_pylist()
    caps = table.column(cols.caption).to_pylist() if cols.caption else [None] * n
    labs = table.column(cols.label).to_pylist() if cols.label else [None] * n
    keys = table.column(cols.key).to_pylist() if cols.key else [None] * n
    # Column by column: a plain column (numbers, text) needs no per-value conversion.
    metas = {c: (col.to_pylist() if plain_column(col.type) else [jsonable(v) for v in col.to_pylist()])
             for c in meta for col in [table.column(c)]}
    name_index = {name: i for i, name in enumerate(label_names or ())}
    fetch = _PathFetcher(image_root, storage_options) if image_root is not None else None
    seen: set[str] = set()
    for b in range(0, n, FETCH_BLOCK):
        block = range(b, min(n, b + FETCH_BLOCK))
        fetched = fetch.fetch([images[i] for i in block]) if fetch is not None else {}
        for i in block:
            img, key = images[i], keys[i]
            row = first_row + i
            key = safe_key(str(key)) if key is not None else f"{stem}/{row:09d}"
            rec = Record(key or f"{stem}/{row:09d}", None, source, media="video" if cols.video else "image")
            rec.caption = _caption(caps[i], rec)
            for _ in range(left_out):
                rec.drop("unknown_member")
            rec.label = _label(labs[i], rec, name_index)
            if metas:
                rec.meta = {c: clean_json(v[i], rec) for c, v in metas.items()}
            _image(rec, img, fetched, row)
            if rec.skip is None and rec.key in seen:
                rec.skip, rec.detail, rec.image = "duplicate_key", rec.key, None
            seen.add(rec.key)
            yield rec


def _image(rec: Record, img: Any, fetched: dict[str, bytes | str], row: int) -> None:
    """Set `rec.image` from an image cell (bytes, or a Hugging Face {bytes, path}), or its skip."""
    path = None
    if isinstance(img, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        img, path = img.get("bytes"), img.get("path")
    if img is None and isinstance(path, str) and path:
        got = fetched.get(path, _NO_ROOT)
        if not isinstance(got, bytes):
            reason = {_UNSAFE: "unsafe_key", _NO_ROOT: "no_image"}.get(got, "unreadable_source")
            rec.skip, rec.detail = reason, f"row {row}: image path {path!r:.200}: {got}"
            return
        img = got
    if isinstance(img, (bytes, bytearray, memoryview)):
        rec.image = bytes(img)
        rec.source_bytes = len(rec.image)
    else:
        rec.skip, rec.detail = "no_image", f"row {row}" if img is None else f"row {row}: not bytes"


# What reading one named image can fail with that belongs to that sample alone.
_SAMPLE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_UNSAFE = "path leaves the Parquet file's folder"
_NO_ROOT = "image not embedded, and no folder to read it from"


class _PathFetcher:
    """Reads the images a Hugging Face `Image()` column names by path, relative to `root`
    (the Parquet file's folder), never outside it."""

    def __init__(self, root: str, storage_options: dict | None):
        self.root = root
        self._fs: Any = None
        self._base = ""
        self._options = storage_options
        self._local = False

    def _resolve(self, path: str) -> str | None:
        """The path inside the filesystem, or None when it leaves the root."""
        if "://" in path or path.startswith("\\"):
            return None
        base = self._base.rstrip("/")
        if path.startswith("/"):
            norm = posixpath.normpath(path)
            if not self._local or not norm.startswith(base + "/"):
                return None
            rel = norm[len(base) + 1:]
        else:
            rel = path
        parts = rel.replace("\\", "/").split("/")
        if any(p == ".." for p in parts) or (parts and ":" in parts[0]):
            return None
        full = posixpath.join(base, *[p for p in parts if p not in ("", ".")])
        if self._local:
            real_base = os.path.realpath(base)
            real = os.path.realpath(full)
            if real != real_base and not real.startswith(real_base.rstrip(os.sep) + os.sep):
                return None
        return full

    def fetch(self, cells: list[Any]) -> dict[str, bytes | str]:
        """{path: bytes, or why not (an error's text, _UNSAFE)} for the path-only cells."""
        paths: list[str] = sorted({c["path"] for c in cells if isinstance(c, dict) and c.get("bytes") is None
                                   and isinstance(c.get("path"), str) and c["path"]})
        if not paths:
            return {}
        if self._fs is None:
            self._fs, self._base = fsspec.core.url_to_fs(self.root or ".", **(self._options or {}))
            protocol = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
            self._local = "file" in protocol or "local" in protocol
        out: dict[str, bytes | str] = {}
        resolved = {}
        for p in paths:
            full = self._resolve(p)
            if full is None:
                out[p] = _UNSAFE
            else:
                resolved[full] = p
        if resolved:
            fulls = list(resolved)
            # cat_ranges, not cat: a path is a name, never a glob; concurrent on object stores.
            got = list(self._fs.cat_ranges(fulls, None, None, on_error="return"))
            for full, data in zip(fulls, got):
                if isinstance(data, BaseException) and not isinstance(data, _SAMPLE_ERRORS):
                    raise data   # the store itself failing (a network error): the unit fails, to be retried
                out[resolved[full]] = data if isinstance(data, bytes) else redact_text(
                    f"{type(data).__name__}: {data}".strip())[:300]
        return out


def _caption(cap: Any, rec: Record) -> str | None:
    if isinstance(cap, str):
        return cap
    if isinstance(cap, (bytes, bytearray)):   # a binary caption column
        return decode_text(bytes(cap), rec)
    return None


def _label(lab: Any, rec: Record, names: dict[str, int]) -> int | None:
    """An integer label in int64 range, or None (with a drop counted for a value that is not one)."""
    if lab is None:
        return None
    if isinstance(lab, bool):
        return int(lab)
    if isinstance(lab, int):
        if _INT64[0] <= lab <= _INT64[1]:
            return lab
    elif isinstance(lab, (float, decimal.Decimal)):
        if not math.isfinite(lab):
            rec.drop("nonfinite_number")
            return None
        if lab == int(lab) and _INT64[0] <= int(lab) <= _INT64[1]:
            return int(lab)
    elif isinstance(lab, str) and lab in names:
        return names[lab]
    rec.drop("bad_label")
    return None


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
