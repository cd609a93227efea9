"""Stream a token dataset into training: rank/worker partitioning, deterministic
shuffle, exact mid-epoch resume (also under a changed world size), batched
augmentation in the workers.

Guarantees (see `tokshard.pipeline.stream.order` for the plan itself):
- Per epoch every sample reaches exactly one rank exactly once (`drop_last=False`),
  for any world size and any number of DataLoader workers.
- Every rank yields the same number of batches per epoch, so a training step that
  synchronises the ranks (DDP's all_reduce) never waits on a rank that has finished:
  with `even_batches=True` (the default) a rank whose share is one sample short gets one
  sample from the start of the epoch's plan again, as torch's DistributedSampler pads,
  marked `pad=True` in its batch (leave padded samples out of evaluation counts); with
  `drop_last=True` every rank gets the same number of full batches instead.
- A rank's batches do not depend on `num_workers`: counting from the batch the
  iteration starts at, batches travel in blocks of k (`TokenLoader.block`), the j-th
  block is built by worker j % num_workers, and DataLoader takes items from its
  workers round-robin, so the rank sees its batches in order whatever the worker count.
  Each worker computes the rank's output order on integers alone and converts, decodes
  and augments only the rows of its own batches (each shard holding one of them is
  still read and checked by that worker; Arrow takes the rows before any becomes a
  Python object).
- The loader is a cursor over (epoch, batch): `state_dict()` after batch k,
  `load_state_dict()` in a new process, and the next batches are batch k+1,
  k+2, ... of the uninterrupted run, sample for sample and bit for bit
  (augmentation draws from a generator seeded per batch).
- A tokshard error raised in a DataLoader worker (a `ShardError` naming a damaged
  shard, ...) reaches the caller as itself: same type, message and fields as with
  num_workers=0, after the same batches.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import traceback
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokshard.errors import ShardError, TokshardError, UsageError
from tokshard.pipeline.format.shards.base import pad_text_tokens, parse_meta
from tokshard.pipeline.stream.order import (
    Plan,
    consumed_positions,
    emission_order,
    even_rank_slice,
    key64,
    mix64,
    plan_length,
    plan_lookup,
    plan_positions,
    plan_slice,
    rank_slice,
    shard_order,
    stream_batches,
    stream_rank_slice,
)
from tokshard.pipeline.stream.packing import BATCH_KEYS as PACKED_KEYS
from tokshard.pipeline.stream.packing import TOO_LONG, Vocab, assemble, document_lengths, pack_bounds
from tokshard.pipeline.stream.shard_rows import ShardRows

if TYPE_CHECKING:
    from tokshard.pipeline.stream.augment import Augmentation
    from tokshard.pipeline.stream.dataset import TokenDataset

STATE_FORMAT = "tokshard-loader/1"


def default_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# What `columns=` can ask for besides the batch's own fields: stored columns, the parsed
# metadata, a metadata field ("meta.NAME"; "split" is "meta.split"), the label's class name,
# the caption's text token ids (a dataset converted with --text-tokenizer).
COLUMNS = ("caption", "width", "height", "source", "meta", "split", "class_name", "text_tokens")
_ALWAYS = ("tokens", "label", "key", "id", "pad", "view")
# Every key a batch can carry besides token fields (which take their names: add-tokens --as).
BATCH_KEYS = frozenset({*_ALWAYS, "stream", *COLUMNS, *PACKED_KEYS})


def check_columns(ds: TokenDataset, columns: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the columns a batch carries, in the order asked; the stored shard columns they need),
    or a UsageError naming what cannot be delivered."""
    if columns is None:
        return (), ()
    if isinstance(columns, str):
        raise UsageError(f"columns must be a list of names, not the string {columns!r}")
    names = tuple(dict.fromkeys(columns))
    stored: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise UsageError(f"a column name must be a string, got {name!r}")
        if name in _ALWAYS:
            raise UsageError(f"column {name!r} is always in the batch; columns= adds others")
        if name.startswith("meta.") and len(name) > 5 or name in ("meta", "split"):
            stored.append("meta")
        elif name == "class_name":
            if ds.label_names is None:
                raise UsageError("column 'class_name': this dataset has no class names for its labels "
                                 f"(class names by column: {sorted(ds.class_names or {})})")
        elif name == "text_tokens":
            if ds.text_tokenizer is None:
                raise UsageError("column 'text_tokens': this dataset has no text tokens (converted without "
                                 "--text-tokenizer, or a mixture of datasets whose text tokenizers differ)")
            stored.append(name)
        elif name in COLUMNS:
            stored.append(name)
        else:
            raise UsageError(f"unknown column {name!r}: one of {', '.join(COLUMNS)}, or 'meta.NAME' for a "
                             "field of the samples' metadata")
    return names, tuple(dict.fromkeys(stored))


def load_rows(ds: TokenDataset, i: int, columns: tuple[str, ...], on_error: str,
              rows: np.ndarray | None = None) -> tuple[dict, bool]:
    """(shard i's columns, with "valid" and the stored `columns` (metadata parsed); whether it
    was skipped); `rows`: only those rows. Tokens stay coded; batches decode them. With
    on_error="skip", a shard that cannot be read is stand-in rows marked invalid, which
    batches leave out."""
    if rows is not None and len(rows) == ds.shard_sizes[i]:
        rows = None                   # all of them: no copy
    n = int(ds.shard_sizes[i]) if rows is None else len(rows)
    fields = [c[len("tokens:"):] for c in columns if c.startswith("tokens:")]
    stored = tuple(c for c in columns if not c.startswith("tokens:"))
    try:
        cols = dict(ds.read_shard(i, stored, rows))
        if "meta" in cols:
            cols["meta"] = _parse_meta(cols["meta"], ds.shard_names[i], rows)
        for f in fields:
            cols[f"tokens:{f}"] = _field_tokens(ds, f, i, rows, cols["key"])
        cols["valid"] = np.ones(n, bool)
        return cols, False
    except ShardError:
        if on_error != "skip":
            raise
    return {"tokens": _stand_in_tokens(ds, n), "label": np.full(n, -1, np.int64), "key": np.full(n, "", object),
            "id": np.arange(ds.shard_offsets[i], ds.shard_offsets[i + 1])[slice(None) if rows is None else rows],
            "valid": np.zeros(n, bool),
            **{c: _stand_in(c, n) for c in stored},
            **{f"tokens:{f}": _stand_in_tokens(ds.field(f), n) for f in fields}}, True


def _field_tokens(ds: TokenDataset, name: str, i: int, rows: np.ndarray | None, keys: np.ndarray) -> np.ndarray:
    """Token field `name`'s coded tokens of shard i's `rows`, held to the dataset's keys there."""
    field = ds.field(name)
    cols = field.read_shard(i, (), rows)
    if not np.array_equal(cols["key"], keys):
        at = int(np.flatnonzero(cols["key"] != keys)[0]) if len(cols["key"]) == len(keys) else 0
        raise ShardError(field.shard_names[i], f"token field {name!r}: its row holds key {cols['key'][at]!r:.60}, the "
                         f"dataset's {keys[at]!r:.60} (the field is not aligned with the dataset)")
    return cols["tokens"]


