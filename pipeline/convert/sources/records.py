"""What the source readers share: the work unit, the record a reader yields per sample,
the file-name rules (extensions, keys) and the sidecar parsing (`.txt`, `.json`, `.cls`)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from tokshard.errors import DROP_REASONS
from tokshard.pipeline.storage import redact_url

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
SIDECAR_EXTS = ("txt", "json", "cls")


@dataclass(frozen=True)
class WorkUnit:
    index: int
    kind: str                       # "folder" | "wds" | "parquet"
    url: str                        # tar / parquet file, or the folder root
    members: tuple[str, ...] = ()   # folder: relative image paths
    start: int = 0                  # parquet: row range
    stop: int = 0
    # A sidecar table of per-sample metadata joined by key (img2dataset's per-shard
    # NNNNN.parquet beside NNNNN.tar); "" for none.
    metadata: str = ""

    def spec(self) -> dict[str, Any]:
        """What identifies the unit (its receipt's hash is taken over it); the URL without
        credentials, so a presigned URL signed anew is the same unit."""
        spec = {"kind": self.kind, "url": redact_url(self.url), "members": list(self.members),
                "start": self.start, "stop": self.stop}
        if self.metadata:           # (absent otherwise: units planned before it existed keep their hash)
            spec["metadata"] = redact_url(self.metadata)
        return spec


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
    # Parts of this sample dropped while the sample is kept (DROP_REASONS values, one per part).
    dropped: list[str] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        """Count one part of this sample (a field, a member) dropped for `reason`."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        self.dropped.append(reason)


def bare(path: str) -> str:
    """`path` without the query and fragment of an HTTP(S) URL (a presigned URL's
    `?X-Amz-Signature=...`): what its name, extension and glob characters are read from."""
    if path[:8].lower().startswith(("http://", "https://")):
        return path.partition("#")[0].partition("?")[0]
    return path


def ext_of(path: str) -> str:
    base = posixpath.basename(bare(path))
    return base.split(".", 1)[1].lower() if "." in base else ""


def safe_key(name: str) -> str | None:
    """A member name as a dataset key; None for names that try to escape."""
    if name.startswith("/") or name.startswith("\\"):
        return None
    parts = name.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts):
        return None
    # WebDataset splits a member name at the first dot of its basename.
    return "/".join(parts).replace(".", "_")


def sidecars(rec: Record, ext: str, data: bytes) -> None:
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


