"""The dataset manifest: one Parquet file whose rows are the shards and whose
key-value metadata is the dataset record (schema version, tokenizer, codec,
totals). Readers trust only the manifest. It is written last, atomically,
after the label table and before the run's timings.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import ManifestError
from tokshard.pipeline.format.layout import MANIFEST, DatasetLayout
from tokshard.pipeline.storage import atomic_write, read_parquet_bytes
from tokshard.schemas.records import DatasetRecord, Receipt, ShardEntry
from tokshard.schemas.v1 import LABELS as LABELS_SCHEMA
from tokshard.schemas.v1 import METADATA_KEY, SCHEMA_VERSION, SHARDS, TIMINGS

# Samples a dataset may hold in all: far beyond any real one, far below where int64 ids wrap.
MAX_SAMPLES = 2**48


def write_manifest(layout: DatasetLayout, rows: list[ShardEntry], record: DatasetRecord) -> bytes:
    table = pa.Table.from_pylist([r.to_dict() for r in rows], schema=SHARDS.with_metadata(
        {METADATA_KEY: json.dumps(record.to_dict(), sort_keys=True).encode()}))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    atomic_write(layout.fs, layout.manifest, data)
    return data


def write_labels(layout: DatasetLayout, receipts: list[Receipt]) -> bytes:
    """labels.parquet from the shards' receipts, in shard order then label order; its bytes."""
    rows = [{"shard": r.shard.shard, "label": label, "count": count}
            for r in receipts for label, count in (r.labels or [])]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), buf, compression="zstd")
    atomic_write(layout.fs, layout.labels, buf.getvalue())
    return buf.getvalue()


def write_timings(layout: DatasetLayout, receipts: list[Receipt]) -> None:
    rows = [{"shard": r.shard.shard, **{k: float(r.timings.get(k, 0.0)) for k in ("decode_s", "encode_s", "write_s")}}
            for r in receipts]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=TIMINGS), buf)
    atomic_write(layout.fs, layout.timings, buf.getvalue())


def check_version(version: str, where: str) -> None:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ManifestError(f"{where}: malformed schema version {version!r}") from None
    supported = int(SCHEMA_VERSION.split(".")[0])
    if major > supported:
        raise ManifestError(f"{where}: manifest schema {version} is newer than this tokshard "
                            f"supports ({SCHEMA_VERSION}); upgrade tokshard")


def read_record(layout: DatasetLayout, url: str) -> tuple[pa.Table, DatasetRecord, dict]:
    """(shards table, typed dataset record, the record as stored) of the dataset at `layout`."""
    where = f"{url}/{MANIFEST}"
    try:
        data = layout.fs.cat_file(layout.manifest)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {url} (expected {MANIFEST}); is the convert finished?") from None
    try:
        table = read_parquet_bytes(data)    # in Arrow-owned memory: see read_parquet_bytes
        meta = json.loads(table.schema.metadata[METADATA_KEY])
    except Exception as e:
        raise ManifestError(f"{where} is not a tokshard manifest: {e}") from e
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: the dataset record is not a JSON object")
    try:
        # JSON escapes can spell lone surrogates (`"\udc80"`), which no tokshard writes and
        # which fail later, wherever the text is printed or written out.
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: the dataset record holds text that is not valid Unicode") from None
    check_version(meta.get("schema_version", "0"), where)
    return table, DatasetRecord.from_dict(meta, where), meta


