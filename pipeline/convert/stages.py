"""Convert one work unit in three stages: decode -> encode -> commit.

- `decode_unit` reads and decodes a unit's images and yields them in batches
  of the tokenizer's batch size (CPU work);
- `encode_batch` turns one batch into codes (the tokenizer: GPU work);
- `commit_unit` codes, serialises and writes the shard, its sample index and,
  last, its receipt (I/O).

The local engine chains them in one process (`process_unit`); the Ray engine
runs them as decode tasks, tokenizer actors and commit tasks. Batch
boundaries are fixed per unit and everything written derives from the unit
and the job alone, so both engines write the same bytes.
"""

from __future__ import annotations

import io
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import SkipSample, TokenizerError
from tokshard.pipeline.convert.decode import DecodeConfig, decode_image
from tokshard.pipeline.convert.select import select_records
from tokshard.pipeline.convert.sources import Record, WorkUnit, read_unit
from tokshard.pipeline.convert.video import ClipConfig, clip_meta, decode_clips
from tokshard.pipeline.convert.views import make_views, view_names
from tokshard.pipeline.format.codecs import TokenCodec, token_dtype
from tokshard.pipeline.format.layout import DatasetLayout, shard_name
from tokshard.pipeline.format.shards import EncodedSample, get_format
from tokshard.pipeline.format.work import read_receipt, write_receipt
from tokshard.pipeline.storage import atomic_write, redact_url, sha256
from tokshard.schemas.records import Receipt, ShardEntry
from tokshard.schemas.v1 import samples_schema
from tokshard.tokenizers.base import ClipTokenizer, Tokenizer, TokenizerIdentity, canonical_json, sha256_hex
from tokshard.tokenizers.text import TextTokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """What the decode and commit stages need to know of the tokenizer (no weights)."""
    name: str
    identity: TokenizerIdentity
    grid_shape: tuple[int, ...]
    vocab_size: int
    resolution: int
    batch_size: int

    @classmethod
    def of(cls, tok: Tokenizer) -> TokenizerInfo:
        return cls(tok.name, tok.identity(), tuple(tok.grid_shape), int(tok.vocab_size),
                   int(tok.resolution), int(tok.batch_size))


@dataclass
class UnitContext:
    """Everything a stage needs besides the unit; picklable, so Ray can ship it."""
    layout: DatasetLayout
    format: str
    tokenizer: TokenizerInfo
    codec: TokenCodec
    decode: DecodeConfig
    job_hash: str
    decode_workers: int = 2
    storage_options: dict | None = None
    columns: dict | None = None
    views: str = "none"
    where: str | None = None                    # SQL predicate over source samples' metadata
    clip: ClipConfig | None = None              # set: a video job, one sample per clip
    clip_shape: tuple[int, ...] | None = None   # codes of one clip from a clip (3-D) tokenizer
    text: TextTokenizer | None = None           # set: captions become the text_tokens column

    @property
    def variable_grid(self) -> bool:
        """Each sample has its own grid (--resize-mode area): images of their own sizes."""
        return self.decode.resize_mode == "area"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Stored codes per sample: the grid, with a leading view axis for multi-view
        and a leading time axis for video clips; () with variable grids (each sample's own)."""
        if self.variable_grid:
            return ()
        if self.clip is not None:
            return self.clip_shape or (self.clip.frames, *self.tokenizer.grid_shape)
        n = len(view_names(self.views))
        return tuple(self.tokenizer.grid_shape) if n == 1 else (n, *self.tokenizer.grid_shape)


@dataclass
class DecodedBatch:
    kept: list            # (record without image bytes, width, height)
    # (len(kept) * views, R, R, 3) uint8; with variable grids a list of (H, W, 3) images of their own sizes
    images: np.ndarray | list[np.ndarray]


@dataclass
class EncodedBatch:
    kept: list
    codes: np.ndarray | list[np.ndarray]    # (len(kept), *sample_shape); variable grids: one (h, w) array each
    encode_s: float


@dataclass
class UnitTail:
    """The last item a unit's decode yields: what was skipped, and the time spent."""
    skips: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)   # parts of kept samples, by DROP_REASONS
    decode_s: float = 0.0


