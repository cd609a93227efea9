"""The dataset manifest: one Parquet file whose rows are the shards and whose
key-value metadata is the dataset record (schema version, tokenizer, codec,
totals). Readers trust only the manifest. It is written last, atomically,
after the label table and before the run's timings.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from tokshard.errors import ManifestError
from tokshard.pipeline.format.layout import MANIFEST, DatasetLayout
from tokshard.pipeline.storage import atomic_write, read_parquet_bytes
from tokshard.schemas.records import DatasetRecord, Receipt, ShardEntry
from tokshard.schemas.v1 import LABELS as LABELS_SCHEMA
from tokshard.schemas.v1 import METADATA_KEY, SCHEMA_VERSION, SHARDS, TIMINGS


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
    check_version(meta.get("schema_version", "0"), where)
    return table, DatasetRecord.from_dict(meta, where), meta


def read_manifest(url: str, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    """(shards table, dataset record as stored) of the dataset at `url`."""
    table, _, meta = read_record(DatasetLayout.at(url, storage_options), url)
    return table, meta