def _stand_in_tokens(ds: TokenDataset, n: int) -> np.ndarray:
    """A skipped shard's coded tokens for its n stand-in rows (left out of batches)."""
    if ds.codec.name != "raw":
        return np.empty(n, object)
    return np.zeros((n, ds.tokens_per_sample), ds.token_dtype)


def _stand_in(column: str, n: int) -> np.ndarray:
    """A skipped shard's `column` for its n stand-in rows (left out of batches)."""
    if column in ("width", "height"):
        return np.full(n, -1, np.int64)
    out = np.full(n, None, object)
    if column == "text_tokens":
        for j in range(n):
            out[j] = np.empty(0, np.uint32)
    return out


class _NumpyBatch(dict):
    """A worker's batch on its way to the main process, its tensors as numpy arrays
    (`tensors` names them; `widen`: those sent narrowed, and their dtype)."""

    tensors: tuple[str, ...] = ()
    widen: tuple[tuple[str, np.dtype], ...] = ()


_NARROW = (np.uint8, np.uint16, np.int16, np.int32)
_NARROW_MIN = 4096          # elements: below this, narrowing saves less than it costs
_RING_MIN = 16 << 10        # bytes: smaller arrays travel pickled, with the rest of the batch
_ALIGN = 64


class _InRing:
    """Stands for an array a worker placed in its ring slot: where, and what it is."""

    __slots__ = ("offset", "dtype", "shape")

    def __init__(self, offset: int, dtype: str, shape: tuple[int, ...]):
        self.offset, self.dtype, self.shape = offset, dtype, shape

    def __reduce__(self) -> tuple:
        return _InRing, (self.offset, self.dtype, self.shape)


class _Item(list):
    """A worker's block of batches as the main process receives it: which worker built it
    and its number among that worker's blocks (the ring slot it used, if any)."""

    worker: int = 0
    seq: int = 0
    slot: int = -1

    def __reduce__(self) -> tuple:
        return _make_item, (list(self), self.worker, self.seq, self.slot)


def _make_item(batches: list, worker: int, seq: int, slot: int) -> _Item:
    item = _Item(batches)
    item.worker, item.seq, item.slot = worker, seq, slot
    return item


class _Ring:
    """Shared-memory slots through which the workers hand their batches' large arrays
    (the tokens) to the main process, instead of through the DataLoader's pipe.

    Through the pipe, a block of batches is pickled into bytes in the worker, written in
    64 KiB pieces, each of which wakes the main process, and copied out again there: the
    main process's share of a batch, which num_workers cannot spread, went mostly to that.
    Here a worker writes each large array once, narrowed, into a slot of its own; the
    pickled rest is small; the main process widens the array straight out of the slot.

    Each worker has `slots` slots and numbers its blocks; block n goes to slot n % slots
    if the main process has finished with block n - slots (`done`, written by the main
    process after it copied a block out), and otherwise through the pipe as before, so
    a worker never waits. The DataLoader keeps at most prefetch_factor blocks of a worker
    in flight, so with prefetch_factor + 2 slots the fallback happens only at the tail of
    an epoch, when the last busy worker gets the other workers' prefetch share.

    The memory is torch's shared memory, made before the workers start: a forked worker
    inherits it, a spawned one receives it with the dataset, and it is freed when the
    main process and the workers have dropped it."""

    def __init__(self, workers: int, slots: int, slot_bytes: int, min_bytes: int | None = None):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.min_bytes = _RING_MIN if min_bytes is None else min_bytes     # (travels to spawned workers)
        self.memory = [torch.empty(slots * slot_bytes, dtype=torch.uint8).share_memory_() for _ in range(workers)]
        self.done = torch.zeros(workers, dtype=torch.int64).share_memory_()
        self.sent = 0                    # in a worker: the blocks it has handed over

    def pack(self, item: list) -> _Item:
        """In the worker (the DataLoader's collate_fn): the block, its large arrays in a slot."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seq, self.sent = self.sent, self.sent + 1
        slot = seq % self.slots
        free = int(self.done[worker]) >= seq - self.slots + 1
        memory = self.memory[worker].numpy()[slot * self.slot_bytes:(slot + 1) * self.slot_bytes] if free else None
        used = [0]

        def place(arr: np.ndarray, dtype: np.dtype) -> _InRing | None:
            if memory is None:
                return None
            n = int(np.prod(arr.shape)) * dtype.itemsize
            at = used[0]
            if n < self.min_bytes or at + n > len(memory):
                return None
            np.copyto(np.ndarray(arr.shape, dtype, memory, at), arr, casting="unsafe")
            used[0] = -(-(at + n) // _ALIGN) * _ALIGN
            return _InRing(at, dtype.str, tuple(arr.shape))

        return _make_item([_numpy(b, place) for b in item], worker, seq, slot if used[0] else -1)

    def unpack(self, item: _Item, pin: bool) -> list:
        """In the main process: the block's batches as tensors, copied out of the slot,
        which is then the worker's again."""
        memory = self.memory[item.worker].numpy() if item.slot >= 0 else None
        base = item.slot * self.slot_bytes
        out = [_from_numpy(b, pin, memory, base) for b in item]
        self.done[item.worker] = item.seq + 1
        return out


def _numpy(batch: Any, place: Any = None) -> Any:
    """In the worker, a finished batch made ready to travel: its tensors travel
    as numpy arrays, pickled through the worker's pipe or placed in its ring slot
    (`place(array, dtype)` -> `_InRing` or None: pickled), and become tensors again in the
    main process (`_from_numpy`). Sent as tensors, each would go through its own
    shared-memory segment and a socket handshake to pass its file descriptor: ~1.5 ms a
    tensor, four or more a batch, most of the main process's time with workers. (The
    DataLoader's default, default_convert, also walked every key and caption of each batch.)

    A large integer array travels in the narrowest integer type that holds its values (token
    ids in 16 bits instead of 64): the main process's share of a batch is mostly copying
    it out, and that share is what num_workers cannot spread."""
    if not isinstance(batch, dict):
        return batch                 # a _WorkerError
    out = _NumpyBatch(batch)
    out.tensors = tuple(k for k, v in batch.items() if isinstance(v, torch.Tensor))
    widen = []
    for k in out.tensors:
        arr = batch[k].numpy()
        dtype = arr.dtype
        if arr.dtype.kind in "iu" and arr.size >= _NARROW_MIN and arr.dtype.itemsize > 2:
            lo, hi = int(arr.min()), int(arr.max())
            for t in _NARROW:
                if t().itemsize < arr.dtype.itemsize and np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                    widen.append((k, arr.dtype))
                    dtype = np.dtype(t)
                    break
        ref = place(arr, dtype) if place is not None else None
        out[k] = ref if ref is not None else arr.astype(dtype, copy=False)
    out.widen = tuple(widen)
    return out


def _from_numpy(batch: Any, pin: bool, memory: np.ndarray | None = None, base: int = 0) -> Any:
    if not isinstance(batch, _NumpyBatch):
        return batch
    out = dict(batch)
    wide = dict(batch.widen)
    for k in batch.tensors:
        arr = out[k]
        if isinstance(arr, _InRing):
            assert memory is not None
            arr = np.ndarray(arr.shape, np.dtype(arr.dtype), memory, base + arr.offset)
            # widened, or copied out unless pinning copies it anyway: the slot is the worker's again
            arr = arr.astype(wide[k]) if k in wide else (arr if pin else arr.copy())
        elif k in wide:
            arr = arr.astype(wide[k])
        t = torch.from_numpy(arr)
        out[k] = t.pin_memory() if pin else t
    return out


