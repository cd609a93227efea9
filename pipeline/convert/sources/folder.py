"""Folders of media files, with sidecars beside them (`NAME.txt`, `NAME.json`, `NAME.cls`)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec

from tokshard.pipeline.convert.sources.records import (
    MEDIA_EXTS,
    SIDECAR_EXTS,
    VIDEO_EXTS,
    Record,
    WorkUnit,
    safe_key,
    sidecars,
)
from tokshard.pipeline.storage import redact_text, redact_url


def read_folder(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
    fs, root = fsspec.core.url_to_fs(unit.url, **(storage_options or {}))
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
                sidecars(rec, side, fs.cat_file(p))
        yield rec
