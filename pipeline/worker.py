"""Convert one work unit: read -> decode -> tokenize -> code -> write shard + index + receipt.

Engine-agnostic: the local engine calls `process_unit` in a loop; a
distributed engine calls it as a task. Everything a unit writes is derived
from the unit and the job alone, so any engine gives the same bytes.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.pipeline.codecs import TokenCodec, token_dtype
from tokshard.pipeline.decode import DecodeConfig, decode_image
from tokshard.pipeline.errors import SkipSample
from tokshard.pipeline.shard_writers import EXTENSIONS, WRITERS, EncodedSample
from tokshard.pipeline.sources import Record, WorkUnit, read_unit
from tokshard.pipeline.storage import atomic_write, join, sha256
from tokshard.pipeline.views import make_views, view_names
from tokshard.schemas.v1 import SAMPLES
from tokshard.tokenizers.base import Tokenizer, canonical_json, sha256_hex


@dataclass
class UnitContext:
    fs: object
    root: str
    format: str
    tokenizer: Tokenizer
    codec: TokenCodec
    decode: DecodeConfig
    job_hash: str
    decode_workers: int = 2
    storage_options: dict | None = None
    columns: dict | None = None
    views: str = "none"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Stored codes per sample: the grid, with a leading view axis for multi-view."""
        n = len(view_names(self.views))
        return tuple(self.tokenizer.grid_shape) if n == 1 else (n, *self.tokenizer.grid_shape)


def shard_name(unit: WorkUnit) -> str:
    return f"{unit.index:06d}"


def receipt_path(ctx: UnitContext, unit: WorkUnit) -> str:
    return join(ctx.root, "_work", "units", f"{shard_name(unit)}.json")


def unit_hash(unit: WorkUnit, job_hash: str) -> str:
    return sha256_hex(canonical_json({"unit": unit.spec(), "job": job_hash}))


def _decode(rec: Record, cfg: DecodeConfig):
    if rec.skip:
        return rec, None
    try:
        return rec, decode_image(rec.image, cfg)
    except SkipSample as e:
        rec.skip, rec.detail = e.reason, e.detail
        return rec, None


def decode_records(records, cfg: DecodeConfig, workers: int, window: int = 0):
    """Decoded records in input order; skipped ones carry their reason.

    At most `window` records are in flight, so memory stays bounded however
    large the source shard is.
    """
    if workers <= 1:
        yield from (_decode(r, cfg) for r in records)
        return
    window = window or 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for rec in records:
            pending.append(pool.submit(_decode, rec, cfg))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tokenize_unit(unit: WorkUnit, ctx: UnitContext, limit: int | None = None):
    """(kept (record, width, height) triples, their codes, skip counter, timings).

    Images are encoded in batches of the tokenizer's batch size as they are
    decoded, so only one batch of pixels is held at a time; fixed batch
    boundaries per unit keep the codes independent of the engine. With several
    views, a batch holds every view of its images and codes come out
    (n, views, *grid).
    """
    tok = ctx.tokenizer
    batch_size = int(getattr(tok, "batch_size", 64))
    shape = ctx.sample_shape
    kept, batch, codes, skips = [], [], [], Counter()
    timings = {"decode_s": 0.0, "encode_s": 0.0}
    t0 = time.perf_counter()

    def flush():
        nonlocal t0
        t1 = time.perf_counter()
        codes.append(tok.encode(np.stack(batch)).reshape(-1, *shape))
        batch.clear()
        t0 = time.perf_counter()
        timings["encode_s"] += t0 - t1

    records = read_unit(unit, ctx.storage_options, **(ctx.columns or {}))
    for rec, dec in decode_records(records, ctx.decode, ctx.decode_workers):
        if dec is None:
            skips[rec.skip] += 1
            continue
        rec.image = None  # the encoded bytes are no longer needed
        kept.append((rec, dec.width, dec.height))
        batch.extend(make_views(dec.image, ctx.views, tok.resolution))
        if len(batch) >= batch_size:
            timings["decode_s"] += time.perf_counter() - t0
            flush()
        if limit and len(kept) >= limit:
            break
    timings["decode_s"] += time.perf_counter() - t0
    if batch:
        flush()
    out = np.concatenate(codes) if codes else np.empty((0, *shape), np.int64)
    return kept, out, skips, timings


def process_unit(unit: WorkUnit, ctx: UnitContext) -> dict:
    kept, codes, skips, timings = tokenize_unit(unit, ctx)
    t0 = time.perf_counter()
    tok, codec = ctx.tokenizer, ctx.codec
    dtype = token_dtype(tok.vocab_size)
    codes = codes.astype(dtype)
    payloads = codec.encode_batch(list(codes)) if len(codes) else []
    samples = [EncodedSample(rec.key, p, c, rec.caption, rec.label, w, h, rec.source, rec.meta)
               for (rec, w, h), p, c in zip(kept, payloads, codes)]
    identity = tok.identity()
    name = shard_name(unit)
    rel = f"shards/{name}.{EXTENSIONS[ctx.format]}"
    file_meta = {"tokenizer": identity.tokenizer_id, "codebook_hash": identity.codebook_hash}
    data, offsets = WRITERS[ctx.format](samples, codec.name, ctx.sample_shape, dtype, file_meta)
    atomic_write(ctx.fs, join(ctx.root, rel), data)
    index = pa.Table.from_pydict({
        "key": [s.key for s in samples], "shard": [name] * len(samples),
        "row": list(range(len(samples))), "offset": offsets,
        "size": [len(s.payload) for s in samples], "label": [s.label for s in samples],
        "width": [s.width for s in samples], "height": [s.height for s in samples],
        "source": [s.source for s in samples]}, schema=SAMPLES)
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    atomic_write(ctx.fs, join(ctx.root, "samples", f"{name}.parquet"), buf.getvalue())
    timings["write_s"] = time.perf_counter() - t0  # coding, serialising and writing
    n_tokens = int(np.prod(ctx.sample_shape))
    row = {
        "shard": name, "path": rel, "format": ctx.format, "codec": codec.name,
        "codec_version": codec.version, "samples": len(samples), "tokens": len(samples) * n_tokens,
        "raw_bytes": len(samples) * n_tokens * dtype.itemsize,
        "payload_bytes": sum(len(p) for p in payloads), "stored_bytes": len(data),
        "source_bytes": sum(rec.source_bytes for rec, _, _ in kept), "sha256": sha256(data),
        **identity.as_dict(), "grid": list(tok.grid_shape), "source_shards": [unit.url],
        "unit": unit.index, "skipped": sum(skips.values()),
        "skipped_by_reason": [{"reason": r, "count": c} for r, c in sorted(skips.items())],
    }
    receipt = {"unit_hash": unit_hash(unit, ctx.job_hash), "shard": row, "timings": timings}
    # The receipt is written last: its presence means the unit is committed.
    atomic_write(ctx.fs, receipt_path(ctx, unit), json.dumps(receipt, sort_keys=True).encode())
    return receipt


def load_receipt(unit: WorkUnit, ctx: UnitContext) -> dict | None:
    """The unit's receipt if it is committed for this job and its shard is intact."""
    path = receipt_path(ctx, unit)
    try:
        receipt = json.loads(ctx.fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    if receipt.get("unit_hash") != unit_hash(unit, ctx.job_hash):
        return None
    shard = join(ctx.root, receipt["shard"]["path"])
    if not ctx.fs.exists(shard) or ctx.fs.size(shard) != receipt["shard"]["stored_bytes"]:
        return None
    return receipt
