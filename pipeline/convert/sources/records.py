"""What the source readers share: the work unit, the record a reader yields per sample,
the file-name rules (extensions, keys), the sidecar parsing (`.txt`, `.json`, `.cls`) and
the metadata cleaning every reader shares (clean_json: stored metadata is valid JSON)."""

from __future__ import annotations

import datetime
import decimal
import json
import math
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
    # The split the unit's file belongs to, when the inputs hold several and none was chosen
    # (every record then carries it in meta); "" otherwise.
    split: str = ""

    def spec(self) -> dict[str, Any]:
        """What identifies the unit (its receipt's hash is taken over it); the URL without
        credentials, so a presigned URL signed anew is the same unit."""
        spec = {"kind": self.kind, "url": redact_url(self.url), "members": list(self.members),
                "start": self.start, "stop": self.stop}
        if self.metadata:           # (absent otherwise: units planned before it existed keep their hash)
            spec["metadata"] = redact_url(self.metadata)
        if self.split:
            spec["split"] = self.split
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


# Metadata nested deeper than this (containers in containers) is stored as null
# (`deep_metadata`): real metadata is a few levels deep, and every later reader of the
# stored JSON (json.dumps, DuckDB) recurses over it.
JSON_MAX_DEPTH = 64
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class _TooDeep(Exception):
    pass


def utf8_text(text: str) -> tuple[str, bool]:
    """`text` as valid UTF-8 text, and whether it had to change: the lone surrogates that
    stand for undecodable bytes (a tar member name read with surrogateescape, a JSON
    `"\\udc80"` escape) are replaced by U+FFFD."""
    if text.isascii():
        return text, False
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")   # one U+FFFD per undecodable byte
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace"), True


def decode_text(data: bytes, rec: Record) -> str:
    """`data` as text: UTF-8, or with its undecodable bytes replaced (`non_utf8_text`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        rec.drop("non_utf8_text")
        return data.decode("utf-8", "replace")


def _clean(value: Any, drops: list[str], depth: int) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        if value.isascii():         # the common case, checked in C: nothing to replace
            return value
        text, changed = utf8_text(value)
        if changed:
            drops.append("non_utf8_text")
        return text
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        drops.append("nonfinite_number")
        return None
    if isinstance(value, dict):
        if depth <= 0:
            raise _TooDeep
        out = {}
        for k, v in value.items():
            out[_clean(k if isinstance(k, str) else str(k), drops, depth)] = _clean(v, drops, depth - 1)
        return out
    if isinstance(value, (list, tuple)):
        if depth <= 0:
            raise _TooDeep
        return [_clean(v, drops, depth - 1) for v in value]
    return value   # anything else (a date, bytes from a table) is left to the writer's default=str


def clean_json(value: Any, rec: Record, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """`value` (parsed JSON, or a metadata value read from a table) made storable as valid
    JSON, each change counted on `rec`: a non-finite float (`NaN`, `Infinity`, `1e999999`)
    becomes null (`nonfinite_number`, per value), a string or key that is not valid UTF-8 is
    replaced (`non_utf8_text`), and a value nested more than `max_depth` containers deep is
    null as a whole (`deep_metadata`, once). Dict keys that are not strings become strings."""
    drops: list[str] = []
    try:
        out = _clean(value, drops, max_depth)
    except _TooDeep:
        rec.drop("deep_metadata")
        return None
    for reason in drops:
        rec.drop(reason)
    return out


def parse_json(data: bytes | str, rec: Record) -> Any:
    """JSON `data` parsed and cleaned (clean_json); null when it does not parse
    (`invalid_metadata`) or is nested too deep for the parser (`deep_metadata`)."""
    try:
        value = json.loads(data)
    except RecursionError:
        rec.drop("deep_metadata")
        return None
    except ValueError:   # (UnicodeDecodeError, JSONDecodeError, an int of too many digits)
        rec.drop("invalid_metadata")
        return None
    return clean_json(value, rec)


def parse_label(data: bytes) -> int | None:
    """A `.cls` member's integer label; None when it is not an integer in int64 range."""
    try:
        label = int(data.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None
    return label if INT64_MIN <= label <= INT64_MAX else None


def sidecars(rec: Record, ext: str, data: bytes) -> None:
    """Apply the sidecar `ext` (`txt`, `json` or `cls`) of a sample to its record. A bad
    sidecar costs its field, counted on `rec`, never the sample: a caption that is not UTF-8
    is kept with its bad bytes replaced (`non_utf8_text`); JSON that does not parse or is too
    deep leaves the metadata null (`invalid_metadata`, `deep_metadata`), non-finite numbers in
    it are null (`nonfinite_number`); a label that is not an int64 is null (`bad_label`).
    JSON that is not an object is kept as `{"value": ...}`; fields already in `rec.meta`
    (a tar's other text members) stay as they are, and each JSON field they replace is
    counted (`duplicate_member`)."""
    if ext == "txt":
        rec.caption = decode_text(data, rec)
    elif ext == "json":
        meta = parse_json(data, rec)
        if meta is not None:
            meta = meta if isinstance(meta, dict) else {"value": meta}
            if rec.meta:
                for _ in rec.meta.keys() & meta.keys():
                    rec.drop("duplicate_member")
            rec.meta = {**meta, **(rec.meta or {})}
    elif ext == "cls":
        rec.label = parse_label(data)
        if rec.label is None:
            rec.drop("bad_label")


def jsonable(v: Any) -> Any:
    """A table cell in JSON's types: timestamps, dates and times as ISO text, durations as
    seconds, decimals as floats, bytes as text (undecodable bytes replaced); clean_json
    then makes it valid JSON, counting what it nulls."""
    if v is None or isinstance(v, (str, int, float)):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (datetime.date, datetime.time, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v


def plain_column(t: Any) -> bool:
    """An Arrow type whose Python values are already JSON's (no jsonable pass needed)."""
    import pyarrow as pa
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t))
