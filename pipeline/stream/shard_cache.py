"""A local, size-bounded cache of remote shards, shared by every process on a node.

Files are named by their sha256, so two datasets that share a shard share the
copy, and a file in the cache is either whole (it was renamed into place after
a complete write) or absent. When the cache grows past its bound, the least
recently used files go first. Another process may evict a file between our
listing and our read; callers treat that as a miss and fetch again.
"""

from __future__ import annotations

import os
import time
import uuid

from tokshard.pipeline.storage import TMP_MARK

# A temporary file untouched this long belongs to a process killed mid-write
# (a live writer finishes one shard in seconds); eviction removes it.
STALE_TMP_S = 3600.0


class ShardCache:
    def __init__(self, directory: str, limit_bytes: int):
        if limit_bytes <= 0:
            raise ValueError("cache limit must be positive")
        self.directory, self.limit = directory, int(limit_bytes)
        os.makedirs(directory, exist_ok=True)

    def path(self, sha256: str, ext: str) -> str:
        return os.path.join(self.directory, f"{sha256}.{ext}")

    def get(self, sha256: str, ext: str) -> bytes | None:
        path = self.path(sha256, ext)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # recency for LRU eviction
            return data
        except FileNotFoundError:
            return None

    def discard(self, sha256: str, ext: str) -> None:
        try:
            os.unlink(self.path(sha256, ext))
        except FileNotFoundError:
            pass

    def put(self, sha256: str, ext: str, data: bytes) -> None:
        path = self.path(sha256, ext)
        tmp = os.path.join(self.directory, f"{TMP_MARK}{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self._evict(keep=path)

    def size(self) -> int:
        return sum(size for _, _, size in self._entries())

    def _entries(self):
        out = []
        now = time.time()
        for entry in os.scandir(self.directory):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith(TMP_MARK):  # another process is writing it, or was killed
                if now - st.st_mtime > STALE_TMP_S:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
                continue
            out.append((st.st_mtime, entry.path, st.st_size))
        return out

    def _evict(self, keep: str) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        for _, path, size in entries:
            if total <= self.limit:
                break
            if path == keep:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size