# A decoder takes a record's encoded bytes to what `_samples` unpacks: a Decoded
# image, or (clips, width, height) for a video job.
Decoder = Callable[[bytes], Any]


def unit_hash(unit: WorkUnit, job_hash: str) -> str:
    return sha256_hex(canonical_json({"unit": unit.spec(), "job": job_hash}))


def _decode(rec: Record, decoder: Decoder) -> tuple[Record, Any]:
    if rec.skip:
        return rec, None
    assert rec.image is not None  # sources mark every record without bytes as a skip
    try:
        return rec, decoder(rec.image)
    except SkipSample as e:
        rec.skip, rec.detail = e.reason, e.detail
        return rec, None


def decode_records(records: Iterable[Record], cfg: DecodeConfig, workers: int, window: int = 0,
                   decoder: Decoder | None = None) -> Iterator[tuple[Record, Any]]:
    """Decoded records in input order; skipped ones carry their reason.

    At most `window` records are in flight, so memory stays bounded however
    large the source shard is. `decoder(bytes)` defaults to decode_image.
    """
    decoder = decoder or partial(decode_image, cfg=cfg)
    if workers <= 1:
        yield from (_decode(r, decoder) for r in records)
        return
    window = window or 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[tuple[Record, Any]]] = deque()
        for rec in records:
            pending.append(pool.submit(_decode, rec, decoder))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_unit(unit: WorkUnit, ctx: UnitContext, limit: int | None = None) -> Iterator[DecodedBatch | UnitTail]:
    """Yield DecodedBatch items of the tokenizer's batch size, then one UnitTail.

    Only one batch of pixels is held at a time (plus the decode window), so
    memory stays bounded however large the source shard is. With variable grids,
    images are gathered by size into batches of one size (`_SizePool`), within
    SIZE_POOL_BYTES of pixels.
    """
    tok = ctx.tokenizer
    tail = UnitTail()
    kept: list[tuple[Record, int, int]] = []
    images: list[np.ndarray] = []
    n_kept = 0
    t0 = time.perf_counter()
    records = read_unit(unit, ctx.storage_options, **(ctx.columns or {}))
    if ctx.where:
        records = select_records(records, ctx.where)
    # A window of two batches lets the decode threads fill the next batch
    # while the consumer encodes this one.
    window = max(4 * ctx.decode_workers, 2 * tok.batch_size)
    decoder: Decoder | None = None
    if ctx.clip is not None:
        decoder = partial(decode_clips, decode=ctx.decode, clip=ctx.clip)
        window = 2 * ctx.decode_workers  # a video holds many frames: fewer in flight
    pool = _SizePool(tok.batch_size, SIZE_POOL_BYTES) if ctx.variable_grid else None
    for rec, dec in decode_records(records, ctx.decode, ctx.decode_workers, window, decoder):
        tail.dropped.update(rec.dropped)
        if dec is None:
            tail.skips[rec.skip] += 1
            continue
        rec.image = None  # the encoded bytes are no longer needed
        for sample, width, height, pixels in _samples(rec, dec, ctx):
            n_kept += 1
            if pool is not None:
                full = pool.add((sample, width, height), next(iter(pixels)))
                if full is not None:
                    tail.decode_s += time.perf_counter() - t0
                    yield full
                    t0 = time.perf_counter()
            else:
                kept.append((sample, width, height))
                images.extend(pixels)
                if len(images) >= tok.batch_size or n_kept == limit:
                    tail.decode_s += time.perf_counter() - t0
                    yield DecodedBatch(kept, np.stack(images))
                    kept, images = [], []
                    t0 = time.perf_counter()
            if n_kept == limit:
                break
        if n_kept == limit:
            break
    if images:
        tail.decode_s += time.perf_counter() - t0
        yield DecodedBatch(kept, np.stack(images))
    if pool is not None:
        tail.decode_s += time.perf_counter() - t0
        yield from pool.drain()
    yield tail


