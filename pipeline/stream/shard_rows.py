"""The shards a loader has in memory, and gathering a batch's rows out of them.

A batch drawn through the shuffle buffer takes a few rows from each of dozens of shards.
Gathering it column by column costs one fancy index per (shard, column), ~7 per shard,
which made the gather a third of the loader's time. A loaded shard is therefore packed
once into two row-major matrices, its fixed-size columns as raw bytes per row and its
object columns (keys, captions, coded tokens) side by side, so a batch costs two fancy
indexes per shard and one reorder at the end (`gather`).

`ShardRows` keeps the loaded shards until the loader releases them and reads the next
ones in a background thread; the dataset's epoch stream and a mixture's subclass it. Told
which rows it will deliver (`select`), it converts only those of each shard: a DataLoader
worker delivers every num_workers-th batch, and a batch draws a few rows from each of many
shards, so each worker reads most shards but pays the per-row work for its own rows only.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

_LAYOUTS: dict[tuple[np.dtype, tuple[str, ...]], tuple[np.dtype, tuple[str, ...]]] = {}


class PackedRows:
    """One shard's columns as n opaque records of the fixed-size columns' bytes and (n, k)
    objects for the others; `layout` says which, so shards of one layout gather together.
    (Records as numpy void items: a fancy index copies each with one memcpy, 5x faster
    than the rows of an (n, row bytes) uint8 matrix.)"""

    __slots__ = ("dtype", "fixed", "names", "objects", "layout", "rows")

    def __init__(self, cols: dict[str, np.ndarray], rows: np.ndarray | None = None):
        self.rows = rows     # the shard's rows these are (sorted), or None: all of them
        fixed = [(c, v) for c, v in cols.items() if v.dtype != object]
        objects = [(c, v) for c, v in cols.items() if v.dtype == object]
        n = len(next(iter(cols.values())))
        self.dtype = np.dtype([(c, v.dtype, v.shape[1:]) for c, v in fixed])
        rec = np.empty(n, self.dtype)
        for c, v in fixed:
            rec[c] = v
        self.fixed = rec.view(np.dtype((np.void, self.dtype.itemsize)))
        self.names = tuple(c for c, _ in objects)
        self.objects = np.empty((n, len(objects)), object)
        for j, (_, v) in enumerate(objects):
            self.objects[:, j] = v
        # One object per distinct layout, so `gather` compares layouts by identity.
        self.layout = _LAYOUTS.setdefault((self.dtype, self.names), (self.dtype, self.names))

    def columns(self, fixed: np.ndarray, objects: np.ndarray) -> dict[str, np.ndarray]:
        """Gathered rows of this layout back into contiguous columns."""
        rec = fixed.view(self.dtype)
        # copy(), not ascontiguousarray(): numpy calls a one-row field view contiguous and
        # keeps its record stride, which torch.from_numpy refuses.
        out = {c: rec[c].copy() for c in self.dtype.names or ()}
        out.update({c: objects[:, j].copy() for j, c in enumerate(self.names)})
        return out


def gather(parts: Sequence[tuple[PackedRows, np.ndarray]], order: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `parts[i][1]` of each packed shard, concatenated: the rows of positions
    `order` (a permutation), put back in position order."""
    first = parts[0][0]
    layout = first.layout
    if any(p.layout is not layout for p, _ in parts):
        # Shards of one stream share a layout; stand-in rows of an unreadable shard, or
        # mixture streams with other stored columns, may not: column by column then.
        cols = [p.columns(p.fixed[r], p.objects[r]) for p, r in parts]
        cat = {c: np.concatenate([part[c] for part in cols]) for c in cols[0]}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {c: v[inverse] for c, v in cat.items()}
    fixed = np.concatenate([p.fixed[r] for p, r in parts])
    objects = np.concatenate([p.objects[r] for p, r in parts])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return first.columns(fixed[inverse], objects[inverse])


class ShardRows:
    """Loaded shards by key, read ahead in a background thread, kept until released.

    Subclasses say which shard holds each position (`locate`) and how a shard is read
    (`load`, which returns its columns)."""

    def __init__(self, prefetch: int):
        self.loaded: dict[Hashable, PackedRows] = {}
        self.needed: dict[Hashable, np.ndarray] = {}   # shard key -> the rows to deliver (`select`)
        self.skipped_shards: list[str] = []
        self._pool = ThreadPoolExecutor(1) if prefetch > 0 else None
        self._futures: dict[Hashable, Future[PackedRows]] = {}

    def load(self, key: Any, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The columns of shard `key`; of its `rows` (sorted) only, when given."""
        raise NotImplementedError

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(an integer shard key per position, the position's row in that shard)."""
        raise NotImplementedError

    def key(self, shard: int) -> Hashable:
        """The `loaded` key of an integer shard key (what `locate` gives)."""
        return shard

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def select(self, shards: np.ndarray, rows: np.ndarray) -> None:
        """The (shard, row) pairs that will be asked for (as `locate` gives them): each shard
        is then loaded with those of its rows only."""
        order = np.lexsort((rows, shards))
        s, r = shards[order], rows[order]
        new = np.ones(len(s), bool)
        new[1:] = (s[1:] != s[:-1]) | (r[1:] != r[:-1])
        s, r = s[new], r[new]
        cuts = (np.flatnonzero(s[1:] != s[:-1]) + 1).tolist()
        self.needed = {self.key(int(s[a])): r[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])}

    def _packed(self, shard: int) -> PackedRows:
        rows = self.needed.get(self.key(shard))
        return PackedRows(self.load(shard, rows), rows)

    def shard(self, shard: int) -> PackedRows:
        key = self.key(shard)
        hit = self.loaded.get(key)
        if hit is None:
            fut = self._futures.pop(key, None)
            hit = self.loaded[key] = fut.result() if fut is not None else self._packed(shard)
        return hit

    def prefetch_shards(self, shards: Iterable[int]) -> None:
        """Start reading these shards in the background (the next ones needed)."""
        if self._pool is None:
            return
        for shard in shards:
            key = self.key(int(shard))
            if key not in self.loaded and key not in self._futures:
                self._futures[key] = self._pool.submit(self._packed, int(shard))

    def release(self, shards: Iterable[int]) -> None:
        for shard in shards:
            self.loaded.pop(self.key(int(shard)), None)

    def rows(self, shards: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Columns for (at least one) positions, in their order, given as `locate` gives them."""
        order = np.argsort(shards, kind="stable")
        shards, rows = shards[order], rows[order]
        cuts = (np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist()
        starts, ends = [0, *cuts], [*cuts, len(shards)]
        parts = []
        for a, b in zip(starts, ends):
            packed = self.shard(int(shards[a]))
            parts.append((packed, rows[a:b] if packed.rows is None else np.searchsorted(packed.rows, rows[a:b])))
        return gather(parts, order)
