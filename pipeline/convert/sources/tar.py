"""WebDataset tars (`.tar`, and `.tar.gz`/`.tgz`, read as a stream, as webdataset does).

Names follow webdataset's rule: a member's key is its name up to the first dot of its
basename, its extension the rest, lower-cased (`a/KEY.input.jpg`: key `a/KEY`, extension
`input.jpg`); a sample is a run of adjacent members sharing a key. Within a sample:

- the image (or video) is, with `image_column` (`--image-column input.jpg`), the member whose
  extension is exactly that; without it, the first member, in member order, whose extension's
  last part is a media extension (`jpg`, `input.jpg`, `mp4`). Every other media member of the
  sample (the `target.jpg` of a pair dataset) is ignored and counted: `extra_media`;
- `txt` is the caption, `json` the metadata, `cls` the label (records.sidecars); with
  `caption_column`/`label_column` (`--caption-column caption.txt`), the member of that
  extension is the caption or the label instead, and a `txt`/`cls` member is carried as text;
- any other member that is small UTF-8 text (at most 64 KiB, no NUL) is carried into the
  metadata under its extension (`caption2.txt` as a string, `meta.json` parsed); other
  members (binary: `npy`, `pyd`, audio...) are ignored and counted: `unknown_member`. A text
  member replaces a field of the same name in the `.json` metadata (`KEY.url` and a JSON
  `url`), which is counted: `duplicate_member`;
- a second member with an extension already seen in the sample is ignored (the first is
  kept): `duplicate_member`; symbolic and hard links: `link_member`; directories are
  structure and ignored; other special members (devices, FIFOs): `unknown_member`;
- a name that is not UTF-8 gets its undecodable bytes replaced (U+FFFD): `non_utf8_text`.

A sample without an image is a `no_image` skip, also one made only of ignored members (its
drops are counted too); a key seen before in the tar is `duplicate_key`; a name that tries to
escape is `unsafe_key`.

Nothing is lost silently: a tar that cannot be read to its end (a cut member, a corrupt
header, a broken gzip stream) or that holds data after the point where reading stopped
(tarfile stops at a bad header or at an end-of-archive block without an error) costs exactly
one `unreadable_source` skip, whose detail says how many bytes after which offset were not
read. The samples read before the damage are kept; if the damage hits a member's data, the
sample it belongs to is the one skipped.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, Self, cast

import fsspec

from tokshard.pipeline.convert.sources.records import (
    MEDIA_EXTS,
    SIDECAR_EXTS,
    VIDEO_EXTS,
    Record,
    WorkUnit,
    parse_json,
    safe_key,
    sidecars,
    utf8_text,
)
from tokshard.pipeline.storage import redact_text, redact_url

TEXT_MEMBER_MAX = 64 * 1024   # an unknown member up to this size that is UTF-8 text goes into meta
_CHUNK = 1 << 20
# What a damaged tar raises while it is read as a stream (gzip and xz errors included).
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# The header errors that end an archive as it should: an end-of-archive block, or no more data.
_CLEAN_END: tuple[type[Exception], ...] = tuple(getattr(tarfile, n) for n in ("EOFHeaderError", "EmptyHeaderError"))


class _Probe(tarfile.TarInfo):
    """Records why tarfile stopped reading headers: in stream mode it ends the archive
    silently at a corrupt header past the first one, as at a real end-of-archive block."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            if isinstance(tarfile_, _Tar):
                tarfile_.stop = e
            raise


class _Tar(tarfile.TarFile):
    tarinfo = _Probe
    stop: Exception | None = None   # the header error that ended the member list, if any


def _raw_size(unit: WorkUnit, storage_options: dict | None) -> int | None:
    try:
        fs, path = fsspec.core.url_to_fs(unit.url, **(storage_options or {}))
        size = fs.size(path)
        return int(size) if size is not None else None
    except Exception:
        return None


def _not_read(offset: int, total: int | None, compressed: bool) -> str:
    where = "of the decompressed stream " if compressed else ""
    if total is not None and total > offset:
        return f"{total - offset} bytes {where}after offset {offset} not read"
    if total is not None:
        return f"nothing {where}after offset {offset} (it has {total} bytes)"
    return f"the rest {where}after offset {offset} not read"


def _trailing(tar: _Tar, unit: WorkUnit, storage_options: dict | None) -> str | None:
    """After the member list ended: None when only the end-of-archive zeros follow, else
    what was not read (a corrupt header, data after an early end-of-archive block)."""
    stream: Any = tar.fileobj
    offset = tar.offset                 # where the header that ended the list starts
    stop = tar.stop
    compressed = getattr(stream, "comptype", "tar") != "tar"
    reason = None
    if stop is not None and not isinstance(stop, _CLEAN_END):
        reason = f"bad header at offset {offset} ({stop})"
    pos = stream.tell()
    while reason is None:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return None
        pos += len(chunk)
        if chunk.count(0) != len(chunk):
            reason = f"data after the end-of-archive block at offset {offset}"
    if compressed:                      # count the rest of the stream itself
        try:
            while chunk := stream.read(_CHUNK):
                pos += len(chunk)
            total: int | None = pos
        except _READ_ERRORS:
            total = None
    else:
        total = _raw_size(unit, storage_options)
    return f"{reason}: {_not_read(offset, total, compressed)}"