# Pixels a variable-grid unit holds while it gathers images of one size into full tokenizer
# batches (one encode call per size, full batches for a GPU): past it, the largest group goes
# out part-full, so memory stays bounded whatever the mix of sizes.
SIZE_POOL_BYTES = 256 << 20


class _SizePool:
    """Decoded images of their own sizes (variable grids), gathered by size into batches of the
    tokenizer's batch size. A batch goes out when its size fills one, or, when the pool holds
    more than `max_bytes`, its largest group (the first of equals) goes out as it is; what is
    left goes out at the end of the unit, sizes in the order they first came. The order of a
    unit's samples in its shard is the order their batches go out: set by the unit alone, so
    both engines write the same shard."""

    def __init__(self, batch_size: int, max_bytes: int):
        self.batch_size, self.max_bytes = batch_size, max_bytes
        self.groups: dict[tuple[int, ...], tuple[list, list[np.ndarray]]] = {}
        self.bytes = 0

    def add(self, kept: tuple, image: np.ndarray) -> DecodedBatch | None:
        samples, images = self.groups.setdefault(image.shape, ([], []))
        samples.append(kept)
        images.append(image)
        self.bytes += image.nbytes
        if len(images) >= self.batch_size:
            return self._take(image.shape)
        if self.bytes > self.max_bytes:
            return self._take(max(self.groups, key=lambda s: len(self.groups[s][1]) * int(np.prod(s))))
        return None

    def _take(self, shape: tuple[int, ...]) -> DecodedBatch:
        samples, images = self.groups.pop(shape)
        self.bytes -= sum(im.nbytes for im in images)
        return DecodedBatch(samples, images)

    def drain(self) -> Iterator[DecodedBatch]:
        for shape in list(self.groups):
            yield self._take(shape)


def _samples(rec: Record, dec: Any, ctx: UnitContext) -> Iterator[tuple[Record, int, int, Iterable[np.ndarray]]]:
    """(record, width, height, images to encode) for each sample a decoded record makes."""
    if ctx.clip is None:
        yield rec, dec.width, dec.height, make_views(dec.image, ctx.views, ctx.tokenizer.resolution)
        return
    clips, width, height = dec
    for c in clips:
        # One sample per clip; the video's bytes count once, on its first clip.
        meta = {**(rec.meta or {}), "video": clip_meta(c, ctx.clip)}
        yield (replace(rec, key=f"{rec.key}_{c.index:04d}", meta=meta,
                       source_bytes=rec.source_bytes if c.index == 0 else 0), width, height, c.frames)


def encode_batch(tok: Tokenizer, item: DecodedBatch | UnitTail, shape: tuple[int, ...],
                 clip_frames: int | None = None) -> EncodedBatch | UnitTail:
    """The encode stage: a DecodedBatch becomes an EncodedBatch; a UnitTail passes.

    Video clips go to a clip (3-D) tokenizer whole (`encode_clips`) when it has
    one, else frame by frame."""
    if not isinstance(item, DecodedBatch):
        return item
    t0 = time.perf_counter()
    images = item.images
    if isinstance(images, list):     # variable grids
        return EncodedBatch(item.kept, encode_by_size(tok, images), time.perf_counter() - t0)
    if clip_frames is not None and isinstance(tok, ClipTokenizer):
        codes = tok.encode_clips(images.reshape(-1, clip_frames, *images.shape[1:]))
    else:
        codes = tok.encode(images)
    return EncodedBatch(item.kept, codes.reshape(-1, *shape), time.perf_counter() - t0)


