"""Atomic, fsspec-backed file writes: a reader never sees a partial file."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def atomic_write(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` so that it appears whole or not at all."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{os.path.dirname(path)}/{TMP_MARK}{uuid.uuid4().hex}-{os.path.basename(path)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # Object stores publish an object only when its upload completes.
        fs.pipe_file(path, data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clean_temporaries(fs: Any, root: str) -> int:
    """Remove temp files a killed run left behind; returns how many."""
    if not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if os.path.basename(p).startswith(TMP_MARK)]
    for p in stale:
        fs.rm_file(p)
    return len(stale)