def read_manifest(url: str, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    """(shards table, dataset record as stored) of the dataset at `url`."""
    table, _, meta = read_record(DatasetLayout.at(url, storage_options), url)
    return table, meta


def read_valid(layout: DatasetLayout, url: str) -> tuple[pa.Table, DatasetRecord, dict, ShardTable]:
    """`read_record`, then everything a reader checks before it trusts the manifest
    (`check_record_paths`, `check_shards`): what `open`, `query` and `info` read."""
    table, record, meta = read_record(layout, url)
    check_record_paths(layout, record)
    return table, record, meta, check_shards(layout, table, record, url)


def check_record_paths(layout: DatasetLayout, record: DatasetRecord) -> None:
    """Every path the record names stays inside the root (lexically: links are checked when
    a file is read), so no command shows, or later follows, one that leaves it."""
    text = record.text_tokenizer.path if record.text_tokenizer is not None else None
    for rel, field in ((record.codec_state, "record.codec_state"), (record.labels, "record.labels"),
                       (record.tokenizer.path, "record.tokenizer.path"), (text, "record.text_tokenizer.path")):
        if rel is not None:
            layout.resolve(rel, field, follow_links=False)
    for name, fld in (record.fields or {}).items():
        layout.resolve(fld.path, f"record.fields.{name}.path", follow_links=False)
    layout.check_paths(list(record.files), lambda i: "record.files")


@dataclass
class ShardTable:
    """The manifest's shard rows a reader uses, validated: names, paths and sha256s as lists,
    counts and sizes as int64 arrays."""
    names: list[str]
    paths: list[str]
    sha256: list[str]
    samples: np.ndarray
    stored_bytes: np.ndarray


def check_shards(layout: DatasetLayout, table: pa.Table, record: DatasetRecord, url: str) -> ShardTable:
    """The shard table, checked: no nulls, integer counts that are not negative and do not
    overflow when summed, totals that agree, token counts that agree with the sample shape
    (schema 1.3), and every shard and index path inside the root. Vectorised: a manifest of
    200,000 shards is checked without a Python loop over its rows."""
    try:
        cols = table.select(["shard", "path", "sha256", "samples", "stored_bytes"])
        if any(cols.column(c).null_count for c in cols.column_names):
            raise ValueError("null entries")
        if not all(pa.types.is_integer(cols.schema.field(c).type) for c in ("samples", "stored_bytes")):
            raise ValueError("samples and stored_bytes must be integer columns")
        lists = cols.select(["shard", "path", "sha256"]).to_pydict()
        sizes = cols.column("samples").to_numpy()
        stored = np.array(cols.column("stored_bytes").to_numpy(), dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError, UnicodeDecodeError, pa.ArrowException) as e:
        raise ManifestError(f"{url}: the manifest's shard table is damaged ({type(e).__name__}: {e})") from None
    names = lists["shard"]
    negative = np.flatnonzero(sizes < 0)
    if len(negative):
        raise ManifestError(f"{url}: manifest shard {names[int(negative[0])]!r:.40}: samples is "
                            f"{int(sizes[negative[0]])}, not a non-negative integer")
    # A sum that would wrap int64 (to 0: an empty epoch; to a negative length) is refused, never
    # computed: the float sum bounds it first, then the exact sum cannot overflow.
    if float(sizes.sum(dtype=np.float64)) > MAX_SAMPLES:
        raise ManifestError(f"{url}: the manifest's shards hold more than the {MAX_SAMPLES} samples a "
                            "dataset may hold (column samples)")
    sizes = sizes.astype(np.int64)
    total = int(sizes.sum())
    declared = record.totals.get("samples")
    if type(declared) is not int or declared != total:
        raise ManifestError(f"{url}: record.totals.samples is {declared!r:.40}, the manifest's shards "
                            f"hold {total} (column samples)")
    if _minor(record.schema_version) >= 3:
        # Written together since 1.0; held to each other from 1.3 (earlier readers never did).
        per_sample = int(np.prod(record.stored_shape()))
        try:
            tokens = np.asarray(table.column("tokens").to_numpy(), dtype=np.int64)
        except (KeyError, TypeError, ValueError, pa.ArrowException) as e:
            raise ManifestError(f"{url}: the manifest's tokens column is damaged ({type(e).__name__})") from None
        if record.variable_grid is not None:
            # Each sample 1..max_tokens tokens (its own grid); divided, not multiplied, as below.
            most = int(record.variable_grid["max_tokens"])
            wrong = np.flatnonzero((tokens < sizes) | (-(-tokens // most) > sizes))
            if len(wrong):
                k = int(wrong[0])
                raise ManifestError(f"{url}: manifest shard {names[k]!r:.40}: {int(sizes[k])} samples of 1.."
                                    f"{most} tokens, but the tokens column says {int(tokens[k])}")
            wrong = np.empty(0, np.int64)
        else:
            # Divided, not multiplied: samples x tokens per sample could wrap int64.
            wrong = np.flatnonzero((tokens // max(per_sample, 1) != sizes) | (tokens % max(per_sample, 1) != 0))
        if len(wrong):
            k = int(wrong[0])
            raise ManifestError(f"{url}: manifest shard {names[k]!r:.40}: {int(sizes[k])} samples of {per_sample} "
                                f"tokens, but the tokens column says {int(tokens[k])}")
    # Every path the shard table names stays inside the root (lexically here; links when read).
    layout.check_paths(cols.column("path"), lambda i: f"manifest shard {names[i]!r:.40}: path")
    layout.check_paths(layout.index_rels(cols.column("shard")), lambda i: f"manifest shard {names[i]!r:.40}: name")
    return ShardTable(names, lists["path"], lists["sha256"], sizes, stored)


def _minor(version: str) -> int:
    """The minor number of a 1.x schema version (0 when it has none)."""
    try:
        return int(str(version).split(".")[1])
    except (IndexError, ValueError):
        return 0
