"""Input corpora -> work units -> records.

A *work unit* is the slice of input that becomes one output shard (or a few):
a WebDataset tar, a row range of a Parquet file, or a chunk of a folder's
sorted file list. Units are planned from listings only, so planning is cheap
and deterministic, and each unit can be converted independently (and retried).
Paths are local or any fsspec URL (s3://..., presigned https://...). A unit keeps
the URL it reads from; what a record or an error says of it is its redact_url form.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import SourceError
from tokshard.pipeline.storage import access_failure, redact_text, redact_url, storage_access

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
SIDECAR_EXTS = ("txt", "json", "cls")
INPUT_FORMATS = ("auto", "folder", "wds", "parquet")
_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "bytes", "image_bytes")
_CAPTION_COLUMNS = ("caption", "txt", "text")
_LABEL_COLUMNS = ("label", "cls")
_KEY_COLUMNS = ("key", "id")


@dataclass(frozen=True)
class WorkUnit:
    index: int
    kind: str                       # "folder" | "wds" | "parquet"
    url: str                        # tar / parquet file, or the folder root
    members: tuple[str, ...] = ()   # folder: relative image paths
    start: int = 0                  # parquet: row range
    stop: int = 0

    def spec(self) -> dict[str, Any]:
        """What identifies the unit (its receipt's hash is taken over it); the URL without
        credentials, so a presigned URL signed anew is the same unit."""
        return {"kind": self.kind, "url": redact_url(self.url), "members": list(self.members),
                "start": self.start, "stop": self.stop}


@dataclass
class Record:
    key: str
    image: bytes | None
    source: str
    caption: str | None = None
    label: int | None = None
    meta: dict | None = None
    skip: str | None = None          # a SKIP_REASONS value when this record is a counted skip
    detail: str = ""
    source_bytes: int = field(default=0)
    media: str = "image"             # "image" | "video": what `image` holds

def _fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _full(fs: Any, path: str) -> str:
    """A path as a URL that fsspec reopens: plain for local files, with protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _bare(path: str) -> str:
    """`path` without the query and fragment of an HTTP(S) URL (a presigned URL's
    `?X-Amz-Signature=...`): what its name, extension and glob characters are read from."""
    if path[:8].lower().startswith(("http://", "https://")):
        return path.partition("#")[0].partition("?")[0]
    return path


def _expand(src: str, storage_options: dict | None) -> list[tuple[Any, str]]:
    out = []
    for pattern in braceexpand(src):
        fs, path = _fs(pattern, storage_options)
        bare = _bare(path)
        magic = [i for i in (bare.find(c) for c in "*?[") if i >= 0]
        if magic:
            matches = sorted(fs.glob(path))
            if not matches:
                _raise_access_failure(fs, posixpath.dirname(bare[:min(magic)]))
                raise SourceError(f"no input matches {redact_url(pattern)}")
            out += [(fs, m) for m in matches]
        elif not fs.exists(path):
            _raise_access_failure(fs, path)
            raise SourceError(f"input does not exist: {redact_url(pattern)}")
        else:
            out.append((fs, path))
    return out


def _raise_access_failure(fs: Any, path: str) -> None:
    """Raise what keeps `path` out of reach if it is the store itself (no such bucket, access
    denied, no endpoint): `exists` and `glob` answer False and [] for those too. Only asked
    once an input is found missing; anything else leaves the "does not exist" to the caller."""
    if not path:
        return
    try:
        fs.info(path)
    except Exception as e:
        if access_failure(e) is not None:
            raise


def _ext(path: str) -> str:
    base = posixpath.basename(_bare(path))
    return base.split(".", 1)[1].lower() if "." in base else ""


def plan_units(sources: list[str], shard_size: int, input_format: str = "auto",
               storage_options: dict | None = None) -> list[WorkUnit]:
    """Deterministic list of work units for the given inputs."""
    if input_format not in INPUT_FORMATS:
        raise SourceError(f"unknown input format {input_format!r} (one of {INPUT_FORMATS})")
    units: list[WorkUnit] = []

    def add(kind: str, url: str, **kw: Any) -> None:
        units.append(WorkUnit(len(units), kind, url, **kw))

    for src in sources:
        with storage_access(src, "cannot read the input", SourceError):
            _plan_source(add, src, shard_size, input_format, storage_options)
    return units


def _plan_source(add: Callable[..., None], src: str, shard_size: int, input_format: str,
                 storage_options: dict | None) -> None:
    """The units of one SRC argument (a path, URL, glob or brace pattern), in order."""
    for fs, path in _expand(src, storage_options):
        url = _full(fs, path)
        if fs.isdir(path):
            files = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith("."))
            tars = [p for p in files if _bare(p).endswith(".tar")]
            parquets = [p for p in files if _bare(p).endswith(".parquet")]
            fmt = input_format
            if fmt == "auto":
                fmt = "wds" if tars else "parquet" if parquets else "folder"
            if fmt == "wds":
                for p in tars:
                    add("wds", _full(fs, p))
            elif fmt == "parquet":
                for p in parquets:
                    _add_parquet(add, fs, p, shard_size)
            else:
                rel = [posixpath.relpath(p, path) for p in files
                       if _ext(p).rsplit(".", 1)[-1] not in SIDECAR_EXTS]
                for s in range(0, len(rel), shard_size):
                    add("folder", url, members=tuple(rel[s:s + shard_size]))
        elif _bare(path).endswith(".tar") or input_format == "wds":
            add("wds", url)
        elif _bare(path).endswith(".parquet") or input_format == "parquet":
            _add_parquet(add, fs, path, shard_size)
        else:
            raise SourceError(f"cannot tell the format of {redact_url(url)}: pass a folder, .tar or .parquet")


