"""Folders of media files, with sidecars beside them (`NAME.txt`, `NAME.json`, `NAME.cls`).

A bad sidecar costs its field, counted, not the sample (records.sidecars); a file name that
is not UTF-8 makes a key with U+FFFD in place of its undecodable bytes (`non_utf8_text`)."""

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
    utf8_text,
)
from tokshard.pipeline.storage import redact_text, redact_url


def read_folder(unit: WorkUnit, storage_options: dict | None, **_: Any) -> Iterator[Record]:
    fs, root = fsspec.core.url_to_fs(unit.url, **(storage_options or {}))
    source = redact_url(unit.url)
    seen: set[str] = set()
    for rel in unit.members:
        stem, _dot, ext = rel.rpartition(".")
        # A file name that is not UTF-8 (listed with surrogateescape): the key gets U+FFFD.
        name, bad_name = utf8_text(rel)
        key = safe_key(name.rpartition(".")[0] or name) or name
        if ext.lower() in MEDIA_EXTS:
            if key in seen:  # a.jpg + a.png, or x.y.png + x_y.png: one key, keep the first
                yield Record(key, None, source, skip="duplicate_key", detail=name)
                continue
            seen.add(key)
        if ext.lower() not in MEDIA_EXTS:
            yield Record(key, None, source, skip="not_an_image", detail=name)
            continue
        rec = Record(key, None, source, media="video" if ext.lower() in VIDEO_EXTS else "image")
        if bad_name:
            rec.drop("non_utf8_text")
        try:
            rec.image = fs.cat_file(posixpath.join(root, rel))
            rec.source_bytes = len(rec.image)
            side_data = {}
            for side in SIDECAR_EXTS:
                p = posixpath.join(root, f"{stem}.{side}")
                if fs.exists(p):
                    side_data[side] = fs.cat_file(p)
        except OSError as e:   # the file or one of its sidecars: this sample only
            rec.skip, rec.detail, rec.image = "unreadable_source", redact_text(f"{name}: {e}"), None
            yield rec
            continue
        for side, data in side_data.items():
            sidecars(rec, side, data)
        yield rec
