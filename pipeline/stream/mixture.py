"""Mixtures of token datasets: `tokshard.mix([...], weights=...)` streams several datasets
as one, with the loader's guarantees (partition without duplicates, deterministic order,
exact and elastic resume, even batches).

The plan stays integers only:
- Each stream s contributes n_s samples per epoch: `choose` samples, or `repeat` times its
  samples, or its `proportion` (or normalised `weights`) of the epoch's size (`epoch_size`,
  by default the streams' sample counts added up); by default, all of its samples.
- A stream's samples (its subset and `where` selection) follow an endless sequence of
  passes; pass q orders them by a shuffle of the stream's shards keyed by (seed, stream,
  q), in shard order within a shard (so reading stays sequential). Epoch e takes the
  window [e * n_s, (e + 1) * n_s) of that sequence: a stream drawn below its size visits
  every sample before any repeats across epochs, and no sample twice within its epoch
  share while n_s is at most its size.
- The epoch's stream interleaves the windows proportionally: the j-th sample of stream s
  sits at (j + 1/2) / n_s of the epoch (ties by stream), so every stretch of the epoch holds
  the streams in their proportions. The loader then slices it among ranks, shuffles it
  within each rank through its bounded buffer and resumes it as it does a dataset's stream.
- `batching="per_stream"` (a loader option) makes every batch one stream's: each stream's
  positions are sliced among the ranks on their own (`order.stream_rank_slice`, padded per
  stream so ranks stay even), and the rank's shuffled order is regrouped into one-stream
  batches (`order.stream_batches`).

Streams must share the tokenizer (its id and codebook hash) and the sample shape; their
codecs and formats may differ (tokens are decoded when a shard is read). A batch carries
`stream` (the stream's index) and `id` = the stream's offset + the sample's id in its dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokshard.errors import UsageError
from tokshard.pipeline.stream.order import key64, permutation
from tokshard.pipeline.stream.shard_rows import ShardRows

if TYPE_CHECKING:
    from tokshard.pipeline.stream.access import TokenSubset
    from tokshard.pipeline.stream.dataset import TokenDataset
    from tokshard.pipeline.stream.loader import TokenIterable, TokenLoader

_STREAM_SHIFT = 2**40   # a (stream, shard) pair as one integer id: stream * _STREAM_SHIFT + shard


@dataclass(frozen=True)
class Stream:
    """One dataset (or subset, or URL) of a mixture, and how much of it an epoch takes:
    at most one of `proportion` (of the epoch), `repeat` (times its samples) or `choose`
    (samples); `where`: a SQL predicate over its sample index, as `loader(where=...)`."""
    data: Any
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    where: str | None = None


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class TokenMixture:
    """Several token datasets streamed as one (see the module docstring); `loader(...)`,
    `iterable(...)` and `len()` as a dataset's."""

    is_mixture = True

    def __init__(self, streams: Sequence[Any], weights: Sequence[float] | None = None, *,
                 epoch_size: int | None = None, **open_options: Any):
        from tokshard.pipeline.stream.access import TokenSubset
        from tokshard.pipeline.stream.dataset import TokenDataset
        from tokshard.pipeline.stream.loader import _select
        if isinstance(streams, (str, Stream)) or not len(streams):
            raise UsageError("mix() takes a non-empty list of datasets, subsets, URLs or Streams")
        specs = [s if isinstance(s, Stream) else Stream(s) for s in streams]
        if weights is not None:
            if len(weights) != len(specs):
                raise UsageError(f"{len(weights)} weights for {len(specs)} streams")
            if any(s.proportion is not None or s.repeat is not None or s.choose is not None for s in specs):
                raise UsageError("give weights= or per-stream proportion/repeat/choose, not both")
            total = sum(_positive(w, "a weight") for w in weights)
            specs = [Stream(s.data, proportion=float(w) / total, where=s.where) for s, w in zip(specs, weights)]
        self.datasets: list[TokenDataset] = []
        self.selections: list[np.ndarray] = []       # each stream's usable sample ids, sorted
        for i, spec in enumerate(specs):
            data = spec.data
            ids: np.ndarray | None = None
            if isinstance(data, TokenSubset):
                ds, ids = data.ds, data.ids
            elif isinstance(data, TokenDataset):
                ds = data
            elif isinstance(data, str) or hasattr(data, "__fspath__"):
                ds = TokenDataset(str(data), **open_options)
            else:
                raise UsageError(f"stream {i}: not a dataset, subset or URL: {type(data).__name__}")
            if spec.where is not None:
                chosen = _select(ds, spec.where)
                ids = chosen if ids is None else np.intersect1d(ids, chosen)
            self.datasets.append(ds)
            self.selections.append(np.arange(len(ds), dtype=np.int64) if ids is None else np.asarray(ids, np.int64))
        self._check_compatible()
        counts = [len(s) for s in self.selections]
        size = sum(counts) if epoch_size is None else int(_positive(epoch_size, "epoch_size"))
        self.take: list[int] = []
        for i, (spec, m) in enumerate(zip(specs, counts)):
            given = [n for n in ("proportion", "repeat", "choose") if getattr(spec, n) is not None]
            if len(given) > 1:
                raise UsageError(f"stream {i}: give one of proportion, repeat, choose (got {', '.join(given)})")
            if spec.choose is not None:
                if isinstance(spec.choose, bool) or not isinstance(spec.choose, (int, np.integer)) or spec.choose < 0:
                    raise UsageError(f"stream {i}: choose must be a non-negative integer, got {spec.choose!r}")
                n = int(spec.choose)
            elif spec.repeat is not None:
                n = round(_positive(spec.repeat, f"stream {i}: repeat") * m)
            elif spec.proportion is not None:
                n = round(_positive(spec.proportion, f"stream {i}: proportion") * size)
            else:
                n = m
            if n and not m:
                raise UsageError(f"stream {i} ({self.datasets[i].url}) has no samples to draw {n} from")
            self.take.append(n)
        if not sum(self.take):
            raise UsageError("the mixture draws no samples per epoch")
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])]).astype(np.int64)
        first = self.datasets[0]
        self.grid, self.views, self.sample_shape = first.grid, first.views, first.sample_shape
        self.tokens_per_sample, self.vocab_size = first.tokens_per_sample, first.vocab_size
        self.variable_grid = first.variable_grid       # (streams of one grid, or all variable: sample_shape ())
        self.max_sample_tokens = max(d.max_sample_tokens for d in self.datasets)
        self.token_dtype = np.result_type(*[d.token_dtype for d in self.datasets])
        self.url = "mix(" + ", ".join(d.url for d in self.datasets) + ")"
        self.job_hash = hashlib.sha256(json.dumps(
            [[d.job_hash, n, hashlib.sha256(s.tobytes()).hexdigest()]
             for d, n, s in zip(self.datasets, self.take, self.selections)]).encode()).hexdigest()

    def _check_compatible(self) -> None:
        first = self.datasets[0]
        ident = (first.info.tokenizer.tokenizer_id, first.info.tokenizer.codebook_hash)
        for i, ds in enumerate(self.datasets[1:], 1):
            other = (ds.info.tokenizer.tokenizer_id, ds.info.tokenizer.codebook_hash)
            if other != ident:
                raise UsageError(f"stream {i} ({ds.url}) was made with another tokenizer (id {other[0][:16]}, "
                                 f"codebook {str(other[1])[:16]}) than stream 0 (id {ident[0][:16]}, codebook "
                                 f"{str(ident[1])[:16]}): their tokens do not mean the same")
            if (ds.sample_shape, ds.views) != (first.sample_shape, first.views):
                raise UsageError(f"stream {i} ({ds.url}) stores samples of shape {ds.sample_shape} with views "
                                 f"{ds.views}; stream 0 {first.sample_shape} with {first.views}")

    def __len__(self) -> int:
        return sum(self.take)

    def __repr__(self) -> str:
        return f"TokenMixture({len(self.datasets)} streams, per epoch {self.take})"

    @property
    def label_names(self) -> list[str] | None:
        names = [d.label_names for d in self.datasets]
        return names[0] if all(n == names[0] for n in names) else None

    @property
    def text_tokenizer(self) -> dict[str, Any] | None:
        """The streams' text tokenizer if they all have the same (by the sha256 of its
        tokenizer.json), else None: their text ids do not mean the same."""
        texts = [d.text_tokenizer for d in self.datasets]
        if texts[0] is None or any(t is None or t["sha256"] != texts[0]["sha256"] for t in texts):
            return None
        return texts[0]

    def text_lengths(self) -> np.ndarray:
        """Each sample's count of text token ids, by mixture id (the streams' in turn); joined
        once (the loader looks batches up in it)."""
        if getattr(self, "_text_lengths", None) is None:
            self._text_lengths = np.concatenate([d.text_lengths() for d in self.datasets])
        return self._text_lengths

    @property
    def class_names(self) -> dict[str, list[str]] | None:
        return self.datasets[0].class_names if self.label_names is not None else None

    def grids(self) -> np.ndarray:
        """Each sample's token grid (h, w), by mixture id (the streams' in turn); joined once
        (the loader looks batches up in it)."""
        if getattr(self, "_grids", None) is None:
            self._grids = np.concatenate([d.grids() for d in self.datasets])
        return self._grids

    def decode_tokens(self, tokens: np.ndarray, ids: np.ndarray | None = None,
                      grids: np.ndarray | None = None, *, stack: bool = False) -> np.ndarray:
        """A batch's coded tokens (from any streams; `ids` say which) -> (n, *sample_shape)
        token ids, each stream's decoded by its own codec (variable grids: an object array of
        (h, w) arrays, `grids` giving each sample's)."""
        if self.variable_grid is not None:
            if ids is None or grids is None:
                raise ValueError("a mixture decodes variable grids by the ids that say their streams, and the grids")
            streams = np.searchsorted(self.offsets, ids, side="right") - 1
            parts = {s: self.datasets[s].decode_tokens(tokens[sel], ids[sel] - self.offsets[s], grids[sel],
                                                       stack=stack)
                     for s in np.unique(streams).tolist() for sel in [np.flatnonzero(streams == s)]}
            if stack and len(tokens):
                out: np.ndarray = np.empty((len(tokens), *next(iter(parts.values())).shape[1:]), self.token_dtype)
            else:
                out = np.empty(len(tokens), dtype=object)
            for s, part in parts.items():
                out[np.flatnonzero(streams == s)] = part
            return out
        if tokens.dtype != object:
            return tokens.reshape(len(tokens), *self.sample_shape)
        if ids is None:
            raise ValueError("a mixture decodes tokens by the ids that say their streams")
        streams = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(tokens), *self.sample_shape), self.token_dtype)
        for s in np.unique(streams).tolist():
            sel = np.flatnonzero(streams == s)
            ds, coded = self.datasets[s], tokens[sel]
            if ds.codec.name == "raw":        # rows stored as they are (see _MixStream.load)
                out[sel] = np.stack(list(coded)).reshape(len(sel), *self.sample_shape)
            else:
                out[sel] = ds.decode_tokens(coded, ids[sel] - self.offsets[s])
        return out

    # -- the epoch plan -------------------------------------------------------------------
    def window(self, s: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
        """Stream s's sample ids for `epoch`: its window of the endless sequence of passes."""
        ids, n = self.selections[s], self.take[s]
        m = len(ids)
        if not n:
            return np.empty(0, np.int64)
        start, stop = epoch * n, (epoch + 1) * n
        out = []
        for q in range(start // m, (stop - 1) // m + 1):
            order = self._pass(s, q, seed, shuffle)
            lo, hi = max(start - q * m, 0), min(stop - q * m, m)
            out.append(order[lo:hi])
        return np.concatenate(out)

    def _pass(self, s: int, q: int, seed: int, shuffle: bool) -> np.ndarray:
        ids, ds = self.selections[s], self.datasets[s]
        if not shuffle:
            return ids
        shard = np.searchsorted(ds.shard_offsets, ids, side="right") - 1
        rank = np.empty(ds.num_shards, np.int64)
        rank[permutation(key64("mix-pass", seed, s, q), ds.num_shards)] = np.arange(ds.num_shards)
        return ids[np.lexsort((ids, rank[shard]))]

    def epoch_plan(self, epoch: int, seed: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """(stream, sample id in its dataset) of each position of the epoch's stream."""
        times, streams, ids = [], [], []
        for s, n in enumerate(self.take):
            if n:
                times.append((np.arange(n, dtype=np.float64) + 0.5) / n)
                streams.append(np.full(n, s, np.int64))
                ids.append(self.window(s, epoch, seed, shuffle))
        t, st, sid = np.concatenate(times), np.concatenate(streams), np.concatenate(ids)
        order = np.lexsort((st, t))
        return st[order], sid[order]

    def epoch_ids(self, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
        """The mixture id (the stream's offset + the sample's id there) at each position of the
        epoch's stream."""
        streams, ids = self.epoch_plan(epoch, seed, shuffle)
        return self.offsets[streams] + ids

    def epoch_stream(self, epoch: int, seed: int, shuffle: bool, on_error: str, prefetch: int,
                     columns: tuple[str, ...]) -> _MixStream:
        streams, ids = self.epoch_plan(epoch, seed, shuffle)
        return _MixStream(self, streams, ids, on_error, columns, prefetch)

    # -- training --------------------------------------------------------------------------
    def iterable(self, batch_size: int = 256, **options: Any) -> TokenIterable:
        from tokshard.pipeline.stream.loader import TokenIterable
        return TokenIterable(self, batch_size=batch_size, **options)  # type: ignore[arg-type]

    def loader(self, batch_size: int = 256, *, num_workers: int = 0, **options: Any) -> TokenLoader:
        """A resumable loader of the mixture's batches for this rank (see `TokenLoader`)."""
        from tokshard.pipeline.stream.loader import TokenLoader
        loader_keys = ("pin_memory", "prefetch_factor", "multiprocessing_context", "block", "worker_affinity")
        kw = {k: options.pop(k) for k in loader_keys if k in options}
        return TokenLoader(self.iterable(batch_size, **options), num_workers=num_workers, **kw)


class _MixStream(ShardRows):
    """A mixture epoch's positions -> rows (the loader's `EpochStream` for a mixture): shards of
    every stream, tokens decoded as they are read, kept until the loader releases them."""

    def __init__(self, mix: TokenMixture, streams: np.ndarray, ids: np.ndarray, on_error: str,
                 columns: tuple[str, ...], prefetch: int = 0):
        super().__init__(prefetch)
        self.mix, self.streams, self.ids, self.on_error, self.columns = mix, streams, ids, on_error, columns

    def key(self, shard: int) -> tuple[int, int]:
        return divmod(shard, _STREAM_SHIFT)   # (stream, shard in its dataset)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An id of the (stream, shard) each position is read from, and its row there."""
        streams, ids = self.streams[positions], self.ids[positions]
        shard, row = np.empty(len(positions), np.int64), np.empty(len(positions), np.int64)
        for s in np.unique(streams):
            sel = streams == s
            offsets = self.mix.datasets[int(s)].shard_offsets
            k = np.searchsorted(offsets, ids[sel], side="right") - 1
            shard[sel], row[sel] = int(s) * _STREAM_SHIFT + k, ids[sel] - offsets[k]
        return shard, row

    def load(self, shard: int, rows: np.ndarray | None = None) -> dict:
        from tokshard.pipeline.stream.loader import load_rows
        s, k = self.key(shard)
        ds = self.mix.datasets[s]
        n = int(ds.shard_sizes[k]) if rows is None else len(rows)
        # Tokens stay coded until their batch is decoded (TokenMixture.decode_tokens), as a
        # dataset's do; a raw codec's rows become objects too, so every stream's shards
        # gather alike.
        cols, skipped = load_rows(ds, k, self.columns, self.on_error, rows)
        if skipped:
            self.skipped_shards.append(f"stream {s}: {ds.shard_names[k]}")
        if cols["tokens"].dtype != object:
            coded = np.empty(n, object)
            coded[:] = list(cols["tokens"])
            cols["tokens"] = coded
        cols["id"] = cols["id"] + self.mix.offsets[s]
        cols["stream"] = np.full(n, s, np.int64)
        return cols


def mix(streams: Sequence[TokenDataset | TokenSubset | str | Stream], weights: Sequence[float] | None = None, *,
        epoch_size: int | None = None, **open_options: Any) -> TokenMixture:
    """Several token datasets as one stream (see `TokenMixture`): `weights` are the streams'
    proportions of each epoch; `Stream(data, proportion=|repeat=|choose=, where=)` says it
    per stream. URLs are opened with `open_options` (storage_options, cache_dir, ...)."""
    return TokenMixture(streams, weights, epoch_size=epoch_size, **open_options)
