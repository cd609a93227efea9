"""Random access to a token dataset and deterministic subsets of it.

- `ds[i]` and `ds.get(key)` return one sample as a dict (id, key, tokens, label, caption,
  width, height, source, meta, class_name when the dataset has class names, and text_tokens,
  the caption's ids as a 1-D int64 array, when it has a text tokenizer). A sample
  is read from its shard, which is parsed whole once and kept in a small LRU of parsed
  shards bounded by their stored bytes (`SampleCache`): lookups that stay within the
  cached shards cost an index and the decode of one sample.
- `ds.get(key)` finds the key's shard and row through the sample index (the manifest's
  key ranges route it to one index file), then reads the sample from the shard and checks
  that the shard holds that key at that row: a stale or tampered index is a typed error,
  never another sample.
- `ds.subset(fraction, seed)` / `ds.split(fraction, seed)`: a sample belongs to the part
  when a hash of (seed, key) falls below `fraction` of the hash range, so the same keys
  split the same way in any dataset, whatever its shards and order. A part (`TokenSubset`)
  has its own `len`, `[i]`, `get`, `loader`, `keys`, and is split further like a dataset.
- `MapDataset(ds)`: a map-style `torch.utils.data.Dataset` view (tokens as torch tensors).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data

from tokshard.errors import ShardError, UsageError
from tokshard.pipeline.format.shards.base import EXTRA_COLUMNS, parse_meta
from tokshard.schemas.v1 import GRID_COLUMNS

if TYPE_CHECKING:
    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.pipeline.stream.loader import TokenLoader

DEFAULT_SAMPLE_CACHE_BYTES = 256 * 2**20
_HASH_RANGE = 2**64


def sample_index(n: int, i: Any) -> int:
    """`i` as an index into n samples (negative counts from the end, as in a list)."""
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"a sample index is an integer, not {type(i).__name__}")
    j = int(i) + n if i < 0 else int(i)
    if not 0 <= j < n:
        raise IndexError(f"sample index {int(i)} out of range for {n} samples")
    return j


class SampleCache:
    """Parsed and decoded shards (every stored column, tokens decoded, metadata parsed), least
    recently used first out, bounded by what they hold: decoded tokens plus the shard's
    stored bytes (at least one shard is kept). A shard is decoded whole, in one batch, so a
    warm lookup is an index into arrays."""

    def __init__(self, ds: TokenDataset, max_bytes: int = DEFAULT_SAMPLE_CACHE_BYTES):
        self.ds, self.max_bytes = ds, int(max_bytes)
        self.shards: OrderedDict[int, tuple[dict, int]] = OrderedDict()
        self.bytes = 0
        self.offsets = ds.shard_offsets.tolist()

    def shard(self, k: int) -> dict:
        hit = self.shards.get(k)
        if hit is not None:
            self.shards.move_to_end(k)
            return hit[0]
        ds = self.ds
        text = ds.info.text_tokenizer is not None
        cols = dict(ds.read_shard(k, EXTRA_COLUMNS + (("text_tokens",) if text else ())))
        cols["tokens"] = ds.decode_tokens(cols["tokens"], cols["id"], cols.get("grid"))
        # (metadata stays JSON text, parsed per lookup: each caller gets a dict of its own)
        for name in ("key", "caption", "source", "label", "width", "height", "meta"):
            cols[name] = cols[name].tolist()
        tokens = cols["tokens"]
        weight = (sum(int(a.nbytes) for a in tokens) if tokens.dtype == object else int(tokens.nbytes)) \
            + int(ds.shard_bytes[k])
        if text:
            weight += sum(int(a.nbytes) for a in cols["text_tokens"])
        self.shards[k] = (cols, weight)
        self.bytes += weight
        while self.bytes > self.max_bytes and len(self.shards) > 1:
            _, (_, w) = self.shards.popitem(last=False)
            self.bytes -= w
        return cols

    def sample(self, sample_id: int) -> dict:
        ds = self.ds
        k = bisect.bisect_right(self.offsets, sample_id) - 1
        row = sample_id - self.offsets[k]
        cols = self.shard(k)
        tokens = cols["tokens"][row].copy()     # (a view would keep the shard's array alive)
        label = cols["label"][row]
        meta = parse_meta([cols["meta"][row]], ds.shard_names[k], [row])[0]
        out = {"id": sample_id, "key": cols["key"][row], "tokens": tokens, "label": label,
               "caption": cols["caption"][row], "width": cols["width"][row], "height": cols["height"][row],
               "source": cols["source"][row], "meta": meta}
        if "text_tokens" in cols:
            out["text_tokens"] = cols["text_tokens"][row].astype(np.int64)   # (a copy, as tokens)
        names = ds.label_names
        if names is not None:
            out["class_name"] = names[label] if 0 <= label < len(names) else None
        return out

    def row_key(self, k: int, row: int) -> str:
        return self.shard(k)["key"][row]


def find_key(ds: TokenDataset, key: str) -> int | None:
    """The id of the sample `key` (None: no such key), through the sample index; the shard is
    checked to hold that key at that row."""
    if not isinstance(key, str):
        raise TypeError(f"a sample key is a string, not {type(key).__name__}")
    candidates = ds.shards_for_key(key)
    for k in candidates:
        table = ds.read_index(k, columns=["key", "shard", "row"], filters=[("key", "=", key)])
        for found in table.to_pylist():
            row, shard = found.get("row"), found.get("shard")
            size = int(ds.shard_sizes[k])
            if shard != ds.shard_names[k] or isinstance(row, bool) or not isinstance(row, int) \
                    or not 0 <= row < size:
                raise ShardError(ds.shard_names[k], f"the sample index names row {row!r:.40} of shard "
                                 f"{shard!r:.40} for key {key!r:.60} (a stale or tampered index)")
            if ds.samples.row_key(k, row) != key:
                raise ShardError(ds.shard_names[k], f"the sample index puts key {key!r:.60} at row {row}, "
                                 "which holds another key (a stale or tampered index)")
            return int(ds.shard_offsets[k]) + row
    return None


def all_keys(ds: TokenDataset) -> list[str]:
    """Every sample's key in id order, from the sample index (checked against the manifest's
    digests): ~100 bytes a sample are read, not the shards."""
    keys: list[str] = []
    for k in range(ds.num_shards):
        rows, column = _index_column(ds, k, "key")
        part = np.empty(len(rows), dtype=object)
        part[rows] = column.to_pylist()
        keys += part.tolist()
    return keys


def _index_column(ds: TokenDataset, k: int, name: str) -> tuple[np.ndarray, Any]:
    """(rows, column `name`) of shard k's sample index, held to list rows 0..n-1 once each."""
    rows, (column,) = _index_columns(ds, k, (name,))
    return rows, column


