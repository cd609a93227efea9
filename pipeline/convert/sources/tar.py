"""WebDataset tars: samples are runs of members sharing a key (webdataset's rule: the
name up to the first dot of its basename)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

from tokshard.pipeline.convert.sources.records import MEDIA_EXTS, VIDEO_EXTS, Record, WorkUnit, safe_key, sidecars
from tokshard.pipeline.storage import redact_text, redact_url


def read_tar(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
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
                    sidecars(current, ext, data)
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


