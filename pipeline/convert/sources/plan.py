"""Planning: the inputs a user names (paths, URLs, globs, brace patterns) -> work units.

Units are planned from listings only, so planning is cheap and deterministic, and each
unit can be converted independently (and retried)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

import fsspec
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import SourceError
from tokshard.pipeline.convert.sources.records import SIDECAR_EXTS, WorkUnit, bare, ext_of
from tokshard.pipeline.storage import access_failure, redact_text, redact_url, storage_access

INPUT_FORMATS = ("auto", "folder", "wds", "parquet")


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
            tars = [p for p in files if bare(p).endswith(".tar")]
            parquets = [p for p in files if bare(p).endswith(".parquet")]
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
                       if ext_of(p).rsplit(".", 1)[-1] not in SIDECAR_EXTS]
                for s in range(0, len(rel), shard_size):
                    add("folder", url, members=tuple(rel[s:s + shard_size]))
        elif bare(path).endswith(".tar") or input_format == "wds":
            add("wds", url)
        elif bare(path).endswith(".parquet") or input_format == "parquet":
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


