"""Reading a dataset's files against what its manifest records (schema 1.3).

The manifest is the one thing a reader trusts; every other file it names (a
shard's sample index, the label table, the codec state, the tokenizer copy)
carries its size and sha256 there, and is read through here: the size is
checked before the read (so a file never drives an allocation the manifest did
not announce), the sha256 after it. A mismatch is a `ManifestError` naming the
field; a dataset written before 1.3 has no digests, and its files are read as
they are, under the caller's cap.
"""

from __future__ import annotations

import hashlib
import os

from fsspec.implementations.local import LocalFileSystem

from tokshard.errors import ManifestError
from tokshard.pipeline.format.layout import DatasetLayout
from tokshard.schemas.records import FileDigest


def read_checked(layout: DatasetLayout, rel: str, field: str, digest: FileDigest | None, *, limit: int) -> bytes:
    """The bytes of the dataset file `rel`, checked against `digest` (if recorded) and
    never more than `limit` bytes. FileNotFoundError passes through (callers word it)."""
    path = layout.resolve(rel, field)
    size = layout.fs.size(path)
    if digest is not None and size != digest.size:
        raise ManifestError(f"{field}: {rel} has {size} bytes, the manifest says {digest.size}")
    if size > limit:
        raise ManifestError(f"{field}: {rel} has {size} bytes, more than the {limit} a reader accepts")
    data = layout.fs.cat_file(path)
    if len(data) != size:           # changed between the two calls
        raise ManifestError(f"{field}: {rel} changed while it was read")
    check_bytes(data, rel, field, digest)
    return data


def check_bytes(data: bytes, rel: str, field: str, digest: FileDigest | None) -> None:
    """`data` (the bytes of `rel`) against `digest`; nothing to check when None."""
    if digest is None:
        return
    if len(data) != digest.size:
        raise ManifestError(f"{field}: {rel} has {len(data)} bytes, the manifest says {digest.size}")
    got = hashlib.sha256(data).hexdigest()
    if got != digest.sha256:
        raise ManifestError(f"{field}: {rel} has sha256 {got[:16]}..., the manifest says {digest.sha256[:16]}...")


def file_digest(layout: DatasetLayout, path: str) -> FileDigest:
    """Size and sha256 of a file, streamed (shards and tokenizer weights can be large)."""
    h = hashlib.sha256()
    size = 0
    with layout.fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return FileDigest(size, h.hexdigest())


def file_problem(layout: DatasetLayout, path: str, digest: FileDigest | None) -> str | None:
    """What differs between the file at `path` and `digest` ("missing", its size, or its
    sha256, streamed and only when the size matches); None when it matches, or when nothing
    is recorded and the file exists. For files checked in place, without keeping their bytes."""
    try:
        size = layout.fs.size(path)
    except FileNotFoundError:
        return "missing"
    if digest is None:
        return None
    if size != digest.size:
        return f"{size} bytes, the manifest says {digest.size}"
    got = file_digest(layout, path).sha256
    if got != digest.sha256:
        return f"sha256 {got[:16]}..., the manifest says {str(digest.sha256)[:16]}..."
    return None


def tree_files(layout: DatasetLayout, rel_dir: str) -> list[str]:
    """The files under the dataset folder `rel_dir`, as dataset-relative paths, sorted."""
    root = layout.resolve_tree(rel_dir, "record.tokenizer.path")
    if isinstance(layout.fs, LocalFileSystem):
        found = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                 for d, _, files in os.walk(root) for f in files]
    else:
        found = [p[len(root.rstrip("/")) + 1:] for p in layout.fs.find(root)]
    return sorted(f"{rel_dir}/{f}" for f in found)


def check_tree(layout: DatasetLayout, rel_dir: str, files: dict[str, FileDigest]) -> list[str]:
    """Problems of the folder `rel_dir` (the tokenizer copy) against the digests the record
    holds for paths under it: a file changed, missing or not recorded (an extra file can
    change what a loader does). Empty when it matches, or when nothing is recorded."""
    layout.resolve_tree(rel_dir, "record.tokenizer.path")    # first: a path that leaves the root is refused
    prefix = rel_dir.rstrip("/") + "/"
    want = {rel: d for rel, d in files.items() if rel.startswith(prefix)}
    if not want:
        return []
    problems = []
    have = tree_files(layout, rel_dir)
    for rel in have:
        if rel not in want:
            problems.append(f"{rel} is not one of the files the manifest records")
    for rel, digest in sorted(want.items()):
        if rel not in have:
            problems.append(f"{rel} is missing")
            continue
        what = file_problem(layout, layout.resolve(rel, "record.files"), digest)
        if what:
            problems.append(f"{rel}: {what}")
    return problems