def encode_by_size(tok: Tokenizer, images: list[np.ndarray]) -> list[np.ndarray]:
    """Images of their own sizes (multiples of the tokenizer's patch) -> each one's (h, w) codes,
    in input order: one tokenizer call per size, sizes in the order they first appear (so the
    calls, and any batch-dependent rounding in them, are the same on every engine)."""
    p = tok.patch_size
    if p is None:
        raise TokenizerError(f"tokenizer {tok.name!r} takes fixed {tuple(tok.grid_shape)} grids only "
                             "(no patch_size): it cannot encode images of their own sizes")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(images)
    for shape, idx in groups.items():
        want = (len(idx), shape[0] // p, shape[1] // p)
        codes = np.asarray(tok.encode(np.stack([images[i] for i in idx])))
        if codes.shape != want:
            raise TokenizerError(f"tokenizer {tok.name!r} encoded {len(idx)} images of {shape[1]}x{shape[0]} "
                                 f"pixels to codes of shape {codes.shape}, expected {want}")
        for j, i in enumerate(idx):
            out[i] = codes[j]
    return out


def tokenize_unit(unit: WorkUnit, ctx: UnitContext, tok: Tokenizer,
                  limit: int | None = None) -> tuple[list[EncodedBatch], UnitTail]:
    """Decode and encode a unit in this process: a list of EncodedBatch and the UnitTail."""
    batches: list[EncodedBatch] = []
    tail: UnitTail | None = None
    clip_frames = ctx.clip.frames if ctx.clip is not None else None
    for item in decode_unit(unit, ctx, limit):
        out = encode_batch(tok, item, ctx.sample_shape, clip_frames)
        if isinstance(out, EncodedBatch):
            batches.append(out)
        else:
            tail = out
    assert tail is not None  # decode_unit always ends with its UnitTail
    return batches, tail


def process_unit(unit: WorkUnit, ctx: UnitContext, tok: Tokenizer) -> Receipt:
    """All three stages in this process (the local engine)."""
    return commit_unit(unit, ctx, *tokenize_unit(unit, ctx, tok))


def commit_unit(unit: WorkUnit, ctx: UnitContext, batches: list[EncodedBatch], tail: UnitTail) -> Receipt:
    """Code, serialise and write the shard and its index, then its receipt."""
    t0 = time.perf_counter()
    info, codec = ctx.tokenizer, ctx.codec
    kept = [k for b in batches for k in b.kept]
    dtype = token_dtype(info.vocab_size)
    codes: np.ndarray | list[np.ndarray]
    if ctx.variable_grid:   # one (h, w) array per sample; the codec codes each with its own row width
        codes = [c.astype(dtype) for b in batches for c in b.codes]
    else:
        codes = (np.concatenate([np.asarray(b.codes) for b in batches]) if batches
                 else np.empty((0, *ctx.sample_shape), np.int64)).astype(dtype)
    # (variable grids: each coded with its own row width, which a context codec models by)
    widths = [int(c.shape[1]) for c in codes] if ctx.variable_grid else None
    payloads = codec.encode_batch(list(codes), widths=widths) if len(codes) else []
    text = _text_tokens(ctx.text, [rec.caption for rec, _, _ in kept])
    # rec.source is already redacted: the source readers (sources.py) are the one place that does it.
    samples = [EncodedSample(rec.key, p, c, rec.caption, rec.label, w, h, rec.source, rec.meta, ids)
               for (rec, w, h), p, c, ids in zip(kept, payloads, codes, text.ids)]
    identity = info.identity
    name = shard_name(unit.index)
    shard_format = get_format(ctx.format)
    rel = ctx.layout.shard_rel(name, shard_format.extension)
    file_meta = {"tokenizer": identity.tokenizer_id, "codebook_hash": identity.codebook_hash}
    if ctx.text is not None:   # (only then: the shards of jobs without text tokens are unchanged)
        file_meta["text_tokenizer_sha256"] = ctx.text.sha256
    data, offsets = shard_format.write(samples, codec.name, ctx.sample_shape, dtype, file_meta,
                                       text_tokens=ctx.text is not None, variable_grid=ctx.variable_grid)
    atomic_write(ctx.layout.fs, ctx.layout.resolve(rel), data)
    index_columns = {
        "key": [s.key for s in samples], "shard": [name] * len(samples),
        "row": list(range(len(samples))), "offset": offsets,
        "size": [len(s.payload) for s in samples], "label": [s.label for s in samples],
        "width": [s.width for s in samples], "height": [s.height for s in samples],
        "source": [s.source for s in samples]}
    if ctx.text is not None:
        index_columns["text_tokens"] = [len(ids) for ids in text.ids]
    if ctx.variable_grid:   # each sample's grid: the loader buckets by it before reading any shard
        index_columns["grid_h"] = [s.tokens.shape[0] for s in samples]
        index_columns["grid_w"] = [s.tokens.shape[1] for s in samples]
    index = pa.Table.from_pydict(index_columns, schema=samples_schema(ctx.text is not None, ctx.variable_grid))
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    index_data = buf.getvalue()
    atomic_write(ctx.layout.fs, ctx.layout.index(name), index_data)
    timings = {"decode_s": tail.decode_s, "encode_s": sum(b.encode_s for b in batches),
               "write_s": time.perf_counter() - t0}  # coding, serialising and writing
    n_tokens = sum(int(c.size) for c in codes)
    skips = tail.skips
    # A caption cut at --max-text-tokens is a part of a kept sample dropped, counted as the others are.
    dropped = tail.dropped + Counter({"text_truncated": text.truncated})
    entry = ShardEntry(
        shard=name, path=rel, format=ctx.format, codec=codec.name,
        codec_version=codec.version, samples=len(samples), tokens=n_tokens,
        raw_bytes=n_tokens * dtype.itemsize,
        payload_bytes=sum(len(p) for p in payloads), stored_bytes=len(data),
        source_bytes=sum(rec.source_bytes for rec, _, _ in kept), sha256=sha256(data),
        **identity.as_dict(), grid=[] if ctx.variable_grid else list(info.grid_shape),
        source_shards=[redact_url(unit.url)],
        unit=unit.index, skipped=sum(skips.values()),
        skipped_by_reason=[{"reason": r, "count": c} for r, c in sorted(skips.items())],
        dropped_by_reason=[{"reason": r, "count": c} for r, c in sorted(dropped.items())],
        key_min=min((s.key for s in samples), default=None),
        key_max=max((s.key for s in samples), default=None),
        index_bytes=len(index_data), index_sha256=sha256(index_data),
        text_tokens=text.tokens, no_caption=text.no_caption,
    )
    labels = Counter(s.label for s in samples if s.label is not None)
    receipt = Receipt(unit_hash=unit_hash(unit, ctx.job_hash), shard=entry, timings=timings,
                      labels=sorted(labels.items()))
    # The receipt is written last: its presence means the unit is committed.
    write_receipt(ctx.layout, receipt)
    return receipt


@dataclass
class _TextTokens:
    """A shard's text token ids (None per sample without a text tokenizer) and their counts
    (None without one, so receipts of jobs without text tokens are unchanged)."""
    ids: list
    truncated: int = 0
    tokens: int | None = None
    no_caption: int | None = None


def _text_tokens(text: TextTokenizer | None, captions: list[str | None]) -> _TextTokens:
    if text is None:
        return _TextTokens([None] * len(captions))
    ids, truncated, no_caption = text.encode(captions)
    return _TextTokens(ids, truncated, sum(len(a) for a in ids), no_caption)


def load_receipt(unit: WorkUnit, ctx: UnitContext) -> Receipt | None:
    """The unit's receipt if it is committed for this job and its shard is intact."""
    return read_receipt(ctx.layout, shard_name(unit.index), unit_hash(unit, ctx.job_hash))