def read_tar(unit: WorkUnit, storage_options: dict | None, image_column: str | None = None,
             caption_column: str | None = None, label_column: str | None = None,
             **_: Any) -> Iterator[Record]:
    source = redact_url(unit.url)
    image_ext = image_column.lower() if image_column else None
    roles = sidecar_roles(caption_column, label_column)
    seen: set[str] = set()
    current: Record | None = None
    exts: set[str] = set()              # the extensions of the current sample's members
    done = 0                            # stream offset up to which every member was read
    in_data = False                     # reading a member's data (vs. a header)
    compressed = False
    opened = False                      # the file is open (what fails before is no tar damage)

    def finish(rec: Record) -> Record:
        if rec.skip is None and rec.image is None:
            rec.skip, rec.detail = "no_image", (f"sample has no {image_ext!r} member" if image_ext
                                                else "sample has no image member")
        if rec.skip is None and rec.key in seen:
            rec.skip, rec.detail, rec.image = "duplicate_key", rec.key, None
        seen.add(rec.key)
        return rec

    def lost(detail: str) -> Record:
        return Record(f"{source}#unreadable", None, source, skip="unreadable_source",
                      detail=redact_text(f"{source}: {detail}"))

    try:
        with fsspec.open(unit.url, "rb", **(storage_options or {})) as f, \
                _Tar.open(fileobj=f, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
            opened, compressed = True, getattr(tar.fileobj, "comptype", "tar") != "tar"
            while (member := tar.next()) is not None:
                cast(Any, tar).members.clear()   # a stream keeps no member list (memory stays flat)
                if member.isdir():
                    done = tar.offset
                    continue
                name, bad_name = utf8_text(member.name)
                _base, _dot, ext = name.rpartition("/")[2].partition(".")
                raw_key = name[: len(name) - len(ext) - 1] if ext else name
                key = safe_key(raw_key)
                if key is None:
                    yield Record(raw_key, None, source, skip="unsafe_key", detail=name)
                    done = tar.offset
                    continue
                ext = ext.lower()
                if current is None or current.key != key:
                    if current is not None:
                        yield finish(current)
                    current, exts = Record(key, None, source), set()
                if bad_name:
                    current.drop("non_utf8_text")
                if member.issym() or member.islnk():
                    current.drop("link_member")
                elif not member.isfile() or not ext:
                    current.drop("unknown_member")
                elif ext in exts:
                    current.drop("duplicate_member")
                else:
                    exts.add(ext)
                    in_data = True
                    fobj = tar.extractfile(member)
                    assert fobj is not None  # a regular file member (isfile above) always has one
                    _member(current, ext, member.size, fobj, image_ext, roles)
                    in_data = False
                done = tar.offset
            trailing = _trailing(tar, unit, storage_options)
    except _READ_ERRORS as e:
        if opened or not isinstance(e, FileNotFoundError):
            total = None if compressed else _raw_size(unit, storage_options)
            detail = redact_text(f"{source}: {e}: {_not_read(done, total, compressed)}")
        else:
            detail = redact_text(f"{source}: {e}")
        if current is not None and in_data:
            # The damage is in this sample's own data: it is the one skip.
            current.skip, current.detail, current.image = "unreadable_source", detail, None
            yield finish(current)
        else:
            if current is not None:
                yield finish(current)
            yield Record(f"{source}#unreadable", None, source, skip="unreadable_source", detail=detail)
        return
    if current is not None:
        yield finish(current)
    if trailing is not None:
        yield lost(trailing)


def sidecar_roles(caption_column: str | None = None, label_column: str | None = None) -> dict[str, str]:
    """{member extension: the sidecar it is read as (`txt`, `json`, `cls`)}: webdataset's
    `txt`/`json`/`cls`, with `--caption-column EXT`/`--label-column EXT` naming another member
    as the caption or the label (`caption.txt`, `label.cls`); the member they displace is
    then carried as text like any other."""
    roles = {ext: ext for ext in SIDECAR_EXTS}
    for column, role in ((caption_column, "txt"), (label_column, "cls")):
        if column:
            roles = {ext: r for ext, r in roles.items() if r != role}
            roles[column.lower()] = role
    return roles


def _member(rec: Record, ext: str, size: int, fobj: Any, image_ext: str | None,
            roles: dict[str, str]) -> None:
    """Apply one regular member (extension `ext`, not seen before in the sample) to `rec`."""
    last = ext.rsplit(".", 1)[-1]
    is_image = ext == image_ext if image_ext else last in MEDIA_EXTS
    if is_image and rec.image is None:
        rec.image = fobj.read()
        rec.source_bytes = len(rec.image)
        rec.media = "video" if last in VIDEO_EXTS else "image"
    elif is_image or (last in MEDIA_EXTS and ext not in roles):
        rec.drop("extra_media")
    elif ext in roles:
        sidecars(rec, roles[ext], fobj.read())
    elif size <= TEXT_MEMBER_MAX:
        data = fobj.read()
        if b"\0" in data:
            rec.drop("unknown_member")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            rec.drop("unknown_member")
            return
        value = parse_json(data, rec) if last == "json" else text
        if rec.meta and ext in rec.meta:    # the `.json` sidecar's field of that name is replaced
            rec.drop("duplicate_member")
        rec.meta = {**(rec.meta or {}), ext: value}
    else:
        rec.drop("unknown_member")