class EpochStream(ShardRows):
    """A dataset's epoch stream for the loader: shard order, positions -> rows (a mixture's is
    `mixture._MixStream`); `TokenDataset.epoch_stream` makes it."""

    def __init__(self, ds: TokenDataset, order: np.ndarray, on_error: str, prefetch: int,
                 columns: tuple[str, ...] = ()):
        super().__init__(prefetch)
        self.ds, self.order, self.on_error, self.columns = ds, order, on_error, columns
        sizes = ds.shard_sizes[order]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def load(self, k: int, rows: np.ndarray | None = None) -> dict:
        i = int(self.order[k])
        cols, skipped = load_rows(self.ds, i, self.columns, self.on_error, rows)
        if skipped:
            self.skipped_shards.append(self.ds.shard_names[i])
        return cols

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard (stream order) of each global position, and its row there."""
        k = np.searchsorted(self.bounds, positions, side="right") - 1
        return k, positions - self.bounds[k]


class TokenIterable(IterableDataset):
    """Batches of one rank, as a torch IterableDataset (use with batch_size=None).

    `where` selects samples with a SQL predicate over the per-sample index
    (columns key, shard, row, label, width, height, source, size), e.g.
    "label IN (1, 2)", without rewriting shards; the epoch order, partitioning
    and resume then apply to the selection.

    A batch is a dict: "tokens" int64 (B, *grid) (1-D sequences truncated to
    `max_tokens` when given), "label" int64 (B,) (-1: none), "key" list[str],
    "id" int64 (B,) (global sample id: manifest shard offset + row), "pad" bool (B,)
    (True: a sample repeated to even out the ranks, `even_batches`). `columns`
    adds stored columns (COLUMNS, or "meta.NAME" for one metadata field): numbers as
    tensors, text and metadata as lists. `augment` is called as
    augment(batch, generator) with a generator seeded per batch.

    Multi-view datasets (converted with views=hflip|tencrop): view="random"
    picks one stored view per sample, uniformly, keyed by (seed, epoch, sample)
    so it is reproducible; an int picks that view; "all" gives (B, V, *grid).
    "view" in the batch says which view each sample got.

    A mixture's batches mix its streams (batching="mixed"); batching="per_stream" makes
    each batch one stream's (see `order.stream_batches`), with the same guarantees.

    on_error="raise" stops at the first bad shard with a ShardError naming it;
    "skip" counts the shard, drops its samples and goes on (batches that would
    hold them come out smaller).
    """

    _memo: tuple[tuple[int, tuple[tuple[int, int], ...]], Plan]   # (epoch, history) -> plan, set by _plan

    def __init__(self, ds: TokenDataset, *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 shuffle_buffer: int = 10_000, augment: Augmentation | None = None,
                 prefetch_shards: int = 2,
                 on_error: str = "raise", max_tokens: int | None = None, view: int | str = "random",
                 where: str | None = None, even_batches: bool = True, columns: Sequence[str] | None = None,
                 ids: np.ndarray | None = None, batching: str = "mixed", pack: int | None = None,
                 vocab: Vocab | None = None, too_long: str = "split", tokens: str | Sequence[str] = "tokens"):
        super().__init__()
        if rank is None or world_size is None:
            r, w = default_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if batch_size < 1:
            raise UsageError("batch_size must be at least 1")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in [0, world_size={world_size})")
        if on_error not in ("raise", "skip"):
            raise UsageError("on_error must be 'raise' or 'skip'")
        if shuffle_buffer < 0:
            raise UsageError("shuffle_buffer must be >= 0")
        if max_tokens is not None:
            if len(ds.grid) != 1:
                raise UsageError(f"max_tokens applies to 1-D token sequences; this dataset's grid is {ds.grid}")
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                    or not 1 <= max_tokens <= ds.grid[0]:
                raise UsageError(f"max_tokens must be an integer in 1..{ds.grid[0]}, got {max_tokens!r}")
        n_views = len(ds.views)
        if not (view in ("random", "all") or (isinstance(view, int) and 0 <= view < n_views)):
            raise UsageError(f"view must be 'random', 'all' or an index below {n_views} "
                             f"(views: {', '.join(ds.views)}); got {view!r}")
        if getattr(ds, "is_mixture", False) and (where is not None or ids is not None):
            raise UsageError("where= and subsets apply per stream in a mixture: "
                             "tokshard.Stream(dataset or subset, where=...)")
        if batching not in ("mixed", "per_stream"):
            raise UsageError(f"batching must be 'mixed' or 'per_stream', got {batching!r}")
        if batching == "per_stream" and not getattr(ds, "is_mixture", False):
            raise UsageError("batching='per_stream' applies to a mixture (tokshard.mix); a dataset is one stream")
        self.batching = batching
        self.view = view
        self.columns, self.stored_columns = check_columns(ds, columns)
        self.token_fields = self._check_tokens(ds, tokens, max_tokens, pack)
        # (the fields' coded tokens ride along with the stored columns as "tokens:NAME")
        self.stored_columns += tuple(f"tokens:{f}" for f in self.token_fields if f != "tokens")
        self.pack, self.vocab, self.too_long = self._check_pack(ds, pack, vocab, too_long, max_tokens, view)
        # A variable-grid dataset's batches (unpacked) are each of one grid: grouped by grid as
        # per-stream batching groups by stream (`order.stream_batches`), both at once in a mixture.
        self.by_grid = ds.variable_grid is not None and not self.pack
        self.grouped = self.batching == "per_stream" or self.by_grid
        if ds.variable_grid is not None and self.pack and augment is not None:
            raise UsageError("augment= with pack=N on a variable-grid dataset: a packed batch's samples have "
                             "grids of their own, which the grid augmentations cannot take together")
        if self.pack and ds.text_tokenizer is not None and "text_tokens" not in self.stored_columns:
            self.stored_columns += ("text_tokens",)
        self.ds, self.batch_size, self.shuffle, self.seed = ds, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        # Padding is moot with drop_last (every rank is cut to the same full batches).
        self.even_batches = bool(even_batches) and not drop_last
        self.buffer = shuffle_buffer if shuffle else 0
        self.augment, self.prefetch, self.on_error, self.max_tokens = augment, prefetch_shards, on_error, max_tokens
        self.where = where
        # Shards whose sample index could not be read (on_error="skip"): they select nothing.
        self.index_skipped: list[str] = []
        self.selection = None if where is None else _select(ds, where, on_error, self.index_skipped)
        # `ids`: a subset's sample ids (TokenSubset.loader); with `where`, the samples in both.
        self.subset = None
        if ids is not None:
            ids = np.unique(np.asarray(ids, np.int64))
            if len(ids) and not (0 <= ids[0] and ids[-1] < len(ds)):
                raise UsageError(f"ids must be sample ids in [0, {len(ds)})")
            self.subset = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
            self.selection = ids if self.selection is None else np.intersect1d(self.selection, ids)
        self.epoch, self.start_batch = 0, 0
        self.history: tuple[tuple[int, int], ...] = ()   # (world size, batches) earlier in this epoch

    @staticmethod
    def _check_tokens(ds: TokenDataset, tokens: str | Sequence[str], max_tokens: int | None,
                      pack: int | None) -> tuple[str, ...]:
        """The token fields a batch carries, first the one delivered as "tokens" ("tokens":
        the dataset's own codes), the others under their names."""
        names = (tokens,) if isinstance(tokens, str) else tuple(tokens)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise UsageError(f"tokens must be a token field's name or a list of distinct names, got {tokens!r:.80}")
        if "tokens" in names[1:]:
            raise UsageError("tokens=[...]: the first name is delivered as batch['tokens']; the dataset's own "
                             "codes ('tokens') can only be that first one")
        if names == ("tokens",):
            return names
        if getattr(ds, "is_mixture", False):
            raise UsageError("token fields (tokens=...) apply to a dataset, not a mixture")
        if ds.variable_grid is not None:
            raise UsageError("token fields (tokens=...) apply to datasets of one grid; this one has variable grids")
        if pack is not None:
            raise UsageError("pack=N packs the dataset's own codes; token fields (tokens=...) do not apply")
        if max_tokens is not None and names[0] != "tokens":
            raise UsageError("max_tokens applies to the dataset's own codes; not with another field as 'tokens'")
        for n in names:
            if n != "tokens":
                ds.field(n)          # a UsageError naming the fields there are, or the field's ManifestError
        return names

    def _codes(self, name: str, cols: dict) -> np.ndarray:
        """Field `name`'s decoded codes of the batch's samples ("tokens": the dataset's own)."""
        if name == "tokens":
            if self.ds.variable_grid is not None:
                return self._grid_codes(cols)
            return self.ds.decode_tokens(cols["tokens"], cols["id"])
        return self.ds.field(name).decode_tokens(cols[f"tokens:{name}"], cols["id"])

    def _grid_codes(self, cols: dict) -> np.ndarray:
        """A variable-grid batch's codes, each sample held to the grid the sample index gave it
        (what its batch was planned with): one (B, h, w) array when they share one (grouped by
        grid), else an object array of (h, w) arrays (packed)."""
        ids, grid = cols["id"], cols["grid"]
        planned = self.ds.grids()[ids]
        if not np.array_equal(grid, planned):
            j = int(np.flatnonzero((grid != planned).any(axis=1))[0])
            raise ShardError(self._shard_of(int(ids[j])), f"sample {cols['key'][j]!r:.60} has grid "
                             f"{grid[j].tolist()}, its sample index says {planned[j].tolist()} (a stale or "
                             "tampered index)")
        return self.ds.decode_tokens(cols["tokens"], ids, grid, stack=self.by_grid)

    def pack_state(self) -> dict | None:
        """What packing depends on, for the loader's state (None: not packed)."""
        if self.pack is None or self.vocab is None:
            return None
        return {"seq_len": self.pack, "vocab": self.vocab.describe(), "too_long": self.too_long,
                "image_tokens": self.image_tokens}

    def _check_pack(self, ds: TokenDataset, pack: int | None, vocab: Vocab | None, too_long: str,
                    max_tokens: int | None, view: int | str) -> tuple[int | None, Vocab | None, str]:
        """(pack, its joint vocabulary, the too-long rule), checked; (None, None, ...) unpacked."""
        if pack is None:
            if vocab is not None:
                raise UsageError("vocab= applies to packed sequences (pack=N)")
            return None, None, too_long
        if isinstance(pack, bool) or not isinstance(pack, (int, np.integer)) or pack < 1:
            raise UsageError(f"pack must be a sequence length (a positive integer), got {pack!r}")
        if too_long not in TOO_LONG:
            raise UsageError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
        if self.batching != "mixed":
            raise UsageError("pack=N packs the mixture's samples in their mixed order; batching='per_stream' "
                             "does not apply")
        if view == "all":
            raise UsageError("pack=N packs one view per sample; view='all' does not apply")
        text = ds.text_tokenizer
        if vocab is None:
            vocab = Vocab.joint(text=0 if text is None else int(text["vocab_size"]), image=ds.vocab_size)
        elif not isinstance(vocab, Vocab):
            raise UsageError(f"vocab must be a tokshard.Vocab (Vocab.joint(...)), got {type(vocab).__name__}")
        if vocab.image < ds.vocab_size:
            raise UsageError(f"vocab: {vocab.image} image codes, but the dataset's tokenizer has {ds.vocab_size}")
        if text is not None and vocab.text < int(text["vocab_size"]):
            raise UsageError(f"vocab: {vocab.text} text ids, but the dataset's text tokenizer has "
                             f"{text['vocab_size']}")
        image: int | None
        if ds.variable_grid is not None:      # each sample's own grid: planned from the sample index
            image = None
            grids = ds.grids()
            fewest = int((grids[:, 0] * grids[:, 1]).min()) if len(grids) else 0
        else:
            image = fewest = int(np.prod(ds.grid)) if max_tokens is None else int(max_tokens)
        shortest = int(document_lengths(np.zeros(1, np.int64), fewest)[0])
        if pack < shortest:
            raise UsageError(f"pack={pack} is shorter than the shortest sample: {shortest} tokens (bos, boi, "
                             f"{fewest} image codes, eoi; no text)")
        self.image_tokens = image
        return int(pack), vocab, too_long

    # -- the plan ------------------------------------------------------------------
    def _rank_key(self, segment: int, rank: int, world: int) -> int:
        return key64("buffer", self.seed, self.epoch, segment, rank, world)

    def _plan(self) -> Plan:
        memo_key = (self.epoch, self.history)
        if getattr(self, "_memo", (None,))[0] == memo_key:
            return self._memo[1]
        plan = self._replay()
        self._memo = (memo_key, plan)
        return plan

    def _span(self, plan: Plan, rank: int, world: int) -> tuple[Plan, int]:
        """(rank's slice of `plan`, padded when even_batches; how many of it are real)."""
        if self.pack:      # (ranks are evened out by whole batches instead: _pack_plan)
            span = rank_slice(plan, rank, world)
            return span, plan_length(span)
        if self.grouped:
            positions = plan_positions(plan, 0, plan_length(plan))
            mine, real = stream_rank_slice(positions, self._groups()[positions], rank, world, self.even_batches)
            return (mine,), real
        if self.even_batches:
            return even_rank_slice(plan, rank, world)
        span = rank_slice(plan, rank, world)
        return span, plan_length(span)

    def _streams(self) -> np.ndarray:
        """The stream of each global position of this epoch (a mixture's)."""
        memo = getattr(self, "_streams_memo", None)
        if memo is None or memo[0] != self.epoch:
            mixture: Any = self.ds
            memo = self._streams_memo = (self.epoch, mixture.epoch_plan(self.epoch, self.seed, self.shuffle)[0])
        return memo[1]

    def _groups(self) -> np.ndarray:
        """The batch group of each global position of this epoch (grouped batching): its stream
        (batching="per_stream"), its grid (a variable-grid dataset), or both."""
        memo = getattr(self, "_groups_memo", None)
        if memo is None or memo[0] != self.epoch:
            groups = self._streams().astype(np.int64) if self.batching == "per_stream" else None
            if self.by_grid:
                grid = self.ds.grids()[self._epoch_ids()]
                # (h, w) as one integer; grids are at most 2^20 tokens (MAX_GRID_TOKENS), so it stays
                # below 2^41, and a stream number on top of it below 2^63
                key = grid[:, 0] << 21 | grid[:, 1]
                groups = key if groups is None else groups << 42 | key
            assert groups is not None    # (grouped: per_stream or by_grid)
            memo = self._groups_memo = (self.epoch, groups)
        return memo[1]

    def _quota(self, plan: Plan, world: int) -> dict[int, int] | None:
        """With per-stream batching and drop_last: the full batches each stream gives every
        rank (what its shortest rank can fill), so every rank has as many."""
        if not self.drop_last:
            return None
        streams = self._groups()[plan_positions(plan, 0, plan_length(plan))]
        s, n = np.unique(streams, return_counts=True)
        return {int(k): int(c) // world // self.batch_size for k, c in zip(s, n)}

    def _batches(self, plan: Plan, span: Plan, seg: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """The rank's batches in this segment: (virtual positions of `span`, batch by batch;
        batch bounds). Mixed: the buffer shuffle's emission order cut into batch_size pieces.
        Per stream: that order regrouped into one-stream batches (`stream_batches`)."""
        n, bs = plan_length(span), self.batch_size
        if self.pack:
            return self._pack_plan(plan, span, seg, rank, world)
        emit = emission_order(n, self.buffer, self._rank_key(seg, rank, world))
        if self.grouped:
            streams = self._groups()[plan_lookup(span, emit)]
            flat, bounds = stream_batches(streams, bs, self._quota(plan, world))
            return emit[flat], bounds
        limit = (plan_length(plan) // world) // bs * bs if self.drop_last else n
        return emit[:limit], np.append(np.arange(0, limit, bs), limit).astype(np.int64)

    def _pack_plan(self, plan: Plan, span: Plan, seg: int, rank: int, world: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Packed batches of `rank`: its emission order cut where `packing.place` closes a batch;
        then every rank as many batches (empty ones after the short ranks' last, with
        even_batches; the shortest rank's count, with drop_last), counted from all ranks' plans.

        Memoized per (epoch, history, segment, world): the placement is a step per document,
        and len(), iteration, the elastic replay and the evening out (every rank's count) each
        need it; a rank's placement is computed once for all of them."""
        key = (self.epoch, self.history, seg, world)
        memo: dict[str, Any] | None = getattr(self, "_pack_memo", None)
        if memo is None or memo["key"] != key:
            memo = {"key": key, "ranks": {}, "counts": None}
            self._pack_memo: dict[str, Any] = memo
        ranks: dict[int, tuple[np.ndarray, np.ndarray]] = memo["ranks"]
        if rank not in ranks:
            ranks[rank] = self._pack_rank(plan, span, seg, rank, world)
        emit, bounds = ranks[rank]
        if world > 1 and (self.even_batches or self.drop_last):
            if memo["counts"] is None:
                memo["counts"] = [len((ranks.get(r) or self._pack_rank(plan, None, seg, r, world))[1]) - 1
                                  for r in range(world)]
            counts = memo["counts"]
            target = max(counts) if self.even_batches else min(counts)
            have = len(bounds) - 1
            bounds = (np.concatenate([bounds, np.full(target - have, bounds[-1], np.int64)]) if target >= have
                      else bounds[: target + 1])
        return emit[: bounds[-1]], bounds

    def _pack_rank(self, plan: Plan, span: Plan | None, seg: int, rank: int, world: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(rank's emission order over its span, the bounds of its packed batches)."""
        if span is None:
            span, _ = self._span(plan, rank, world)
        emit = emission_order(plan_length(span), self.buffer, self._rank_key(seg, rank, world))
        ids = self._epoch_ids()[plan_lookup(span, emit)]
        if self.image_tokens is None:       # variable grids: each sample's own count
            grid = self.ds.grids()[ids]
            lengths = document_lengths(self.ds.text_lengths()[ids], grid[:, 0] * grid[:, 1])
        else:
            lengths = document_lengths(self.ds.text_lengths()[ids], self.image_tokens)
        assert self.pack is not None
        return emit, pack_bounds(lengths, self.pack, self.batch_size, self.too_long)

    def _epoch_ids(self) -> np.ndarray:
        """The sample id at each position of this epoch's stream (memoized per epoch)."""
        memo = getattr(self, "_ids_memo", None)
        if memo is None or memo[0] != self.epoch:
            memo = self._ids_memo = (self.epoch, self.ds.epoch_ids(self.epoch, self.seed, self.shuffle))
        return memo[1]

    def _replay(self) -> Plan:
        plan: Plan = ((0, len(self.ds)),) if self.selection is None else (self._selected_positions(),)
        for seg, (world, batches) in enumerate(self.history):
            pieces: list[tuple[int, int] | np.ndarray] = []
            for r in range(world):
                span, real = self._span(plan, r, world)
                if self.grouped or self.pack:
                    pieces.extend(self._unconsumed(plan, span, real, seg, r, world, batches))
                    continue
                n = plan_length(span)
                left, fed = consumed_positions(n, self.buffer, self._rank_key(seg, r, world),
                                               min(batches * self.batch_size, n))
                left = left[left < real]        # a padding position not delivered is no sample owed
                if len(left):
                    pieces.append(plan_lookup(span, left))
                pieces.extend(plan_slice(span, min(fed, real), real))
            plan = tuple(pieces)
        return plan

    def _unconsumed(self, plan: Plan, span: Plan, real: int, seg: int, rank: int, world: int,
                    batches: int) -> Plan:
        """The real positions of `span` not in the rank's first `batches` batches, in plan order."""
        flat, bounds = self._batches(plan, span, seg, rank, world)
        gone = flat[: bounds[min(batches, len(bounds) - 1)]]
        gone = gone[gone < real]
        hi = int(gone.max()) + 1 if len(gone) else 0
        left = np.ones(hi, bool)
        left[gone] = False
        head = np.flatnonzero(left)
        return ((plan_lookup(span, head),) if len(head) else ()) + plan_slice(span, hi, real)

    def _selected_positions(self) -> np.ndarray:
        """Stream positions (this epoch's shard order) of the selected samples, in stream order."""
        ds, ids = self.ds, self.selection
        assert ids is not None   # only called with a selection
        order = shard_order(ds.num_shards, self.seed, self.epoch, self.shuffle)
        place = np.empty_like(order)
        place[order] = np.arange(len(order))
        starts = np.concatenate([[0], np.cumsum(ds.shard_sizes[order])])[:-1].astype(np.int64)
        shard = np.searchsorted(ds.shard_offsets, ids, side="right") - 1
        return np.sort(starts[place[shard]] + (ids - ds.shard_offsets[shard]))

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch segment (from its start)."""
        plan, bs = self._plan(), self.batch_size
        if self.pack:
            return len(self._batches(plan, self._span(plan, self.rank, self.world_size)[0], len(self.history),
                                     self.rank, self.world_size)[1]) - 1
        if self.grouped:
            quota = self._quota(plan, self.world_size)
            if quota is not None:
                return sum(quota.values())
            span, _ = self._span(plan, self.rank, self.world_size)
            counts = np.unique(self._groups()[plan_positions(span, 0, plan_length(span))], return_counts=True)[1]
            return int(sum(-(-int(c) // bs) for c in counts))
        if self.drop_last:
            return (plan_length(plan) // self.world_size) // bs
        return math.ceil(plan_length(self._span(plan, self.rank, self.world_size)[0]) / bs)

    # -- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(worker, workers)

    def batches(self, worker: int = 0, workers: int = 1, block: int = 1) -> Iterator[dict]:
        """This worker's batches: counting from `start_batch`, blocks of `block` batches, the
        j-th block being worker j % workers's."""
        stream: ShardRows = self.ds.epoch_stream(self.epoch, self.seed, self.shuffle, self.on_error, self.prefetch,
                                                 self.stored_columns)
        try:
            yield from self._run(stream, worker, workers, block)
        finally:
            stream.close()

    def _run(self, stream: Any, worker: int, workers: int, block: int = 1) -> Iterator[dict]:
        """This worker's batches of the rank's epoch segment, from `start_batch` on.

        The rank's output order is known without data (`emission_order`: the buffer
        shuffle run on integers), so a worker reads the rows of its own batches only: each
        batch's positions are looked up in the shards holding them, which stay loaded
        until the worker's last batch that needs them."""
        plan = self._plan()
        seg = len(self.history)
        span, real = self._span(plan, self.rank, self.world_size)
        start = self.start_batch
        flat, bounds = self._batches(plan, span, seg, self.rank, self.world_size)
        # (the batches `bounds` delimits are num_batches() of them, without a second rank slice)
        own = [b for b in range(start, len(bounds) - 1) if (b - start) // block % workers == worker]
        if not own:
            return
        virtual = np.concatenate([flat[bounds[b]:bounds[b + 1]] for b in own])
        sizes = [int(bounds[b + 1] - bounds[b]) for b in own]
        ends = np.cumsum(sizes)
        shards, local = stream.locate(plan_lookup(span, virtual))
        stream.select(shards, local)     # so each shard converts only this worker's rows of it
        # The last of this worker's batches that needs each shard, and the order shards are
        # first needed in (what to prefetch next).
        batch_of = np.repeat(np.arange(len(own)), sizes)
        ids, first = np.unique(shards, return_index=True)
        last = np.zeros(len(ids), np.int64)
        np.maximum.at(last, np.searchsorted(ids, shards), batch_of)
        release: dict[int, list[int]] = {}
        for shard, j in zip(ids.tolist(), last.tolist()):
            release.setdefault(j, []).append(shard)
        needed = ids[np.argsort(first, kind="stable")].tolist()
        first_batch = batch_of[np.sort(first)].tolist()
        nxt = 0
        for j, b in enumerate(own):
            lo, hi = (ends[j - 1] if j else 0), ends[j]
            while nxt < len(needed) and first_batch[nxt] <= j:
                nxt += 1
            stream.prefetch_shards(needed[nxt: nxt + self.prefetch])
            if lo == hi:      # an empty packed batch (a short rank's, evened out): padding only
                yield from self._report([self._packed(b, None, {})], stream)
                continue
            rows = stream.rows(shards[lo:hi], local[lo:hi])
            rows["pad"] = virtual[lo:hi] >= real
            yield from self._report([self._finish(b, rows)], stream)
            stream.release(release.get(j, ()))

    @staticmethod
    def _report(batches: Iterable[dict], stream: Any) -> Iterator[dict]:
        # Skipped shards ride along with the next batch so the loader in the
        # main process can count them, whichever worker saw them.
        for batch in batches:
            if stream.skipped_shards:
                batch["skipped_shards"] = stream.skipped_shards
                stream.skipped_shards = []
            yield batch

    def _finish(self, b: int, cols: dict) -> dict:
        valid = cols.pop("valid")
        if not valid.all():
            cols = {c: v[valid] for c, v in cols.items()}
        codes = {name: self._codes(name, cols) for name in self.token_fields}
        views = None
        if len(self.ds.views) > 1 and self.view != "all":
            if self.view == "random":
                views = (mix64(key64("view", self.seed, self.epoch), cols["id"].astype(np.uint64))
                         % np.uint64(len(self.ds.views))).astype(np.int64)
            else:
                views = np.full(len(cols["id"]), self.view, np.int64)
            # every field has the dataset's views: each sample gets the same view in all
            codes = {k: v[np.arange(len(v)), views] for k, v in codes.items()}
        tokens = codes.pop(self.token_fields[0])
        if self.max_tokens is not None:
            tokens = tokens[..., : self.max_tokens]
        batch = {"tokens": (torch.from_numpy(tokens.astype(np.int64)) if tokens.dtype != object   # else packed grids
                            else [torch.from_numpy(t.astype(np.int64)) for t in tokens]),
                 "label": torch.from_numpy(cols["label"]), "key": cols["key"].tolist(),
                 "id": torch.from_numpy(cols["id"]), "pad": torch.from_numpy(cols["pad"]),
                 **{k: torch.from_numpy(v.astype(np.int64)) for k, v in codes.items()}}
        if views is not None:
            batch["view"] = torch.from_numpy(views)
        if "stream" in cols:           # a mixture's: which stream each sample came from
            batch["stream"] = torch.from_numpy(cols["stream"])
        if "grid" in cols:             # a variable-grid dataset's: each sample's (h, w)
            batch["grid"] = torch.from_numpy(cols["grid"])
        for name in self.columns:
            batch[name] = self._column(name, cols)
        if self.augment is not None:
            g = torch.Generator().manual_seed(
                key64("augment", self.seed, self.epoch, len(self.history), self.rank, b) >> 1)
            batch = self.augment(batch, g)
        if self.pack:
            return self._packed(b, batch, cols)
        return batch

    def _packed(self, b: int, batch: dict | None, cols: dict) -> dict:
        """The batch's samples (decoded, augmented) packed into (batch_size, pack) sequences
        (`packing.assemble`), with each document's id, key, label and `columns` in document
        order (document_ids index them)."""
        assert self.pack is not None and self.vocab is not None
        image: np.ndarray | list[np.ndarray]
        if batch is None:
            image = np.zeros((0, self.image_tokens or 0), np.int64)
            text: list = []
            batch = {"id": torch.zeros(0, dtype=torch.int64), "key": [], "label": torch.zeros(0, dtype=torch.int64),
                     **({"grid": torch.zeros((0, 2), dtype=torch.int64)} if self.image_tokens is None else {}),
                     **{c: torch.zeros(0, dtype=torch.int64) if c in ("width", "height") else
                        torch.zeros((0, 0), dtype=torch.int64) if c == "text_tokens" else [] for c in self.columns}}
        else:
            if isinstance(batch["tokens"], list):     # variable grids: each sample's own codes
                image = [t.numpy() for t in batch["tokens"]]
            else:
                flat = batch["tokens"].reshape(len(batch["key"]), -1).numpy()
                if flat.shape[1] != self.image_tokens:
                    raise UsageError(f"augment made {flat.shape[1]} image tokens a sample; pack=N plans with "
                                     f"{self.image_tokens} (use augmentations that keep the grid)")
                image = flat
            ids = batch["id"].numpy()
            if self.ds.text_tokenizer is None:
                text = [np.empty(0, np.int64)] * len(ids)
            else:
                text = list(cols["text_tokens"])
                got = np.fromiter((len(t) for t in text), np.int64, count=len(text))
                bad = np.flatnonzero(got != self.ds.text_lengths()[ids])
                if len(bad):
                    j = int(bad[0])
                    raise ShardError(self._shard_of(int(ids[j])), f"sample {batch['key'][j]!r:.60} holds {got[j]} "
                                     f"text token ids, its sample index says {self.ds.text_lengths()[ids][j]} "
                                     "(a stale or tampered index)")
        out = assemble(text, image, self.vocab, self.pack, self.batch_size, self.too_long)
        packed: dict[str, Any] = {k: torch.from_numpy(v) for k, v in out.items() if k != "too_long"}
        packed["too_long"] = int(out["too_long"])
        for k in ("id", "key", "label", *self.columns):
            packed[k] = batch[k]
        for k in ("view", "stream", "grid", "skipped_shards"):
            if k in batch:
                packed[k] = batch[k]
        return packed

    def _shard_of(self, sample_id: int) -> str:
        ds: Any = self.ds
        if getattr(ds, "is_mixture", False):
            s = int(np.searchsorted(ds.offsets, sample_id, side="right") - 1)
            ds, sample_id = ds.datasets[s], sample_id - int(ds.offsets[s])
        return str(ds.shard_names[int(np.searchsorted(ds.shard_offsets, sample_id, side="right") - 1)])

    def _column(self, name: str, cols: dict) -> list | torch.Tensor:
        """The batch's `name` column (see COLUMNS): numbers as tensors, everything else as lists."""
        if name in ("width", "height"):
            return torch.from_numpy(cols[name])
        if name == "text_tokens":
            # one (B, longest) int64 tensor, -1 after each sample's ids: it travels from a
            # worker as one narrowed array, where B tensors would each need a shared segment
            return torch.from_numpy(pad_text_tokens(cols[name])[0])
        if name in ("caption", "source", "meta"):
            return cols[name].tolist()
        if name == "class_name":
            names = self.ds.label_names or []
            return [names[y] if 0 <= y < len(names) else None for y in cols["label"].tolist()]
        field = "split" if name == "split" else name[5:]
        return [m.get(field) if isinstance(m, dict) else None for m in cols["meta"].tolist()]


def _parse_meta(texts: np.ndarray, shard: str, rows: np.ndarray | None) -> np.ndarray:
    """A shard's meta column (JSON text per sample; of `rows`, if only those) parsed: dicts (or None)."""
    out = np.empty(len(texts), dtype=object)
    out[:] = parse_meta(texts, shard, rows)
    return out


def _select(ds: TokenDataset, where: str, on_error: str = "raise", skipped: list[str] | None = None) -> np.ndarray:
    """Sorted global sample ids of the samples matching `where` (SQL over the sample index).

    Every index row is checked against the shard it names (its key at that row) before
    it becomes an id: a stale or tampered index is a typed error, never another sample.
    With on_error="skip", the rows of a shard that cannot be read stay unchecked: the
    stream meets the same shard, skips it and counts it; a shard whose index cannot be
    read selects nothing and is appended to `skipped`.
    """
    from tokshard.pipeline.tools.query import select_rows
    rows = select_rows(ds.url, where, ds.storage_options, dataset=ds, skip_unreadable=on_error == "skip",
                       unreadable=skipped)
    index = {name: i for i, name in enumerate(ds.shard_names)}   # every name is one the manifest lists
    ids = np.fromiter((ds.shard_offsets[index[s]] + r for s, r in rows), np.int64, count=len(rows))
    return np.unique(ids)


class _WorkerError:
    """A tokshard error caught in a DataLoader worker, carried to the main process as data."""

    def __init__(self, error: TokshardError):
        self.error = error


class _CarryErrors(IterableDataset):
    """What TokenLoader hands its DataLoader: the iterable's batches, and a tokshard
    error as a last item instead of raising it in the worker.

    torch's worker would wrap a raised error in an ExceptionWrapper that keeps only
    its type and formatted traceback and rebuilds it as exc_type(text), which turns a
    ShardError into "RuntimeError: Caught ShardError in DataLoader worker"; carried
    as data the error pickles with its fields, and TokenLoader raises it as it was.
    Other exceptions go through torch's own path, as before.
    """

    def __init__(self, iterable: TokenIterable, block: int = 1):
        super().__init__()
        self.iterable, self.block = iterable, block

    def __iter__(self) -> Iterator[list[dict | _WorkerError]]:
        """The worker's blocks of batches, each one DataLoader item (see TokenLoader.block)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        group: list[dict | _WorkerError] = []
        try:
            for batch in self.iterable.batches(worker, workers, self.block):
                group.append(batch)
                if len(group) == self.block:
                    yield group
                    group = []
        except TokshardError as e:
            where = f"DataLoader worker process {worker}" if info is not None else "a DataLoader worker"
            frames = "".join(traceback.format_tb(e.__traceback__)).rstrip()
            e.add_note(f"(raised in {where}; its traceback:)\n{frames}")
            group.append(_WorkerError(e))
        except Exception:
            if group:       # the batches before it, as without workers
                yield group
            raise
        if group:
            yield group


def worker_cores(workers: int, affinity: bool = True, allowed: Sequence[int] | None = None,
                 cpus: int | None = None, local_rank: int | None = None, local_world: int | None = None
                 ) -> tuple[int, ...] | None:
    """The cores a rank's DataLoader workers are pinned to with `worker_affinity=True` (worker w
    to the w-th, round-robin where there are fewer cores than workers), or None: not pinned.
    Pinned, a worker keeps its core's caches instead of migrating whenever the main process
    wakes: num_workers=2 on 2 cores ran 3-12% faster pinned, in paired rounds.

    The cores are those this process may use (`sched_getaffinity`), and where every local rank
    sees the whole machine (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE, no binding by the
    launcher), this rank's equal slice of them, so a job's ranks never pin workers to the same
    core. Off by default: two jobs that do not know of each other would pin their workers to
    the same first cores of a machine."""
    if not affinity or workers < 1 or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    cpus = (os.cpu_count() or len(cores)) if cpus is None else cpus
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_world is None else local_world
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    if local_world > 1 and len(cores) >= cpus and 0 <= local_rank < local_world:
        k = len(cores) // local_world
        cores = cores[local_rank * k:(local_rank + 1) * k]
    if not cores:
        return None
    return tuple(cores[w % len(cores)] for w in range(workers))


def _pin_worker(cores: tuple[int, ...], worker: int) -> None:
    """DataLoader's worker_init_fn: pin this worker to its core."""
    try:
        os.sched_setaffinity(0, {cores[worker]})
    except OSError:
        pass          # a core taken away since: run unpinned


class TokenLoader:
    """The rank's batches through a torch DataLoader, as a resumable cursor.

    Iterating continues from the current (epoch, batch); a finished pass moves
    to the next epoch. `state_dict()` counts batches handed to the caller (not
    the ones workers prefetched), so saving it after a training step and
    loading it in a new process continues with the next batch of the
    uninterrupted run. Loading a state saved under a different world size
    continues the same epoch on the new ranks with the samples the old ranks
    had not consumed yet: still no duplicate and no missing sample.

    A tokshard error (e.g. a `ShardError` for a damaged shard with on_error="raise")
    is raised by the iteration as itself whatever `num_workers` is, after the same
    batches, and leaves `state_dict()` at the last batch handed out.
    """

    def __init__(self, iterable: TokenIterable, *, num_workers: int = 0, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None, multiprocessing_context: str | BaseContext | None = None,
                 block: int | None = None, worker_affinity: bool = False):
        self.iterable, self.num_workers, self.worker_affinity = iterable, num_workers, worker_affinity
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise UsageError(f"block must be a positive number of batches, got {block!r}")
        self.block = block
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.mp_context = prefetch_factor, multiprocessing_context
        self._skipped: set[str] = set()

    @property
    def dataset(self) -> TokenDataset:
        return self.iterable.ds

    @property
    def epoch(self) -> int:
        return self.iterable.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch on the next iteration."""
        it = self.iterable
        it.epoch, it.start_batch, it.history = int(epoch), 0, ()

    def __len__(self) -> int:
        return self.iterable.num_batches()

    def blocking(self) -> int:
        """How many batches a worker hands over at once (`block`, or by default as many as
        make ~2 MiB of tokens as they travel, narrowed, at most 8). Each DataLoader item costs
        the main process a fixed ~0.2 ms (queues, a pickle, a pipe, a feeder thread), what a
        worker takes to build a twentieth of a batch of 256 samples: the main process's share,
        which num_workers cannot spread, shrinks with the batches per item."""
        if self.block is not None:
            return self.block
        it = self.iterable
        views = len(it.ds.views) if it.view == "all" else 1
        size = it.batch_size * self._tokens_per_sample() * views * self._width()
        return max(1, min(8, (2 << 20) // max(size, 1)))

    def _tokens_per_sample(self) -> int:
        """Codes a batch carries per sample, over its token fields."""
        ds = self.iterable.ds
        return sum(ds.max_sample_tokens if f == "tokens" else ds.field(f).max_sample_tokens
                   for f in self.iterable.token_fields)

    def _width(self) -> int:
        """Bytes a token takes on its way from a worker (narrowed: `_numpy`)."""
        it = self.iterable
        vocab = max([it.ds.vocab_size, *(it.ds.field(f).vocab_size for f in it.token_fields if f != "tokens")])
        return 2 if vocab <= 1 << 16 else 4

    def _ring(self) -> _Ring:
        """The workers' shared-memory slots, each sized for a block's tokens narrowed to the
        vocabulary's width, a quarter more (an augmentation may enlarge the grid), and 64 KiB
        for other large columns; a larger block still travels, through the pipe."""
        it = self.iterable
        views = len(it.ds.views) if it.view == "all" else 1
        tokens = self.blocking() * it.batch_size * self._tokens_per_sample() * views * self._width()
        slot = -(-(tokens + tokens // 4 + (64 << 10)) // _ALIGN) * _ALIGN
        return _Ring(self.num_workers, (self.prefetch_factor or 2) + 2, slot)

    @property
    def skipped_shards(self) -> list[str]:
        """Shards skipped (on_error="skip") so far, sorted: those that could not be read, and
        those whose sample index could not be read to evaluate `where`."""
        return sorted(self._skipped | set(self.iterable.index_skipped))

    def __iter__(self) -> Iterator[dict]:
        it = self.iterable
        total = it.num_batches()
        if it.start_batch >= total:
            self.set_epoch(it.epoch + 1)
            total = it.num_batches()
        source: Iterable[dict | _WorkerError]
        if self.num_workers == 0:
            source = it.batches()
        else:
            # Pinned here, in _from_numpy: the DataLoader's pin thread sees numpy arrays.
            cores = worker_cores(self.num_workers, self.worker_affinity)
            ring = self._ring()
            loader = DataLoader(_CarryErrors(it, self.blocking()), batch_size=None, num_workers=self.num_workers,
                                collate_fn=ring.pack, pin_memory=False,
                                prefetch_factor=self.prefetch_factor,
                                worker_init_fn=None if cores is None else functools.partial(_pin_worker, cores),
                                multiprocessing_context=self.mp_context, persistent_workers=False)
            pin = bool(self.pin_memory) and torch.cuda.is_available()   # as DataLoader: no device, no pinning
            workers = iter(loader)
            source = (b for item in workers for b in ring.unpack(item, pin))
        batches = iter(source)
        error: TokshardError | None = None
        try:
            for batch in batches:
                if isinstance(batch, _WorkerError):
                    error = batch.error
                    break
                self._skipped.update(batch.pop("skipped_shards", ()))
                it.start_batch += 1
                yield batch
        finally:
            # Workers stop here, not when the error (whose traceback holds this frame) is
            # collected: that can happen inside a later fork, where torch's cleanup fails.
            if self.num_workers:
                workers._shutdown_workers()   # type: ignore[attr-defined]  # (a multi-process iterator's)
                del workers
            del batches, source
        if error is not None:
            raise error
        self.set_epoch(it.epoch + 1)

    def state_dict(self) -> dict:
        it = self.iterable
        return {"format": STATE_FORMAT, "dataset": it.ds.job_hash, "epoch": it.epoch,
                "batches": it.start_batch, "world_size": it.world_size,
                "history": [list(h) for h in it.history], "seed": it.seed,
                "batch_size": it.batch_size, "shuffle": it.shuffle, "shuffle_buffer": it.buffer,
                "drop_last": it.drop_last, "where": it.where, "even_batches": it.even_batches,
                "subset": it.subset, "batching": it.batching, "pack": it.pack_state()}

    def load_state_dict(self, state: dict) -> None:
        it = self.iterable
        if state.get("format") != STATE_FORMAT:
            raise UsageError(f"not a tokshard loader state (format {state.get('format')!r})")
        if state["dataset"] != it.ds.job_hash:
            raise UsageError("the loader state belongs to a different dataset")
        mine = {"seed": it.seed, "batch_size": it.batch_size, "shuffle": it.shuffle,
                "shuffle_buffer": it.buffer, "drop_last": it.drop_last, "where": it.where,
                "even_batches": it.even_batches, "subset": it.subset, "batching": it.batching,
                "pack": it.pack_state()}
        # (a state saved before even_batches existed was saved without padding, one before
        # `batching` with mixed batches)
        old = {"even_batches": False, "batching": "mixed", "pack": None}
        diff = {k: (state.get(k, old.get(k)), v) for k, v in mine.items() if state.get(k, old.get(k)) != v}
        if diff:
            raise UsageError("the loader state was saved with other settings, so its order differs: " +
                             ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
        it.epoch = int(state["epoch"])
        history = tuple(tuple(h) for h in state["history"])
        if int(state["world_size"]) == it.world_size:
            it.history, it.start_batch = history, int(state["batches"])
        else:
            it.history, it.start_batch = history + ((int(state["world_size"]), int(state["batches"])),), 0