def _add_parquet(add: Callable[..., None], fs: Any, path: str, shard_size: int) -> None:
    try:
        with fs.open(path, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
    except Exception as e:
        raise SourceError(redact_text(f"cannot read Parquet metadata of {path}: {e}")) from e
    for s in range(0, max(n, 1), shard_size):
        add("parquet", _full(fs, path), start=s, stop=min(n, s + shard_size))


def safe_key(name: str) -> str | None:
    """A member name as a dataset key; None for names that try to escape."""
    if name.startswith("/") or name.startswith("\\"):
        return None
    parts = name.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts):
        return None
    # WebDataset splits a member name at the first dot of its basename.
    return "/".join(parts).replace(".", "_")


def read_unit(unit: WorkUnit, storage_options: dict | None = None, **columns: str | None) -> Iterator[Record]:
    readers: dict[str, Callable[..., Iterator[Record]]] = {
        "wds": _read_tar, "parquet": _read_parquet, "folder": _read_folder}
    reader = readers[unit.kind]
    yield from reader(unit, storage_options, **columns)


def _sidecars(rec: Record, ext: str, data: bytes) -> None:
    if ext == "txt":
        rec.caption = data.decode("utf-8", errors="replace")
    elif ext == "json":
        try:
            meta = json.loads(data)
            rec.meta = meta if isinstance(meta, dict) else {"value": meta}
        except (ValueError, UnicodeDecodeError):
            rec.meta = {"invalid_json": True}
    elif ext == "cls":
        try:
            rec.label = int(data.decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            pass


def _read_tar(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
    source = redact_url(unit.url)
    seen: set[str] = set()
    current: Record | None = None

    def finish(rec: Record) -> Record:
        if rec.skip is None and rec.image is None:
            rec.skip, rec.detail = "no_image", "sample has no image member"
        if rec.skip is None and rec.key in seen:
            rec.skip, rec.detail, rec.image = "duplicate_key", rec.key, None
        seen.add(rec.key)
        return rec

    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base, _dot, ext = name.rpartition("/")[2].partition(".")
                raw_key = name[: len(name) - len(ext) - 1] if ext else name
                key = safe_key(raw_key)
                if key is None:
                    yield Record(raw_key, None, source, skip="unsafe_key", detail=name)
                    continue
                ext = ext.lower()
                if current is None or current.key != key:
                    if current is not None:
                        yield finish(current)
                    current = Record(key, None, source)
                fobj = tar.extractfile(member)
                assert fobj is not None  # a regular file member (isfile above) always has one
                data = fobj.read()
                if ext in MEDIA_EXTS and current.image is None:
                    current.image, current.source_bytes = data, len(data)
                    current.media = "video" if ext in VIDEO_EXTS else "image"
                else:
                    _sidecars(current, ext, data)
    except (tarfile.TarError, OSError, EOFError) as e:
        # Samples read before the damage are kept; the rest of the tar counts once.
        if current is not None:
            current.skip, current.detail, current.image = "unreadable_source", redact_text(f"{source}: {e}"), None
            yield finish(current)
            current = None
        else:
            yield Record(f"{source}#unreadable", None, source, skip="unreadable_source",
                         detail=redact_text(f"{source}: {e}"))
    if current is not None:
        yield finish(current)


def _pick(names: Sequence[str], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit if explicit in names else None
    return next((c for c in candidates if c in names), None)


def _read_parquet(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
                  caption_column: str | None = None, label_column: str | None = None,
                  key_column: str | None = None) -> Iterator[Record]:
    source = redact_url(unit.url)
    stem = posixpath.basename(_bare(unit.url)).rsplit(".", 1)[0]
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
            table, first = _read_rows(pf, unit.start, unit.stop,
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


def _read_rows(pf: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> tuple[pa.Table, int]:
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


def _read_folder(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
    fs, root = _fs(unit.url, storage_options)
    source = redact_url(unit.url)
    seen: set[str] = set()
    for rel in unit.members:
        stem, _dot, ext = rel.rpartition(".")
        key = safe_key(stem if stem else rel) or rel
        if ext.lower() in MEDIA_EXTS:
            if key in seen:  # a.jpg + a.png, or x.y.png + x_y.png: one key, keep the first
                yield Record(key, None, source, skip="duplicate_key", detail=rel)
                continue
            seen.add(key)
        if ext.lower() not in MEDIA_EXTS:
            yield Record(key, None, source, skip="not_an_image", detail=rel)
            continue
        rec = Record(key, None, source, media="video" if ext.lower() in VIDEO_EXTS else "image")
        try:
            rec.image = fs.cat_file(posixpath.join(root, rel))
            rec.source_bytes = len(rec.image)
        except OSError as e:
            rec.skip, rec.detail = "unreadable_source", redact_text(f"{rel}: {e}")
            yield rec
            continue
        for side in SIDECAR_EXTS:
            p = posixpath.join(root, f"{stem}.{side}")
            if fs.exists(p):
                _sidecars(rec, side, fs.cat_file(p))
        yield rec
