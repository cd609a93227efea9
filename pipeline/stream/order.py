"""Which sample comes when: the epoch order as a pure function of the seed, the
epoch, the shard sizes, the world size and (after a resume) the progress made.

Everything here works on integer positions only, never on data, so every rank
and every DataLoader worker computes the same plan without talking to the
others, and a resume can replay the plan without reading a shard.

The model:
- An epoch's *global stream* is the shards, in an order shuffled by (seed,
  epoch), concatenated; a sample's global position is its index in it.
- A *plan* is the sequence of global positions still to be delivered in the
  epoch: normally the whole stream; after a resume under a different world size,
  what the old ranks had not consumed yet.
- Rank r of W takes the contiguous slice [L*r//W, L*(r+1)//W) of the plan:
  no sample twice, none missing, sizes differ by at most one, for any W. With even
  batches (the loader's default), a short rank's slice ends with one position from the
  plan's start, marked as padding, so every rank has the same length.
- Within a rank, a bounded buffer shuffle (webdataset-style: fill B slots, then
  each incoming sample evicts a random slot) reorders the slice. The random slot
  of the i-th incoming sample is a hash of (key, i), not a stateful RNG, so the
  stream is the same however it is chunked, and replaying it to any step is
  index arithmetic.
- Per-stream batching (a mixture's option) slices each stream's positions among the
  ranks instead, and regroups the rank's emitted order into batches of one stream each;
  a resume then owes the real positions outside the batches consumed, in plan order.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def key64(*parts: object) -> int:
    """A 64-bit key from any JSON-like parts (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def mix64(key: int, index: np.ndarray) -> np.ndarray:
    """SplitMix64 of (key, index): independent uniform 64-bit values per index."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint64) * _GOLD + np.uint64(key)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def permutation(key: int, n: int) -> np.ndarray:
    """A permutation of range(n) determined by `key` alone (numpy-version-proof)."""
    return np.argsort(mix64(key, np.arange(n, dtype=np.uint64)), kind="stable")


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_shards)
    return permutation(key64("shards", seed, epoch), n_shards)


# -- plans ------------------------------------------------------------------------
# A plan is a tuple of segments; a segment is either a (start, stop) range of
# global positions or an int64 array of them.

Plan = tuple


def plan_length(plan: Plan) -> int:
    return sum((s[1] - s[0]) if isinstance(s, tuple) else len(s) for s in plan)


def plan_slice(plan: Plan, lo: int, hi: int) -> Plan:
    """Virtual positions [lo, hi) of `plan` as a plan."""
    out, offset = [], 0
    for seg in plan:
        n = (seg[1] - seg[0]) if isinstance(seg, tuple) else len(seg)
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            out.append((seg[0] + a, seg[0] + b) if isinstance(seg, tuple) else seg[a:b])
        offset += n
        if offset >= hi:
            break
    return tuple(out)


def plan_positions(plan: Plan, lo: int, hi: int) -> np.ndarray:
    """Global positions at virtual positions [lo, hi) of `plan`."""
    parts = [np.arange(s[0], s[1], dtype=np.int64) if isinstance(s, tuple) else np.asarray(s, np.int64)
             for s in plan_slice(plan, lo, hi)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def plan_lookup(plan: Plan, virtual: np.ndarray) -> np.ndarray:
    """Global positions at the given (any order) virtual positions of `plan`."""
    out = np.empty(len(virtual), np.int64)
    offset = 0
    for seg in plan:
        n = (seg[1] - seg[0]) if isinstance(seg, tuple) else len(seg)
        sel = np.nonzero((virtual >= offset) & (virtual < offset + n))[0]
        rel = virtual[sel] - offset
        out[sel] = seg[0] + rel if isinstance(seg, tuple) else np.asarray(seg, np.int64)[rel]
        offset += n
    return out


def rank_slice(plan: Plan, rank: int, world_size: int) -> Plan:
    n = plan_length(plan)
    return plan_slice(plan, n * rank // world_size, n * (rank + 1) // world_size)


def even_rank_slice(plan: Plan, rank: int, world_size: int) -> tuple[Plan, int]:
    """(rank_slice, padded to the longest rank's length; how many of it are real).

    Rank slices differ by at most one position; a short rank gets one more: a position
    from the start of the plan (the j-th short rank the j-th position, wrapping around),
    as torch's DistributedSampler pads. Every rank then has as many samples, so as many
    batches, and a step that synchronises the ranks (an all_reduce) never waits on a rank
    that has finished. The padding comes last in the rank's slice, so positions below the
    real count are exactly rank_slice's."""
    span = rank_slice(plan, rank, world_size)
    n, total = plan_length(span), plan_length(plan)
    longest = -(-total // world_size)
    if n == longest:
        return span, n
    short = [r for r in range(world_size)
             if total * (r + 1) // world_size - total * r // world_size < longest]
    j = short.index(rank) % total
    return (*span, plan_positions(plan, j, j + 1)), n


def stream_rank_slice(positions: np.ndarray, streams: np.ndarray, rank: int, world_size: int,
                      even: bool) -> tuple[np.ndarray, int]:
    """A rank's share of a plan for per-stream batching: (its positions, in plan order, then
    its padding; how many are real). `positions` are the plan's, `streams` the stream of each.

    Each stream's positions are sliced among the ranks as `rank_slice` slices a plan, so every
    rank holds each stream's share to within one sample; with `even`, a rank one short in a
    stream gets one of that stream's positions from its start (the j-th short rank its j-th),
    so every rank holds as many samples of each stream, and so as many one-stream batches."""
    mine, pads = [], []
    for idx in _members(streams):
        n = len(idx)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        mine.append(idx[lo:hi])
        longest = -(-n // world_size)
        if even and hi - lo < longest:
            short = [r for r in range(world_size) if n * (r + 1) // world_size - n * r // world_size < longest]
            j = short.index(rank) % n
            pads.append(idx[j:j + 1])
    real = np.sort(np.concatenate(mine)) if mine else np.empty(0, np.int64)
    return np.asarray(positions, np.int64)[np.concatenate([real, *pads]).astype(np.int64)], len(real)


def _members(groups: np.ndarray) -> list[np.ndarray]:
    """The indices of each group's members, ascending, groups in ascending order: one stable
    sort, not a scan per group (a variable-grid mixture has streams x grids groups)."""
    order = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    return np.split(order, cuts) if len(order) else []


def stream_batches(streams: np.ndarray, batch_size: int,
                   quota: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An emission order (`streams`: the stream of each emitted sample) regrouped into batches
    of one stream each: (indices into the emission order, batch by batch; batch bounds).

    Each stream's samples keep their emitted order and fill its batches in turn; a full batch
    comes when its last sample is emitted (batches of different streams interleave as the
    streams do), and each stream's partial last batch comes at the end, in stream order. With
    `quota` (drop_last) stream s gives its first quota[s] full batches and no partial one."""
    full, partial = [], []
    for s, idx in zip(np.unique(streams).tolist(), _members(streams)):
        k = len(idx) // batch_size if quota is None else min(len(idx) // batch_size, quota.get(s, 0))
        full.append(idx[: k * batch_size].reshape(k, batch_size))
        if quota is None and len(idx) > k * batch_size:
            partial.append(idx[k * batch_size:])
    grid = np.concatenate(full) if full else np.empty((0, batch_size), np.int64)
    grid = grid[np.argsort(grid[:, -1], kind="stable")]
    sizes = [batch_size] * len(grid) + [len(p) for p in partial]
    flat = np.concatenate([grid.ravel(), *partial]).astype(np.int64)
    return flat, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# -- the in-rank buffer shuffle ---------------------------------------------------

class BufferShuffle:
    """Index-level streaming shuffle over virtual positions 0..length-1."""

    def __init__(self, length: int, buffer_size: int, key: int):
        self.length, self.size, self.key = length, max(int(buffer_size), 0), key
        self.slots = np.empty(self.size, np.int64)    # the buffer: slots[:filled] hold positions
        self.filled = 0
        self.fed = 0

    @property
    def buf(self) -> np.ndarray:
        return self.slots[:self.filled]

    def feed(self, n: int) -> np.ndarray:
        """Let the next `n` positions enter; returns the positions that leave meanwhile.

        Position p (once the buffer is full) takes the slot `mix64(key, p) % size` and
        evicts what is there, which is the last position before p that took that slot, or
        what the slot held when this feed began: grouped by slot (a stable sort), each
        position's output is its predecessor's position in the group, so the whole feed is
        a few array operations instead of a step per position."""
        start, stop = self.fed, self.fed + n
        self.fed = stop
        if self.size == 0:
            return np.arange(start, stop, dtype=np.int64)
        i = start
        fill = min(stop, start + max(self.size - self.filled, 0))
        if i < fill:
            self.slots[self.filled:self.filled + fill - i] = np.arange(i, fill)
            self.filled += fill - i
            i = fill
        if i >= stop:
            return np.empty(0, np.int64)
        picks = (mix64(self.key, np.arange(i, stop, dtype=np.uint64)) % np.uint64(self.size)).astype(np.int64)
        order = np.argsort(picks, kind="stable")     # by slot, in arrival order within a slot
        slot = picks[order]
        arrived = i + order
        first = np.ones(len(slot), bool)
        first[1:] = slot[1:] != slot[:-1]
        left = np.empty(len(slot), np.int64)
        left[first] = self.slots[slot[first]]
        left[1:][~first[1:]] = arrived[:-1][~first[1:]]
        last = np.ones(len(slot), bool)
        last[:-1] = first[1:]
        self.slots[slot[last]] = arrived[last]
        out = np.empty(len(slot), np.int64)
        out[order] = left
        return out

    def drain(self) -> np.ndarray:
        """The buffer's remaining positions, in a keyed random order."""
        if self.size == 0:
            return np.empty(0, np.int64)
        return self.buf[permutation(self.key ^ 0x7A11, self.filled)]

    def fast_forward(self, outputs: int) -> int:
        """Feed, without data, until `outputs` positions have left or every
        position was fed; returns how many left."""
        emitted = 0
        while self.fed < self.length and emitted < outputs:
            free = self.size - self.filled
            step = free if free > 0 else outputs - emitted
            emitted += len(self.feed(min(step, self.length - self.fed)))
        return emitted


def emission_order(length: int, buffer_size: int, key: int) -> np.ndarray:
    """The virtual positions 0..length-1 in the order a rank's buffer shuffle emits them
    (every position fed, then the drain): output index -> virtual position. The same
    whether fed at once or in chunks, so any worker can compute it without data."""
    s = BufferShuffle(length, buffer_size, key)
    return np.concatenate([s.feed(length), s.drain()])


def consumed_positions(length: int, buffer_size: int, key: int, outputs: int) -> tuple[np.ndarray, int]:
    """After `outputs` samples left a rank's shuffle over `length` positions:
    (the still-buffered virtual positions, sorted; the first never-fed position).
    The rank's unconsumed positions are those plus [fed, length)."""
    s = BufferShuffle(length, buffer_size, key)
    emitted = s.fast_forward(outputs)
    leftover = np.sort(s.buf)
    if emitted < outputs:
        # The rank got into its final drain: part of the buffer left too.
        gone = s.drain()[:outputs - emitted]
        leftover = np.setdiff1d(leftover, gone)
    return leftover, s.fed
