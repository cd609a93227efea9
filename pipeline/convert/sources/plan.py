"""Planning: the inputs a user names (paths, URLs, globs, brace patterns) -> work units.

Units are planned from listings (and Parquet footers), so planning is cheap and
deterministic, and each unit can be converted independently (and retried).

What a folder holds decides how it is read (`input_format="auto"`):

- WebDataset tars (`.tar`, `.tar.gz`, `.tgz`): one unit per tar. A Parquet file of the
  same stem with a `key` column and no image column (img2dataset's per-shard metadata,
  `00000.tar` + `00000.parquet`) is that unit's `metadata` sidecar, joined by key;
- else tables: Parquet files (one unit per `shard_size` rows) and Arrow files (Hugging
  Face `save_to_disk`, read the same way), unless every Parquet file is the metadata
  sidecar of a folder of the same stem (img2dataset's `files` output: `00000/` +
  `00000.parquet`);
- else a folder of media files with their `.txt`/`.json`/`.cls` sidecars, in chunks of
  `shard_size`; a folder with a metadata sidecar (`00000/` + `00000.parquet`) is chunked on
  its own, its units carrying the sidecar.

Known sidecars (`*_stats.json`, `dataset_info.json`, `state.json`, `dataset_dict.json`) are
not inputs. Every other file of a folder that no unit takes is listed in `Plan.ignored`
with a reason (IGNORE_REASONS), never dropped silently. A Parquet or Arrow file whose
footer cannot be read becomes one unit of kind "unreadable", which yields a single
`unreadable_source` skip: it fails its own unit, not the job.

Splits (Hugging Face layouts): the split of a tar, Parquet or Arrow file is read from its
name or folders (`data/train-00000-of-00002.parquet`, `test/00000.tar`,
`save_to_disk` of a DatasetDict: `dataset_dict.json` + `train/` + `test/`). With `split`
given, only that split's files are planned (the others are listed as "other_split").
Without it, if more than one split is present, every unit carries its split and each of
its records gets a `split` field in its metadata and the key prefix `SPLIT/` (the splits are
never mixed silently, and keys stay unique across them);
one split or none leaves the units as they were.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import SourceError, UsageError
from tokshard.pipeline.convert.sources.parquet import _KEY_COLUMNS, _MEDIA_COLUMNS
from tokshard.pipeline.convert.sources.records import MEDIA_EXTS, SIDECAR_EXTS, WorkUnit, bare, ext_of
from tokshard.pipeline.storage import access_failure, redact_url, storage_access

INPUT_FORMATS = ("auto", "folder", "wds", "parquet", "arrow")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Files other tools write beside their shards that are not inputs (img2dataset's and
# video2dataset's per-shard stats, Hugging Face save_to_disk's descriptions).
KNOWN_SIDECAR_NAMES = ("dataset_info.json", "state.json", "dataset_dict.json")
KNOWN_SIDECAR_SUFFIXES = ("_stats.json",)
# Why a file of an input folder is not read (Plan.ignored).
IGNORE_REASONS = {
    "other_format": "an input of another kind than the folder is read as (a Parquet file among tars, ...)",
    "unknown_file": "a file no reader takes",
    "orphan_sidecar": "a caption, metadata or label file with no media file of its name",
    "other_split": "a file of another split than --split",
}
# Hugging Face's split keywords (datasets.data_files); a name is kept as written.
SPLIT_KEYWORDS = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval",
                  "evaluation")
_SHARDED_NAME = re.compile(r"^(?P<split>[A-Za-z][\w.]*?)-\d+-of-\d+(\.|$)")


@dataclass(frozen=True)
class Plan:
    """The units of a job and the files of its input folders that no unit reads:
    (redacted path, IGNORE_REASONS key). `splits`: the splits found (sorted)."""
    units: list[WorkUnit]
    ignored: list[tuple[str, str]] = field(default_factory=list)
    splits: tuple[str, ...] = ()


def unit_split(unit: WorkUnit) -> str | None:
    """The split `unit` was planned with (None: the job does not mark splits)."""
    return unit.split or None


def is_tar(path: str) -> bool:
    return bare(path).lower().endswith(TAR_SUFFIXES)


def is_known_sidecar(path: str) -> bool:
    name = posixpath.basename(bare(path))
    return name in KNOWN_SIDECAR_NAMES or name.endswith(KNOWN_SIDECAR_SUFFIXES)


def split_stem(path: str) -> str:
    """`path` without its shard extension (`.tar.gz`, `.tgz`, `.tar`, `.parquet`, ...)."""
    p = bare(path)
    for suffix in TAR_SUFFIXES:
        if p.lower().endswith(suffix):
            return p[: len(p) - len(suffix)]
    return p.rsplit(".", 1)[0] if "." in posixpath.basename(p) else p


def split_of(rel: str, dict_dirs: frozenset[str] = frozenset()) -> str | None:
    """The split a file at `rel` (relative to its input folder) belongs to, or None:
    the folder under a `dataset_dict.json` (save_to_disk of a DatasetDict), a sharded name
    `{split}-NNNNN-of-NNNNN.*` (not save_to_disk's `data-...`), a name that is or starts with
    a split keyword (`train.parquet`, `test_0.tar`), or a folder named by one (`train/`)."""
    parts = rel.split("/")
    for i in range(len(parts) - 1):
        if "/".join(parts[:i]) in dict_dirs:
            return parts[i]
    name = parts[-1]
    m = _SHARDED_NAME.match(name)
    if m and m.group("split").lower() != "data":
        return m.group("split")
    stem = name.split(".", 1)[0]
    for kw in SPLIT_KEYWORDS:
        if stem.lower() == kw or re.match(rf"{kw}[-_]", stem, re.IGNORECASE):
            return stem[: len(kw)]
    return next((d for d in reversed(parts[:-1]) if d.lower() in SPLIT_KEYWORDS), None)


def _fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _full(fs: Any, path: str) -> str:
    """A path as a URL that fsspec reopens: plain for local files, with protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _expand(src: str, storage_options: dict | None) -> list[tuple[Any, str]]:
    out = []
    for pattern in braceexpand(src):
        fs, path = _fs(pattern, storage_options)
        plain = bare(path)
        magic = [i for i in (plain.find(c) for c in "*?[") if i >= 0]
        if magic:
            matches = sorted(fs.glob(path))
            if not matches:
                _raise_access_failure(fs, posixpath.dirname(plain[:min(magic)]))
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


def plan_units(sources: list[str], shard_size: int, input_format: str = "auto",
               storage_options: dict | None = None, split: str | None = None,
               image_column: str | None = None) -> list[WorkUnit]:
    """Deterministic list of work units for the given inputs (`plan_sources(...).units`)."""
    return plan_sources(sources, shard_size, input_format, storage_options, split, image_column).units


def plan_sources(sources: list[str], shard_size: int, input_format: str = "auto",
                 storage_options: dict | None = None, split: str | None = None,
                 image_column: str | None = None) -> Plan:
    """The units of the given inputs, and the files of input folders no unit reads.
    `split`: plan only that split's files (UsageError if no file has it); `image_column`:
    the Parquet image column the job reads (`--image-column`), to tell image tables from
    metadata sidecars."""
    if input_format not in INPUT_FORMATS:
        raise SourceError(f"unknown input format {input_format!r} (one of {INPUT_FORMATS})")
    planner = _Planner(shard_size, input_format, storage_options, image_column)
    for src in sources:
        with storage_access(src, "cannot read the input", SourceError):
            planner.source(src)
    return planner.finish(split)


@dataclass
class _Pending:
    kind: str
    url: str
    kw: dict[str, Any]
    split: str | None


class _Planner:
    def __init__(self, shard_size: int, input_format: str, storage_options: dict | None,
                 image_column: str | None):
        self.shard_size, self.input_format = shard_size, input_format
        self.storage_options, self.image_column = storage_options, image_column
        self.pending: list[_Pending] = []
        self.ignored: list[tuple[str, str]] = []
        self._tables: dict[str, tuple[int, list[str]] | Exception] = {}

    # -- results ------------------------------------------------------------------------
    def finish(self, split: str | None) -> Plan:
        splits = tuple(sorted({p.split for p in self.pending if p.split is not None}))
        pending = self.pending
        if split is not None:
            if split not in splits:
                found = f"the inputs have splits: {', '.join(splits)}" if splits else "no split found in the inputs"
                raise UsageError(f"--split {split}: {found}")
            pending, seen = [], set()
            for p in self.pending:
                if p.split == split:
                    pending.append(p)
                elif p.url not in seen:
                    seen.add(p.url)
                    self.ignored.append((redact_url(p.url), "other_split"))
        mark = split is None and len(splits) > 1
        units = []
        for i, p in enumerate(pending):
            kw = dict(p.kw)
            if mark and p.split is not None:
                kw["split"] = p.split
            units.append(WorkUnit(i, p.kind, p.url, **kw))
        return Plan(units, self.ignored, splits)

    def add(self, kind: str, url: str, split: str | None = None, **kw: Any) -> None:
        self.pending.append(_Pending(kind, url, kw, split if kind != "folder" else None))

    def ignore(self, fs: Any, path: str, reason: str) -> None:
        self.ignored.append((redact_url(_full(fs, path)), reason))

    # -- tables -------------------------------------------------------------------------
    def table_info(self, fs: Any, path: str, kind: str = "parquet") -> tuple[int, list[str]] | Exception:
        """(rows, column names) of a Parquet or Arrow file, or the error reading its footer."""
        if path not in self._tables:
            try:
                if kind == "arrow":
                    self._tables[path] = _arrow_info(fs, path)
                else:
                    with fs.open(path, "rb") as f:
                        pf = pq.ParquetFile(f)
                        self._tables[path] = (pf.metadata.num_rows, list(pf.schema_arrow.names))
            except Exception as e:
                if access_failure(e) is not None:
                    raise
                self._tables[path] = e
        return self._tables[path]

    def is_metadata(self, fs: Any, path: str) -> bool:
        """A Parquet file that holds per-sample metadata, not images: a key column and no
        image column (or one that cannot be read: its loss is counted when joined)."""
        info = self.table_info(fs, path)
        if isinstance(info, Exception):
            return True
        names = info[1]
        has_image = self.image_column in names if self.image_column else any(c in names for c in _MEDIA_COLUMNS)
        return not has_image and any(c in names for c in _KEY_COLUMNS)

    def add_table(self, fs: Any, path: str, split: str | None, kind: str = "") -> None:
        kind = kind or ("arrow" if bare(path).endswith(".arrow") else "parquet")
        info = self.table_info(fs, path, kind)
        if isinstance(info, Exception):
            self.add("unreadable", _full(fs, path), split)
            return
        n = info[0]
        for s in range(0, max(n, 1), self.shard_size):
            self.add(kind, _full(fs, path), split, start=s, stop=min(n, s + self.shard_size))

    # -- inputs -------------------------------------------------------------------------
    def source(self, src: str) -> None:
        """The units of one SRC argument (a path, URL, glob or brace pattern), in order."""
        for fs, path in _expand(src, self.storage_options):
            if fs.isdir(path):
                self.folder(fs, path)
            else:
                self.file(fs, path)

    def file(self, fs: Any, path: str) -> None:
        url, fmt, name = _full(fs, path), self.input_format, posixpath.basename(bare(path))
        split = split_of(name)
        if is_tar(path) or fmt == "wds":
            self.add("wds", url, split)
        elif bare(path).endswith(".parquet") or fmt == "parquet":
            self.add_table(fs, path, split, "parquet")
        elif bare(path).endswith(".arrow") or fmt == "arrow":
            self.add_table(fs, path, split, "arrow")
        elif is_known_sidecar(path):
            return
        else:
            raise SourceError(f"cannot tell the format of {redact_url(url)}: pass a folder, .tar, .parquet "
                              "or .arrow")

    def folder(self, fs: Any, root: str) -> None:
        files = sorted(p for p in fs.find(root) if not posixpath.basename(p).startswith("."))
        rel = {p: posixpath.relpath(p, root) for p in files}
        dict_dirs = frozenset(posixpath.dirname(r) for r in rel.values()
                              if posixpath.basename(r) == "dataset_dict.json")
        tars = [p for p in files if is_tar(p)]
        parquets = [p for p in files if bare(p).endswith(".parquet")]
        arrows = [p for p in files if bare(p).endswith(".arrow")]
        media_dirs = {posixpath.dirname(p) for p in files if _ext(p) in MEDIA_EXTS}
        tables = set(parquets) | set(arrows)
        fmt = self.input_format
        if fmt == "auto":
            if tars:
                fmt = "wds"
            elif arrows or any(not (self._beside_folder(p, media_dirs) and self.is_metadata(fs, p))
                               for p in parquets):
                fmt = "tables"
            else:
                fmt = "folder"
        taken: set[str] = set()
        if fmt == "wds":
            stems = {split_stem(p): p for p in parquets}
            for p in tars:
                side = stems.get(split_stem(p))
                if side is not None and side not in taken and self.is_metadata(fs, side):
                    taken.add(side)
                    self.add("wds", _full(fs, p), split_of(rel[p], dict_dirs), metadata=_full(fs, side))
                else:
                    self.add("wds", _full(fs, p), split_of(rel[p], dict_dirs))
                taken.add(p)
        elif fmt in ("parquet", "arrow", "tables"):
            pq_inputs = set(parquets) if fmt == "parquet" else set() if fmt == "arrow" else {
                p for p in parquets   # auto: not the metadata sidecars of a folder
                if not (self._beside_folder(p, media_dirs) and self.is_metadata(fs, p))}
            arrow_inputs = set(arrows) if fmt != "parquet" else set()
            for p in files:
                if p in pq_inputs or p in arrow_inputs:
                    self.add_table(fs, p, split_of(rel[p], dict_dirs))
                    taken.add(p)
        else:
            taken |= self._folder_units(fs, root, files, rel, parquets, media_dirs)
        for p in files:
            if p in taken or is_known_sidecar(p):
                continue
            if fmt != "folder" and _ext(p) in SIDECAR_EXTS:
                reason = "orphan_sidecar"
            elif is_tar(p) or p in tables or _ext(p) in MEDIA_EXTS:
                reason = "other_format"
            else:
                reason = "unknown_file"
            self.ignore(fs, p, reason)

    @staticmethod
    def _beside_folder(parquet: str, media_dirs: set[str]) -> bool:
        """A folder of the Parquet file's stem holds media files (`00000.parquet` + `00000/`)."""
        stem = split_stem(parquet)
        return any(d == stem or d.startswith(stem + "/") for d in media_dirs)

    def _folder_units(self, fs: Any, root: str, files: list[str], rel: dict[str, str], parquets: list[str],
                      media_dirs: set[str]) -> set[str]:
        """Folder units over `files`, in sorted order, in runs of shard_size; a folder with a
        metadata sidecar (`X/` + `X.parquet`) is its own run of units carrying it. Returns the
        files taken (members, the sidecars read with them, the metadata sidecars); files
        that are neither members nor read (orphan `.txt`...) are listed here."""
        sidecar_dirs = {split_stem(p): p for p in parquets
                        if self._beside_folder(p, media_dirs) and self.is_metadata(fs, p)}
        sidecar_files = set(sidecar_dirs.values())
        members = [p for p in files if _ext(p) not in SIDECAR_EXTS and p not in sidecar_files]
        media_stems = {rel[p].rpartition(".")[0] for p in members if _ext(p) in MEDIA_EXTS}
        taken = set(members) | sidecar_files
        for p in files:
            if _ext(p) in SIDECAR_EXTS and p not in taken:
                if rel[p].rpartition(".")[0] in media_stems:
                    taken.add(p)
                elif not is_known_sidecar(p):
                    self.ignore(fs, p, "orphan_sidecar")
                    taken.add(p)

        def group(p: str) -> str:
            d = posixpath.dirname(p)
            while d and d != root and len(d) > len(root):
                if d in sidecar_dirs:
                    return sidecar_dirs[d]
                d = posixpath.dirname(d)
            return ""

        url = _full(fs, root)
        run: list[str] = []
        run_group = ""

        def flush() -> None:
            for s in range(0, len(run), self.shard_size):
                kw: dict[str, Any] = {"members": tuple(run[s:s + self.shard_size])}
                if run_group:
                    kw["metadata"] = _full(fs, run_group)
                self.add("folder", url, **kw)

        for p in members:
            g = group(p)
            if g != run_group and run:
                flush()
                run = []
            run_group = g
            run.append(rel[p])
        if run:
            flush()
        return taken


def _ext(path: str) -> str:
    """The last extension of `path`, lower case ("" for none)."""
    return ext_of(path).rsplit(".", 1)[-1]


def _arrow_info(fs: Any, path: str) -> tuple[int, list[str]]:
    """(rows, column names) of an Arrow IPC file, stream format (Hugging Face save_to_disk)
    or file format. A local file is memory-mapped, so only the batch headers are touched."""
    if isinstance(fs, LocalFileSystem):
        with pa.memory_map(path, "r") as src:
            return _count_ipc(src)
    with fs.open(path, "rb") as f:
        return _count_ipc(pa.PythonFile(f, mode="r"))


def _count_ipc(src: Any) -> tuple[int, list[str]]:
    head = src.read(6)
    src.seek(0)
    if head == b"ARROW1":
        reader = pa.ipc.open_file(src)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)), reader.schema.names
    stream = pa.ipc.open_stream(src)
    return sum(b.num_rows for b in stream), stream.schema.names


__all__ = ["INPUT_FORMATS", "IGNORE_REASONS", "Plan", "plan_sources", "plan_units", "split_of", "unit_split"]