def _index_columns(ds: TokenDataset, k: int, names: Sequence[str]) -> tuple[np.ndarray, list[Any]]:
    """(rows, the columns `names`) of shard k's sample index, read once, held to list rows
    0..n-1 once each."""
    table = ds.read_index(k, columns=["row", *names])
    rows = table.column("row").to_numpy()
    size = int(ds.shard_sizes[k])
    if len(rows) != size or (size and not np.array_equal(np.sort(rows), np.arange(size))):
        raise ShardError(ds.shard_names[k], f"its sample index does not list rows 0..{size - 1} once each")
    return rows, [table.column(n) for n in names]


def all_text_lengths(ds: TokenDataset) -> np.ndarray:
    """Every sample's count of text token ids in id order (zeros for a dataset without text
    tokens), from the sample index: what `pack=N` plans with before any shard is read. The
    loader holds each shard's ids to these counts when it reads them."""
    out = np.zeros(len(ds), np.int32)       # (4 bytes a sample: counts stay below --max-text-tokens)
    if ds.text_tokenizer is None:
        return out
    for k in range(ds.num_shards):
        rows, column = _index_column(ds, k, "text_tokens")
        if column.null_count:
            raise ShardError(ds.shard_names[k], "its sample index lacks text token counts for some rows")
        counts = column.to_numpy().astype(np.int64)
        if len(rows) and (counts.min() < 0 or counts.max() > ds.text_tokenizer["max_tokens"]):
            raise ShardError(ds.shard_names[k], "its sample index gives text token counts outside 0.."
                             f"{ds.text_tokenizer['max_tokens']} (--max-text-tokens)")
        out[int(ds.shard_offsets[k]) + rows] = counts
    return out


def all_grids(ds: TokenDataset) -> np.ndarray:
    """A variable-grid dataset's grid (h, w) of every sample in id order, from the sample index,
    each held to the record's bound: what the loader groups and packs by before any shard is
    read. The loader holds each shard's grids to these when it reads them."""
    out = np.zeros((len(ds), 2), np.int64)
    for k in range(ds.num_shards):
        rows, (h, w) = _index_columns(ds, k, GRID_COLUMNS)
        if h.null_count or w.null_count:
            raise ShardError(ds.shard_names[k], "its sample index lacks the grids of some rows")
        grid = np.stack([h.to_numpy().astype(np.int64), w.to_numpy().astype(np.int64)], axis=1)
        ds._check_grids(grid, k, "sample index")
        out[int(ds.shard_offsets[k]) + rows] = grid
    return out


