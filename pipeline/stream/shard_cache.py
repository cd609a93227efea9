"""A local, size-bounded cache of remote shards, shared by every process on a node.

Files are named by their sha256, so two datasets that share a shard share the
copy, and a file in the cache is either whole (it was renamed into place after
a complete write) or absent. When the cache grows past its bound, the least
recently used files go first. Another process may evict a file between our
listing and our read; callers treat that as a miss and fetch again.

Faults of the cache itself (a full disk or quota, a read-only, unreadable or
vanished cache directory: ENOSPC, EDQUOT, EFBIG, EROFS, EACCES, EIO, ...) are a
typed `CacheError` carrying the `errno`: `get`, `put` and `discard` raise it, and
`put` first removes the temporary file it created, so a failed write leaves
nothing behind (temporaries of writers that were killed are removed by eviction
once they are `STALE_TMP_S` old).

A dataset read never fails, and never loses a shard, because of the cache. The
cache only holds copies of shards that the dataset's store has, and a shard
reaches `put` after it was read whole and checked against its sha256. So
`TokenDataset` goes through `lookup` and `store`, which take a `CacheError` as a
miss (the shard is read from the store) or as a cache left unfilled (the shard
in hand is served), count it in `failures`, keep the latest in `last_failure`
and warn once per cache and process (RuntimeWarning). Training goes on with
every sample, whatever `on_error` is: a full cache disk is not a bad shard, and
skipping shards for it would drop data that was read correctly. A shard the
store itself cannot give is a `ShardError`, which `on_error="skip"` steps over.
"""

from __future__ import annotations

import errno as errno_codes
import os
import time
import uuid
import warnings

from tokshard.errors import CacheError
from tokshard.pipeline import storage
from tokshard.pipeline.storage import TMP_MARK

# A temporary file untouched this long belongs to a process killed mid-write
# (a live writer finishes one shard in seconds); eviction removes it.
STALE_TMP_S = 3600.0


class ShardCache:
    def __init__(self, directory: str, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError("cache limit must be positive")
        self.directory, self.limit = directory, int(limit_bytes)
        self.failures = 0                              # CacheErrors taken by lookup/store (this process)
        self.last_failure: CacheError | None = None
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            # A cache that cannot be made cannot be filled: reads go to the store (put tries again).
            self.note_failure(self._error("cannot create the directory", directory, e))

    def path(self, sha256: str, ext: str) -> str:
        return os.path.join(self.directory, f"{sha256}.{ext}")

    def get(self, sha256: str, ext: str) -> bytes | None:
        """The cached copy, or None if there is none; CacheError if it cannot be read."""
        path = self.path(sha256, ext)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):  # no copy, or not even a cache directory (noted at init)
            return None
        except OSError as e:
            raise self._error("cannot read", path, e) from e
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass  # evicted since, or a read-only cache: the copy read is whole all the same
        return data

    def discard(self, sha256: str, ext: str) -> None:
        self._unlink(self.path(sha256, ext), "cannot remove")

    def _unlink(self, path: str, what: str) -> None:
        """Remove a copy; one already gone (another process evicted it) is no error."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error(what, path, e) from e

    def put(self, sha256: str, ext: str, data: bytes) -> None:
        """Store `data` as the copy of `sha256` (whole or not at all), then evict down to the bound.

        CacheError if the cache cannot be written; the temporary file is removed first."""
        path = self.path(sha256, ext)
        tmp = os.path.join(self.directory, f"{TMP_MARK}{uuid.uuid4().hex}")
        created = False
        try:
            os.makedirs(self.directory, exist_ok=True)   # removed under us (rm -rf of the cache)
            with open(tmp, "xb") as f:
                created = True
                f.write(data)
            os.replace(tmp, path)
            created = False
        except BaseException as e:
            if created:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # left for eviction, which removes it once it is stale
            if isinstance(e, OSError):
                raise self._error("cannot write", path, e) from e
            raise
        self._evict(keep=path)

    def lookup(self, sha256: str, ext: str) -> bytes | None:
        """A copy whose sha256 checks, or None: a miss, a damaged copy (discarded) or a cache fault (noted)."""
        try:
            data = self.get(sha256, ext)
            if data is None or storage.sha256(data) == sha256:
                return data
            self.discard(sha256, ext)
        except CacheError as e:
            self.note_failure(e)
        return None

    def store(self, sha256: str, ext: str, data: bytes) -> bool:
        """`put`, with a cache fault noted instead of raised (then False: the copy, or the eviction, failed)."""
        try:
            self.put(sha256, ext, data)
            return True
        except CacheError as e:
            self.note_failure(e)
            return False

    def note_failure(self, error: CacheError) -> None:
        """Count a cache fault that the reader went on past; warn the first time."""
        # Keep no traceback: its frames hold the shard's bytes.
        for e in (error, error.__cause__, error.__context__):
            if e is not None:
                e.with_traceback(None)
        self.failures += 1
        self.last_failure = error
        if self.failures == 1:
            warnings.warn(f"{error}; shards are read from their store without being cached (each further cache "
                          "fault is counted in ShardCache.failures, not warned)", RuntimeWarning, stacklevel=3)

    def size(self) -> int:
        return sum(size for _, _, size in self._entries())

    def _error(self, what: str, path: str, e: OSError) -> CacheError:
        code = errno_codes.errorcode.get(e.errno, "") if e.errno is not None else ""
        reason = f"{code}: {e.strerror}" if code and e.strerror else str(e)
        where = os.path.basename(path) if path != self.directory else ""
        return CacheError(f"shard cache {self.directory}: {what} {where}".rstrip() + f" ({reason})",
                          directory=self.directory, errno=e.errno)

    def _entries(self) -> list[tuple[float, str, int]]:
        out = []
        now = time.time()
        try:
            with os.scandir(self.directory) as listing:
                for entry in listing:
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if entry.name.startswith(TMP_MARK):  # another process is writing it, or was killed
                        if now - st.st_mtime > STALE_TMP_S:
                            try:
                                os.unlink(entry.path)
                            except OSError:
                                pass
                        continue
                    out.append((st.st_mtime, entry.path, st.st_size))
        except OSError as e:
            raise self._error("cannot list", self.directory, e) from e
        return out

    def _evict(self, keep: str) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        for _, path, size in entries:
            if total <= self.limit:
                break
            if path == keep:
                continue
            self._unlink(path, "cannot evict")
            total -= size