def hash_fraction_ids(keys: Sequence[str], ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The ids (of `ids`, keys alongside) whose hash of (seed, key) falls below `fraction`."""
    cut = int(fraction * _HASH_RANGE)
    salt = f"tokshard-split/{int(seed)}/".encode()
    mask = np.fromiter((int.from_bytes(hashlib.blake2b(salt + k.encode("utf-8", "surrogatepass"),
                                                       digest_size=8).digest(), "little") < cut
                        for k in keys), bool, count=len(keys))
    return ids[mask]


def check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not math.isfinite(fraction) or not 0 <= fraction <= 1:
        raise UsageError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return float(fraction)


class TokenSubset:
    """Some samples of a dataset (sorted ids), as a dataset: `len`, `[i]`, `get(key)`,
    `keys`, `loader(...)`, and `subset`/`split` again."""

    def __init__(self, ds: TokenDataset, ids: np.ndarray, description: str, keys: list[str] | None = None):
        self.ds, self.ids, self.description = ds, np.asarray(ids, np.int64), description
        self._keys = keys

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TokenSubset({self.ds.url!r}, {self.description}, samples={len(self)})"

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(self.ids[sample_index(len(self.ids), i)])]

    @property
    def keys(self) -> list[str]:
        """The part's keys, in id order."""
        if self._keys is None:
            every = self.ds.keys
            self._keys = [every[i] for i in self.ids.tolist()]
        return self._keys

    def get(self, key: str) -> dict:
        sample_id = find_key(self.ds, key)
        if sample_id is None or not _contains(self.ids, sample_id):
            raise KeyError(key)
        return self.ds[sample_id]

    def subset(self, fraction: float, seed: int = 0) -> TokenSubset:
        f = check_fraction(fraction)
        ids = hash_fraction_ids(self.keys, self.ids, f, seed)
        return TokenSubset(self.ds, ids, f"{self.description} / subset({f}, seed={seed})")

    def split(self, fraction: float, seed: int = 0) -> tuple[TokenSubset, TokenSubset]:
        part = self.subset(fraction, seed)
        rest = np.setdiff1d(self.ids, part.ids, assume_unique=True)
        return part, TokenSubset(self.ds, rest, f"{self.description} / rest of subset({fraction}, seed={seed})")

    def iterable(self, batch_size: int = 256, **options: Any) -> Any:
        return self.ds.iterable(batch_size, ids=self.ids, **options)

    def loader(self, batch_size: int = 256, **options: Any) -> TokenLoader:
        """The part's batches, with every loader guarantee (partition, order, resume)."""
        return self.ds.loader(batch_size, ids=self.ids, **options)

    def map_dataset(self, columns: Sequence[str] = ()) -> MapDataset:
        return MapDataset(self, columns)


def _contains(sorted_ids: np.ndarray, sample_id: int) -> bool:
    j = int(np.searchsorted(sorted_ids, sample_id))
    return j < len(sorted_ids) and int(sorted_ids[j]) == sample_id


class MapDataset(torch.utils.data.Dataset):
    """A map-style `torch.utils.data.Dataset` over a dataset or subset: item i is sample i as
    {"tokens": int64 torch tensor, "label", "key", "id"} (what torch's default collate
    batches), plus the `columns` asked for as `ds[i]` gives them (caption, width, height,
    source, meta, class_name; text can be None, so collate those yourself), text_tokens as
    an int64 torch tensor of the caption's length (pad them in your collate: `pad_text_tokens`)."""

    def __init__(self, data: TokenDataset | TokenSubset, columns: Sequence[str] = ()):
        allowed = (*EXTRA_COLUMNS, "class_name", "text_tokens")
        unknown = [c for c in columns if c not in allowed]
        if unknown or isinstance(columns, str):
            raise UsageError(f"unknown columns {unknown or columns!r} (one of {', '.join(allowed)})")
        ds = data.ds if isinstance(data, TokenSubset) else data
        if "class_name" in columns and ds.label_names is None:
            raise UsageError("column 'class_name': this dataset has no class names for its labels")
        if "text_tokens" in columns and ds.text_tokenizer is None:
            raise UsageError("column 'text_tokens': this dataset has no text tokens (converted without "
                             "--text-tokenizer)")
        self.data, self.columns = data, tuple(columns)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        sample = self.data[i]
        out = {"tokens": torch.from_numpy(sample["tokens"].astype(np.int64)), "label": sample["label"],
               "key": sample["key"], "id": sample["id"]}
        out.update((c, sample.get(c)) for c in self.columns)
        if "text_tokens" in self.columns:
            out["text_tokens"] = torch.from_numpy(sample["text_tokens"])
        return out
